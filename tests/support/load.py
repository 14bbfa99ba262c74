"""Client load for tests that change something while queries flow (failover, reload)."""
from __future__ import annotations

import threading
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode

from support.net import HOST


class Load:
    """Queries at a steady rate from a few threads; counts what clients would see fail.

    A closed loop: each thread waits for its answer (``timeout`` seconds at
    most, one try: a resolver's patience is a fraction of a second) before
    the next query, so a failure is what one client would have seen.
    """

    def __init__(self, port: int, names: list[str], rate: int = 300, threads: int = 4,
                 timeout: float = 3.0) -> None:
        self.port, self.names, self.interval = port, names, threads / rate
        self.timeout = timeout
        self.sent = 0
        self.failures: list[str] = []  # what each failed query saw, for the assertion message
        self.latencies: list[float] = []  # seconds each answered query took, in completion order
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        i = index
        next_at = time.monotonic()
        while not self.stop.is_set():
            name = self.names[i % len(self.names)]
            i += len(self.threads)
            started = time.monotonic()
            try:
                reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=self.port,
                                       timeout=self.timeout)
                failure = None if reply.rcode() == dns.rcode.NOERROR and reply.answer else \
                    dns.rcode.to_text(reply.rcode())
            except dns.exception.DNSException as e:
                failure = type(e).__name__
            took = time.monotonic() - started
            with self.lock:
                self.sent += 1
                if failure is None:
                    self.latencies.append(took)
                if failure:
                    self.failures.append(f"{name} at {started:.3f}: {failure} after {time.monotonic() - started:.3f} s")
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
