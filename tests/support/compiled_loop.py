"""A worker's compiled UDP loop, in a thread of the test's own process."""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Iterator

import pytest

from dnsrouter.workers import udp
from dnsrouter.workers.forwarder import Forwarder
from support.net import HOST, wait_until


@contextlib.contextmanager
def serving(forwarder: Forwarder) -> Iterator[socket.socket]:
    """``udp.serve`` for ``forwarder`` (made with the compiled module) on a
    listening socket of 127.0.0.1, which it yields; the loop serves the
    IPv4 upstream sockets too, as a worker's first udp thread does. After
    the block: the socket shut down, the loop ended, the upstreams closed."""
    forwarder.start(adopted=True)
    stopping = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listening:
        listening.bind((HOST, 0))
        thread = threading.Thread(target=udp.serve, args=(listening, forwarder, forwarder.stats.for_thread(),
                                                          stopping), daemon=True)
        thread.start()
        upstreams = forwarder.upstreams[socket.AF_INET]
        try:
            yield listening
        finally:
            stopping.set()
            with pytest.raises(OSError):  # ENOTCONN for a UDP socket, which is shut down all the same
                listening.shutdown(socket.SHUT_RD)
            thread.join(2)
            for upstream in upstreams:
                upstream.close()
            wait_until(lambda: all(u.sock.fileno() == -1 for u in upstreams), 2,
                       message="the upstream sockets were not closed")
    assert not thread.is_alive()
