"""Counters without a lock or a system call per packet.

Every thread counts into a dict of its own; the reporter sums copies of them
(a dict copy is atomic under the GIL) and sends the difference since the
last report. The compiled path's threads also keep counters in C: the
reporter reads their totals the same way (``add``).
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter, defaultdict
from typing import TypeVar

from dnsrouter.control import LATENCY_BUCKETS

from .types import CountKey, CountReader, Counts

Reader = TypeVar("Reader", bound=CountReader)


class Stats:
    def __init__(self) -> None:
        self._threads: list[Counts] = []
        self._readers: list[CountReader] = []
        self._lock = threading.Lock()  # taken per thread start, never per packet
        # Counter's values are typed int; the one float count (latency_sum) sums alike.
        self._last: Counter[CountKey] = Counter()
        self._retired: Counter[CountKey] = Counter()  # counts of threads that have ended

    def for_thread(self) -> Counts:
        """A new thread's own counts, summed into every report from now on."""
        counts: Counts = defaultdict(int)
        with self._lock:
            self._threads.append(counts)
        return counts

    def add(self, reader: Reader) -> Reader:
        """Counts kept elsewhere (the compiled path's, in C), summed into
        every report from now on; ``reader`` is returned, for chaining."""
        with self._lock:
            self._readers.append(reader)
        return reader

    def release(self, counts: Counts) -> None:
        """A short-lived thread is done counting: keep its counts, drop its dict."""
        with self._lock:
            self._threads.remove(counts)
            self._retired.update(counts)

    def delta(self) -> dict[CountKey, float]:
        """Counts since the previous call, as {(name, label): n}."""
        with self._lock:
            copies = [dict(c) for c in self._threads] + [r.snapshot() for r in self._readers]
            total = Counter(self._retired)
        for copy in copies:
            total.update(copy)
        delta: dict[CountKey, float] = {k: v - self._last.get(k, 0) for k, v in total.items()
                                        if v != self._last.get(k, 0)}
        self._last = total
        return delta


def observe_latency(counts: Counts, seconds: float) -> None:
    counts["latency_bucket", bisect_left(LATENCY_BUCKETS, seconds)] += 1
    counts["latency_sum", ""] += seconds
