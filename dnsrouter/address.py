"""Socket addresses written ``ip:port`` or ``[ipv6]:port``."""
from __future__ import annotations

import functools
import ipaddress
import socket
from typing import NamedTuple

_CACHED = 4096  # addresses; far more than a router's live backends


class Address(NamedTuple):
    host: str  # a literal IP, normalised (so equal addresses compare equal)
    port: int

    # The packet path asks these for every query: each is computed once per
    # address and then looked up. Bounded: backends come and go, and a
    # router that runs for months must not keep every one it ever saw.
    @property
    def family(self) -> int:
        return _family(self)

    @property
    def sockaddr(self) -> tuple:
        """The address as ``recvfrom`` reports it, for exact comparison."""
        return _sockaddr(self)

    def __str__(self) -> str:
        return _text(self)


@functools.lru_cache(maxsize=_CACHED)
def _family(address: Address) -> int:
    return socket.AF_INET6 if ":" in address.host else socket.AF_INET


@functools.lru_cache(maxsize=_CACHED)
def _sockaddr(address: Address) -> tuple:
    if _family(address) == socket.AF_INET6:
        return (address.host, address.port, 0, 0)
    return (address.host, address.port)


@functools.lru_cache(maxsize=_CACHED)
def _text(address: Address) -> str:
    if _family(address) == socket.AF_INET6:
        return f"[{address.host}]:{address.port}"
    return f"{address.host}:{address.port}"


def parse_address(text: str) -> Address:
    """Parse ``1.2.3.4:53`` or ``[2001:db8::1]:53``; raise ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [ipv6]:port")
        version = 6
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected ip:port")
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a literal IP address") from None
    if ip.version != version:
        raise ValueError(f"{text!r}: IPv6 addresses are written [addr]:port")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not in 1-65535")
    return Address(str(ip), int(port))
