"""The worker processes: start, feed, watch, replace, stop."""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Callable

from dnsrouter import control

log = logging.getLogger("dnsrouter.supervisor")

# spawn, not fork: the supervisor runs threads (registry, health, metrics),
# and a forked child would inherit their locks in whatever state they were.
_CONTEXT = multiprocessing.get_context("spawn")


class WorkerHandle:
    """One worker slot. Messages to the worker go through a sender thread so
    that a stuck worker (a full pipe) can never block the supervisor; queued
    snapshots collapse to the newest.
    """

    def __init__(self, spec: control.WorkerSpec, target: Callable) -> None:
        self.spec = spec
        parent, child = _CONTEXT.Pipe()
        self.conn = parent
        self.process = _CONTEXT.Process(target=target, args=(spec, child),
                                         name=f"dnsrouter worker {spec.index}")
        self.process.start()
        child.close()  # so the worker sees EOF when we are gone, and we when it is
        self.last_seen = time.monotonic()  # of its last message: the heartbeat
        self.ready = False
        self.ready_at = 0.0
        self.version = -1  # of the snapshot it serves, as its READY and REPORTs say
        self.srtt: dict[str, float] = {}  # its backends' smoothed round trips, from its last REPORT
        self.fast_path: bool | None = None  # its UDP path runs compiled, as its last REPORT says
        self.cache: tuple[int, int] = (0, 0)  # its packet cache's entries and bytes, from its last REPORT
        self._outbox: list[control.ToWorker] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._sender, name=f"to-worker-{spec.index}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def post(self, message: control.ToWorker) -> None:
        with self._cond:
            if isinstance(message, control.NewSnapshot):
                self._outbox = [m for m in self._outbox if not isinstance(m, control.NewSnapshot)]
            self._outbox.append(message)
            self._cond.notify()

    def _sender(self) -> None:
        while True:
            with self._cond:
                while not self._outbox and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                message = self._outbox.pop(0)
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                return  # the worker is gone; its slot is replaced by the main loop

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.conn.close()


def spawn(spec: control.WorkerSpec, target: Callable) -> WorkerHandle:
    return WorkerHandle(spec, target)


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))
