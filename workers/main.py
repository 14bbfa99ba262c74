"""A worker process: the packet path and nothing else.

The supervisor starts it with ``run`` (the one entry point) through the
``spawn`` start method, handing it already-bound sockets and one end of a
pipe. The worker leaves when that pipe closes: the supervisor is gone.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from types import FrameType
from typing import NoReturn, TypeAlias

import setproctitle

from dnsrouter import control, logs
from dnsrouter.snapshot import Snapshot

from . import fastpath, live, tcp, udp
from .forwarder import Forwarder
from .stats import Stats

log = logging.getLogger("dnsrouter.worker")

# The pipe to the supervisor carries the messages of dnsrouter.control.
# A string: Connection is generic to type checkers only.
_Pipe: TypeAlias = "Connection[control.FromWorker, control.ToWorker]"


class _Stop(Exception):
    """SIGTERM: leave the control loop and drain."""


_LIBC = ctypes.CDLL(None, use_errno=True)


def _trim() -> None:
    """malloc_trim(0): free heap pages back to the kernel (a big snapshot's
    JSON leaves megabytes that glibc would otherwise keep)."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass  # not glibc


def _die_with_parent() -> None:
    # Belt and braces beside the pipe: the kernel kills us when the
    # supervisor dies, even if a thread of ours is stuck.
    try:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except AttributeError:
        pass


class Worker:
    def __init__(self, spec: control.WorkerSpec, conn: _Pipe) -> None:
        self.spec = spec
        self.conn = conn
        self.send_lock = threading.Lock()
        self.stats = Stats()
        self.stopping = threading.Event()
        self.fast, why = fastpath.load(spec.config.server_fast_path)
        log.info("worker %d: fast path %s", spec.index, why)  # the operator sees which path serves
        self.forwarder = Forwarder(spec.config, self.stats, self.fast, spec.purges, spec.limits, spec.rrl)
        self.snapshot: Snapshot | None = None
        self.udp_threads: list[threading.Thread] = []

    def send(self, message: control.FromWorker) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                pass  # the supervisor is gone; the control loop will notice

    def _report(self) -> None:
        cache = self.forwarder.cache
        self.send(control.Report(delta=self.stats.delta(), version=self.forwarder.version,
                                 srtt=self.forwarder.srtts(), fast_path=self.fast is not None,
                                 cache=(cache.entries, cache.bytes) if cache is not None else (0, 0)))

    def _send_evidence(self) -> None:
        """Unanswered tries and ICMP errors since the last call, one message
        for every backend: never a message per query."""
        forwarder = self.forwarder
        if forwarder.evidence:
            evidence, forwarder.evidence = forwarder.evidence, {}
            self.send(control.Evidence({str(b): streak for b, streak in evidence.items()}))

    def _reporter(self) -> None:
        next_report = time.monotonic() + control.REPORT_INTERVAL
        while not self.stopping.is_set():
            time.sleep(control.EVIDENCE_INTERVAL)
            self._send_evidence()
            if time.monotonic() >= next_report:
                next_report += control.REPORT_INTERVAL
                self._report()

    def boot(self) -> None:
        spec = self.spec
        setproctitle.setproctitle(f"dnsrouter: worker {spec.index}")
        if spec.cpu is not None:
            os.sched_setaffinity(0, {spec.cpu})
        self.forwarder.start(adopted=bool(spec.udp_sockets))

    def serve(self) -> None:
        spec = self.spec
        config = spec.config
        for sock in spec.udp_sockets:
            thread = threading.Thread(target=udp.serve, name="udp",
                                      args=(sock, self.forwarder, self.stats.for_thread(), self.stopping),
                                      daemon=True)
            thread.start()
            self.udp_threads.append(thread)
        if spec.tcp_sockets:
            writer = tcp.Writer()  # one for every listener: the worker's one thread that may wait on clients
            writer.start()
        for sock in spec.tcp_sockets:
            threading.Thread(target=tcp.serve, name="tcp-accept",
                             args=(sock, self.forwarder, self.stats, self.stopping, config, writer),
                             daemon=True).start()
        threading.Thread(target=self._reporter, name="reporter", daemon=True).start()
        self.send(control.Ready(self.forwarder.version))

    def control_loop(self) -> None:
        """Apply what the supervisor says until it says stop or disappears."""
        serving = False
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                log.warning("supervisor gone, worker %d exits", self.spec.index)
                raise SystemExit(control.EXIT_OK)
            if isinstance(message, control.NewSnapshot):
                snapshot = Snapshot.from_wire(message.wire, self.snapshot)
                self.forwarder.apply(snapshot)
                self.snapshot = snapshot
                # The routes live until the next snapshot: freeze them out of the
                # cyclic GC's sight, so its collections do not rescan them.
                gc.collect()
                gc.freeze()
                _trim()  # give the decoding's garbage back to the system
                if not serving:  # answer nothing before the first routes are known
                    self.serve()
                    serving = True
            elif isinstance(message, control.NewConfig):
                effective = live.apply(message.config, self.forwarder)
                log.debug("worker %d: settings applied", self.spec.index)
                self.send(control.ConfigApplied(effective, {n: getattr(message.config, n) for n in effective}))
            elif isinstance(message, control.ReopenLogs):
                logs.reopen()
            elif isinstance(message, control.Stop):
                return

    def drain(self) -> None:
        """Stop reading clients, let in-flight queries finish (bounded), leave."""
        self.stopping.set()
        for sock in self.spec.udp_sockets + self.spec.tcp_sockets:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + 2 * self.forwarder.timeout + 0.5
        # First the datagrams already queued on the sockets: each UDP thread
        # forwards them and returns at the empty read. Then their replies.
        for thread in self.udp_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        while self.forwarder.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._send_evidence()
        self._report()


def run(spec: control.WorkerSpec, conn: _Pipe) -> NoReturn:
    """The worker's entry point (the target of its Process); exits with a
    ``control.EXIT_*`` code."""
    logs.setup(spec.config.log_target, spec.config.log_level, f"worker {spec.index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group; the supervisor decides

    def on_term(signum: int, frame: FrameType | None) -> NoReturn:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    _die_with_parent()
    worker = Worker(spec, conn)
    try:
        worker.boot()
    except Exception as e:
        log.error("worker %d failed to start: %s", spec.index, e)
        worker.send(control.BootFailed(f"worker {spec.index} failed to start: {e}"))
        raise SystemExit(control.EXIT_BOOT_FAILED)
    try:
        worker.control_loop()
    except _Stop:
        pass
    worker.drain()
    raise SystemExit(control.EXIT_OK)
