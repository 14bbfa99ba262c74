"""One query to a backend over TCP, for replies that came back truncated."""
from __future__ import annotations

import os
import socket
import struct

from dnsrouter.address import Address


def exchange(backend: Address, query: bytes, timeout: float) -> bytes:
    """Send ``query`` (under a fresh ID) and return the reply with that ID.

    Raises OSError on network trouble or timeout, ValueError on a reply that
    is not the answer to this query.
    """
    uid = os.urandom(2)
    with socket.create_connection((backend.host, backend.port), timeout=timeout) as sock:
        sock.sendall(struct.pack("!H", len(query)) + uid + query[2:])
        length = struct.unpack("!H", _read(sock, 2))[0]
        reply = _read(sock, length)
    if len(reply) < 12 or reply[:2] != uid or not reply[2] & 0x80:
        raise ValueError("TCP reply does not answer the query")
    return reply


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("backend closed the TCP connection")
        data += chunk
    return data
