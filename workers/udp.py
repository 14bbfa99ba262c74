"""UDP clients: one blocking receive loop per listening socket."""
from __future__ import annotations

import socket


class UdpClient:
    """Where replies to a UDP client go: the socket its query came in on."""

    __slots__ = ("sendto",)

    def __init__(self, sock: socket.socket) -> None:
        self.sendto = sock.sendto

    def send(self, data: bytes, addr) -> None:
        try:
            self.sendto(data, addr)
        except OSError:
            pass  # the client is gone or the buffer full: as if lost on the way


def serve(sock: socket.socket, forwarder, counts, stopping) -> None:
    """Forward every datagram of ``sock`` until the socket is shut down."""
    # One buffer for every datagram, copied out at its real size: recvfrom(65535)
    # would malloc and shrink 64 KiB per packet, which fragments the heaps of
    # the worker's threads (about 8 MB of RSS under load).
    buffer = bytearray(65535)
    view = memoryview(buffer)
    recvfrom_into = sock.recvfrom_into
    handle = forwarder.handle
    client = UdpClient(sock)
    while True:
        try:
            size, addr = recvfrom_into(buffer)
        except OSError:
            if stopping.is_set():
                return
            continue
        if not size and stopping.is_set():
            return  # shutdown(SHUT_RD) wakes us with an empty read once drained
        handle(bytes(view[:size]), addr, client, counts)
