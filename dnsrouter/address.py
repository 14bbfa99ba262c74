"""Socket addresses written ``ip:port`` or ``[ipv6]:port``."""
from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple


class Address(NamedTuple):
    host: str  # a literal IP, normalised (so equal addresses compare equal)
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def sockaddr(self) -> tuple:
        """The address as ``recvfrom`` reports it, for exact comparison."""
        if self.family == socket.AF_INET6:
            return (self.host, self.port, 0, 0)
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


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
