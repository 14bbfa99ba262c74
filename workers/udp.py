"""UDP clients: one receiving thread per listening socket, in batches."""
from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import Callable

from dnsrouter import proxy

from . import mmsg, upstream
from .forwarder import Forwarder
from .types import Counts, Outbox

log = logging.getLogger("dnsrouter.worker")


def _failed() -> None:
    log.exception("query handling failed")


class UdpClient:
    """Where replies to a UDP client go: the socket its query came in on."""

    __slots__ = ("fd", "local", "_proxy")

    def __init__(self, sock: socket.socket) -> None:
        self.fd = sock.fileno()
        self.local: tuple[str, int] = sock.getsockname()[:2]  # the listening address, as the client asked it
        self._proxy: Callable[[bytes], bytes] | None = None

    def send(self, data: bytes, addr: bytes | None, outbox: Outbox | None = None) -> None:
        """To the client at raw address ``addr``: with the batch, or now."""
        assert addr is not None  # a datagram always has its sender; only TCP clients have None
        if outbox is None:
            mmsg.send(self.fd, data, addr)
        else:
            outbox.add(self.fd, data, addr)

    def host(self, addr: bytes | None) -> str:
        assert addr is not None
        return mmsg.host(addr)

    def proxy_header(self, addr: bytes | None, stream: bool = False) -> bytes:
        assert addr is not None
        if self._proxy is None:  # packed once per socket; per datagram only the source is copied
            self._proxy = proxy.sockaddr_prefix_for(self.local)
        return self._proxy(addr)


def serve(sock: socket.socket, forwarder: Forwarder, counts: Counts, stopping: threading.Event) -> None:
    """Forward every datagram of ``sock`` until the socket is shut down."""
    if forwarder.fast is not None:  # the same, compiled (workers/_fastpath.pyx)
        counters = forwarder.stats.add(forwarder.fast.Counters())
        # The upstream sockets Forwarder.start left to us: served here too, one thread for both sides
        adopted = forwarder.adopt()
        left = forwarder.fast.serve(sock, forwarder, counts, counters, stopping, UdpClient(sock), _failed,
                                    upstream.replies(adopted))
        if left:  # the replies to queries still in flight, and to later retries, go on coming
            threading.Thread(target=upstream.serve_together, args=(left,), name="upstream", daemon=True).start()
        return
    receive = mmsg.Receiver(sock).receive
    handle = forwarder.handle
    client = UdpClient(sock)
    outbox = mmsg.Outbox()
    while True:
        try:
            batch = receive()
        except OSError as e:
            if e.errno != errno.EINTR and stopping.is_set():
                return
            continue
        for data, addr in batch:
            if not data and stopping.is_set():
                outbox.flush()
                return  # shutdown(SHUT_RD) reads empty once the queue is drained
            handle(data, addr, client, counts, outbox=outbox)
        outbox.flush()
