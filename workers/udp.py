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
    recvfrom = sock.recvfrom
    handle = forwarder.handle
    client = UdpClient(sock)
    while True:
        try:
            data, addr = recvfrom(65535)
        except OSError:
            if stopping.is_set():
                return
            continue
        if not data and stopping.is_set():
            return  # shutdown(SHUT_RD) wakes us with an empty read once drained
        handle(data, addr, client, counts)
