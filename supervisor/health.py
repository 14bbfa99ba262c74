"""Health checks: every backend asked ``id.server. CH TXT`` over TCP.

All checks run as asyncio tasks in one thread of the supervisor, one task
per backend, so a slow or silent backend delays nobody else. A backend
goes down after ``fall`` failures in a row (active checks, or forwarding
timeouts reported by the workers) and comes back after ``rise`` successful
checks in a row. A new backend is checked at once and takes queries from
its first successful check.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import dns.asyncquery
import dns.exception
import dns.message
import dns.rdataclass
import dns.rdatatype

from dnsrouter.address import Address

log = logging.getLogger("dnsrouter.health")


@dataclass
class HealthSettings:
    interval: float
    timeout: float
    fall: int
    rise: int


@dataclass
class BackendState:
    up: bool = False
    checked: bool = False  # False until the first check ended
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    latency: float | None = None  # of the last successful check, seconds
    reason: str = "not checked yet"
    since: float = field(default_factory=time.time)


def health_query() -> dns.message.Message:
    return dns.message.make_query("id.server.", dns.rdatatype.TXT, dns.rdataclass.CH)


class HealthChecker:
    def __init__(self, settings: HealthSettings,
                 on_change: Callable[[frozenset[Address], frozenset[Address]], None]) -> None:
        # on_change gets the backends that are up and those that have had
        # their first check, from the health thread, in one call: a reader that
        # saw one without the other could serve a checked backend as down.
        self.settings = settings
        self.states: dict[Address, BackendState] = {}
        self._on_change = on_change
        self._tasks: dict[Address, asyncio.Task] = {}
        self._wakeup = asyncio.Event()  # set (and replaced) when the settings change
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="health", daemon=True)

    # -- called from the supervisor's main loop --------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more checks (the supervisor is stopping): the tasks end first,
        so that none is left pending in a stopped loop (asyncio logs those)."""
        if not self._thread.is_alive():
            return
        done = asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop)
        try:
            done.result(timeout=2)
        except Exception:  # a check stuck past its timeout: stop anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def set_backends(self, backends: Iterable[Address]) -> None:
        backends = frozenset(backends)
        self._loop.call_soon_threadsafe(self._set_backends, backends)

    def configure(self, settings: HealthSettings) -> None:
        # Set here, not on the health thread: the supervisor reads back the
        # settings in use as soon as this returns. The tasks read them at each use.
        self.settings = settings
        self._loop.call_soon_threadsafe(self._wake)

    def passive_failures(self, backend: Address, streak: int) -> None:
        """A worker saw ``streak`` unanswered tries or ICMP errors in a row for ``backend``."""
        self._loop.call_soon_threadsafe(self._passive, backend, streak)

    def up(self) -> frozenset[Address]:
        return frozenset(b for b, s in list(self.states.items()) if s.up)

    def checked(self) -> frozenset[Address]:
        return frozenset(b for b, s in list(self.states.items()) if s.checked)

    # -- the health thread ----------------------------------------------------
    def _wake(self) -> None:
        # Wake every task from its sleep: a shorter interval applies now,
        # not after the longer one runs out.
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _set_backends(self, backends: frozenset[Address]) -> None:
        for backend in set(self._tasks) - backends:
            self._tasks.pop(backend).cancel()
            self.states.pop(backend, None)
        for backend in backends - set(self._tasks):
            self.states[backend] = BackendState()
            self._tasks[backend] = self._loop.create_task(self._watch(backend))

    async def _watch(self, backend: Address) -> None:
        while True:
            ok, reason, latency = await self._check(backend)
            self._record(backend, ok, reason, latency)
            # A little jitter keeps thousands of checks from firing in step.
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.settings.interval * random.uniform(0.9, 1.1))
            except asyncio.TimeoutError:
                pass

    async def _check(self, backend: Address) -> tuple[bool, str, float | None]:
        started = time.monotonic()
        try:
            # dnspython checks the reply's ID and question (BadResponse otherwise).
            await dns.asyncquery.tcp(health_query(), backend.host, port=backend.port,
                                     timeout=self.settings.timeout)
        except dns.exception.Timeout:
            return False, "check timed out", None
        except (dns.exception.DNSException, OSError, EOFError, ValueError) as e:
            return False, f"check failed: {type(e).__name__}: {e}".rstrip(": "), None
        return True, "check passed", time.monotonic() - started

    def _record(self, backend: Address, ok: bool, reason: str, latency: float | None) -> None:
        state = self.states.get(backend)
        if state is None:
            return  # deregistered while the check ran
        first = not state.checked
        state.checked = True
        if ok:
            state.successes += 1
            state.failures = 0
            state.latency = latency
            if not state.up and (first or state.successes >= self.settings.rise):
                self._change(backend, state, True, reason, "new" if first else "down")
        else:
            state.failures += 1
            state.successes = 0
            if state.up and state.failures >= self.settings.fall:
                self._change(backend, state, False, f"{state.failures} failed checks, last: {reason}", "up")
            elif first:
                state.reason = reason
                log.warning("backend %s: new -> down (%s)", backend, reason)
                self._on_change(self.up(), self.checked())  # not up, but checked: the supervisor waits for that

    def _passive(self, backend: Address, streak: int) -> None:
        state = self.states.get(backend)
        if state is not None and state.up and streak >= self.settings.fall:
            state.successes = 0
            self._change(backend, state, False, f"{streak} forwarded queries unanswered or unreachable in a row", "up")

    def _change(self, backend: Address, state: BackendState, up: bool, reason: str, old: str) -> None:
        state.up, state.reason, state.since = up, reason, time.time()
        # Losing a backend is news for the operator; gaining one is routine.
        log.log(logging.INFO if up else logging.WARNING, "backend %s: %s -> %s (%s)",
                backend, old, "up" if up else "down", reason)
        self._on_change(self.up(), self.checked())
