"""PROXY protocol version 2 headers: the client's address, for the backend.

A backend behind the router sees the router as its client. With
``client_address = proxy`` every datagram to the backend starts with a PROXY
v2 header (the haproxy specification, section 2.2) that names the client's
source address and port and the router's address and port the query came in
on; a backend that speaks the protocol (dnsdist, PowerDNS, Knot with
``proxy-allowlist``) answers as if the client had asked it directly.

The layout, after the 12-byte signature::

    version 2 | command PROXY    1 byte   0x21
    family    | protocol         1 byte   0x12 INET/DGRAM, 0x22 INET6/DGRAM
                                          (0x11, 0x21 for STREAM)
    length of the address block  2 bytes  12 (IPv4) or 36 (IPv6), big endian
    source address, destination address, source port, destination port

Per packet only the source changes: ``prefix_for`` packs the rest once per
listening address, and ``sockaddr_prefix_for`` copies the source straight
out of the kernel's raw peer address, which is how the packet path keeps
peers.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Callable

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY = 0x21  # version 2 (high nibble), command PROXY (low nibble)
_FAMILIES: dict[int, int] = {socket.AF_INET: 0x10, socket.AF_INET6: 0x20}
_STREAM, _DGRAM = 0x01, 0x02
_BLOCK: dict[int, int] = {socket.AF_INET: 12, socket.AF_INET6: 36}  # bytes of the address block
_SIZE: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}  # bytes of one address
# Where a raw ``struct sockaddr_in`` / ``sockaddr_in6`` keeps the address
# (sin_addr at 4, sin6_addr at 8; the port is at 2 in both, big endian), and
# its size, which is how the packet path tells the two apart.
_SOCKADDR: dict[int, tuple[int, int]] = {socket.AF_INET: (4, 16), socket.AF_INET6: (8, 28)}
_PORTS = struct.Struct("!HH")
_PORT = struct.Struct("!H")
# A whole header in one pack: the head, source address, destination address,
# source port, and the destination port (packed once, with the head).
_SOURCE: dict[int, struct.Struct] = {socket.AF_INET: struct.Struct("!16s4s4sH2s"), socket.AF_INET6: struct.Struct("!16s16s16sH2s")}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY v2 header says: who asked whom, over which transport."""

    source: tuple[str, int]
    destination: tuple[str, int]
    stream: bool = False


def prefix_for(destination: tuple[str, int], stream: bool = False) -> Callable[[tuple[str, int]], bytes]:
    """A function from a source (host, port[, ...], as ``recvfrom`` reports
    it) to the header for a datagram from it to ``destination``.

    Everything but the source is packed here, once per listening address;
    the function only packs the source (ValueError for another family or a
    bad port). A closure, not a method: no attribute look-ups per packet.
    """
    family, head, address, port = _constant(destination, stream)
    pack, pton = _SOURCE[family].pack, socket.inet_pton

    def header_from(source: tuple[str, int]) -> bytes:
        try:
            return pack(head, pton(family, source[0]), address, source[1], port)
        except (OSError, struct.error, TypeError):
            pass  # the slow path says what is wrong, or copes with an IPv6 zone
        return b"".join((head, _packed(family, source[0]), address, _port(source[1]), port))

    return header_from


def sockaddr_prefix_for(destination: tuple[str, int], stream: bool = False) -> Callable[[bytes], bytes]:
    """A function from a raw ``struct sockaddr`` (the kernel's bytes, as
    recvmmsg reports the peer and the packet path keeps it) to the header for
    a datagram from that peer to ``destination``. The address and port are
    copied as they are, not parsed: both are in network byte order already.
    ValueError for a raw address of the other family (told by its size)."""
    family, head, address, port = _constant(destination, stream)
    at, size = _SOCKADDR[family]
    until = at + _SIZE[family]
    join = b"".join

    def header_from(raw: bytes) -> bytes:
        if len(raw) != size:
            raise ValueError(f"a raw peer address of {len(raw)} bytes, expected {size}")
        return join((head, raw[at:until], address, raw[2:4], port))

    return header_from


def header(source: tuple[str, int], destination: tuple[str, int], stream: bool = False) -> bytes:
    """The PROXY v2 header for a datagram (or, with ``stream``, a connection)
    from ``source`` to ``destination``. Both must be of one family (a
    dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d``, and its own
    address is IPv6 too): ValueError otherwise."""
    return prefix_for(destination, stream)(source)


def parse(data: bytes) -> tuple[ProxyHeader, int]:
    """The header at the start of ``data`` and the offset where the payload
    starts; ValueError for anything else.

    Only what ``header`` writes is accepted: command PROXY, INET or INET6,
    STREAM or DGRAM (a LOCAL or UNSPEC header would be a backend shim's
    business, and the router never sends one). TLVs after the addresses are
    skipped, as the specification tells receivers to.
    """
    if len(data) < 16 or data[:12] != SIGNATURE:
        raise ValueError("no PROXY v2 signature")
    if data[12] != _PROXY:
        raise ValueError(f"version and command 0x{data[12]:02x}, expected 0x21 (v2, PROXY)")
    families = {code: family for family, code in _FAMILIES.items()}
    family = families.get(data[13] & 0xF0)
    protocol = data[13] & 0x0F
    if family is None or protocol not in (_STREAM, _DGRAM):
        raise ValueError(f"family and protocol 0x{data[13]:02x}, expected INET or INET6 over STREAM or DGRAM")
    end = 16 + (data[14] << 8 | data[15])
    if end > len(data):
        raise ValueError("the header runs past the end of the data")
    if end - 16 < _BLOCK[family]:
        raise ValueError(f"an address block of {end - 16} bytes, expected at least {_BLOCK[family]}")
    size = _SIZE[family]
    source = socket.inet_ntop(family, data[16:16 + size])
    destination = socket.inet_ntop(family, data[16 + size:16 + 2 * size])
    source_port, destination_port = _PORTS.unpack_from(data, 16 + 2 * size)
    return ProxyHeader((source, source_port), (destination, destination_port), protocol == _STREAM), end


def _constant(destination: tuple[str, int], stream: bool) -> tuple[int, bytes, bytes, bytes]:
    """(family, the 16 bytes before the addresses, destination address, destination port)."""
    host = destination[0]
    family = socket.AF_INET6 if isinstance(host, str) and ":" in host else socket.AF_INET
    protocol = _STREAM if stream else _DGRAM
    head = SIGNATURE + bytes((_PROXY, _FAMILIES[family] | protocol)) + _PORT.pack(_BLOCK[family])
    return family, head, _packed(family, host), _port(destination[1])


def _packed(family: int, host: str) -> bytes:
    # recvfrom names a link-local IPv6 peer "fe80::1%eth0"; the zone is local
    # to this machine and has no place in the header.
    try:
        return socket.inet_pton(family, host.partition("%")[0] if family == socket.AF_INET6 else host)
    except (OSError, TypeError):
        name = "IPv6" if family == socket.AF_INET6 else "IPv4"
        mixed = " (source and destination must be of one family)" if _is_address(host) else ""
        raise ValueError(f"{host!r} is not an {name} address{mixed}") from None


def _is_address(host: object) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, str(host).partition("%")[0])
            return True
        except OSError:
            pass
    return False


def _port(port: int) -> bytes:
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} is not in 0-65535")
    return _PORT.pack(port)
