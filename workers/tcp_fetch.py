"""Queries to a backend over TCP, for replies that came back truncated.

A reply that says TC is fetched again over TCP, off the upstream socket's
thread (which relays everyone's replies), by a bounded pool: a burst of
truncated answers must not become a burst of threads and connections.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
from typing import Callable, Generic, TypeVar

from dnsrouter.address import Address

from .stats import Stats
from .types import Counts

log = logging.getLogger("dnsrouter.worker")

T = TypeVar("T")

# How many fetches may wait per fetch running (default 32 running, 512
# waiting). A waiting fetch waits for the ones ahead of it: behind 16 rounds
# of the pool, a few milliseconds each while the backend is well, it is still
# answered in time. When the backend is slow, fetches take up to the forward
# timeout each, the wait would outlast any client's patience, and the pool
# stops taking more: those queries get SERVFAIL at once (a resolver retries
# elsewhere) instead of an answer nobody waits for. Waiting costs only the
# query's entry, never a thread or a socket.
BACKLOG_PER_FETCH = 16


class Fetches(Generic[T]):
    """At most ``size`` fetches at once, ``BACKLOG_PER_FETCH * size`` more
    waiting their turn; ``fetch(job, counts)`` runs each on a pool thread.

    A SimpleQueue and daemon threads (standard library), not
    concurrent.futures.ThreadPoolExecutor: that one joins its threads at exit,
    so a leaving worker would wait for every queued fetch to a dead backend,
    and each job would cost a Future that nobody reads.
    """

    def __init__(self, size: int, stats: Stats, fetch: Callable[[T, Counts], None]) -> None:
        self._size = size
        self._limit = size + BACKLOG_PER_FETCH * size
        self._stats = stats
        self._fetch = fetch
        self._jobs: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._lock = threading.Lock()  # per fetch, never per packet: fetches are the rare case
        self._threads = 0  # started so far; they never leave, so never more than size
        self._busy = 0  # jobs waiting or running

    def submit(self, job: T) -> bool:
        """Queue ``job``; False, and nothing done, when too many wait already."""
        with self._lock:
            if self._busy >= self._limit:
                return False
            self._busy += 1
            # Threads only as the load needs them: one per job up to size.
            start = self._threads < min(self._busy, self._size)
            if start:
                self._threads += 1
        if start:
            threading.Thread(target=self._serve, name="tcp-fetch", daemon=True).start()
        self._jobs.put(job)
        return True

    def _serve(self) -> None:
        counts = self._stats.for_thread()  # never released: the thread lives as long as the worker
        get = self._jobs.get
        while True:
            job = get()
            try:
                self._fetch(job, counts)
            except Exception:  # a bug must cost one query, never a pool thread
                counts["dropped", "error"] += 1
                log.exception("TCP fetch failed")
            finally:
                with self._lock:
                    self._busy -= 1


def exchange(backend: Address, query: bytes, timeout: float, prefix: bytes = b"") -> bytes:
    """Send ``query`` (under a fresh ID, after ``prefix``: a PROXY header)
    and return the reply with that ID.

    Raises OSError on network trouble or timeout, ValueError on a reply that
    is not the answer to this query.
    """
    uid = os.urandom(2)
    with socket.create_connection((backend.host, backend.port), timeout=timeout) as sock:
        sock.sendall(prefix + struct.pack("!H", len(query)) + uid + query[2:])
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
