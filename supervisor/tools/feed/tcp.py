"""DNS messages over TCP (RFC 1035, 4.2.2: each after its length in two octets)."""
from __future__ import annotations

import socket
import struct


def read_message(sock: socket.socket) -> bytes | None:
    """The next message; None when the peer closed the connection (at a message's end or within one)."""
    head = _read(sock, 2)
    return None if head is None else _read(sock, struct.unpack("!H", head)[0])


def framed(wire: bytes) -> bytes:
    """A message as it goes on a TCP connection."""
    return struct.pack("!H", len(wire)) + wire


def _read(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
