"""The listening sockets, bound once by the supervisor and lent to workers.

One UDP and one TCP socket per worker and address, all with SO_REUSEPORT:
the kernel spreads clients over the workers, and a replacement worker gets
the very sockets (and the packets queued on them) of the one it replaces.
"""
from __future__ import annotations

import socket
from typing import Sequence

from dnsrouter.address import Address
from dnsrouter.errors import ConfigError

UDP_BUFFER = 4 << 20  # absorbs bursts while a worker is busy or restarting


def _socket(address: Address, kind: int) -> socket.socket:
    sock = socket.socket(address.family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from None
    return sock


def bind(addresses: Sequence[Address], workers: int) -> list[tuple[list[socket.socket], list[socket.socket]]]:
    """(udp sockets, tcp sockets) for each worker."""
    out = []
    try:
        for _ in range(workers):
            out.append(([_socket(a, socket.SOCK_DGRAM) for a in addresses],
                        [_socket(a, socket.SOCK_STREAM) for a in addresses]))
    except ConfigError:
        for udp, tcp in out:
            for sock in udp + tcp:
                sock.close()
        raise
    return out
