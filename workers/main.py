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
from typing import Any, NoReturn, TypeAlias

import setproctitle

from dnsrouter import control, logs
from dnsrouter.snapshot import Snapshot

from . import acl, fastpath, tcp, udp
from .forwarder import ClientAddress, Forwarder
from .stats import Stats

log = logging.getLogger("dnsrouter.worker")

# The pipe to the supervisor carries (tag, payload) both ways (dnsrouter.control).
# Any: a payload's type depends on its tag (bytes, a dict of settings, None).
# A string: Connection is generic to type checkers only.
_Pipe: TypeAlias = "Connection[tuple[str, object], tuple[str, Any]]"


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
        self.fast, why = fastpath.load(spec.fast_path)
        log.debug("worker %d: fast path %s", spec.index, why)
        self.forwarder = Forwarder(spec.forward_timeout, self.stats, spec.max_in_flight,
                                   acl.make(spec.allow), spec.deny_action, spec.retry_min,
                                   tcp_fetches=spec.tcp_fetches,
                                   client_address=ClientAddress(spec.client_address, spec.proxy_tcp,
                                                                spec.ecs_ipv4_prefix, spec.ecs_ipv6_prefix,
                                                                spec.ecs_override),
                                   fast=self.fast)
        self.forwarder.query_log = spec.log_queries
        self.snapshot: Snapshot | None = None
        self.udp_threads: list[threading.Thread] = []

    def send(self, tag: str, payload: object) -> None:
        with self.send_lock:
            try:
                self.conn.send((tag, payload))
            except (OSError, ValueError):
                pass  # the supervisor is gone; the control loop will notice

    def _report(self) -> None:
        self.send(control.REPORT, {"delta": self.stats.delta(), "version": self.forwarder.version,
                                   "srtt": self.forwarder.srtts(), "fast_path": int(self.fast is not None)})

    def _send_evidence(self) -> None:
        """Unanswered tries and ICMP errors since the last call, one message
        for every backend: never a message per query."""
        forwarder = self.forwarder
        if forwarder.evidence:
            evidence, forwarder.evidence = forwarder.evidence, {}
            self.send(control.EVIDENCE, {str(b): streak for b, streak in evidence.items()})

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
                             args=(sock, self.forwarder, self.stats, self.stopping, spec.tcp_connections,
                                   spec.tcp_idle_timeout, spec.tcp_output_limit, writer),
                             daemon=True).start()
        threading.Thread(target=self._reporter, name="reporter", daemon=True).start()
        self.send(control.READY, self.forwarder.version)

    def control_loop(self) -> None:
        """Apply what the supervisor says until it says stop or disappears."""
        serving = False
        while True:
            try:
                tag, payload = self.conn.recv()
            except (EOFError, OSError):
                log.warning("supervisor gone, worker %d exits", self.spec.index)
                raise SystemExit(control.EXIT_OK)
            if tag == control.SNAPSHOT:
                snapshot = Snapshot.from_wire(payload, self.snapshot)
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
            elif tag == control.SETTINGS:
                self.forwarder.timeout = payload["forward_timeout"]
                self.forwarder.retry_min = payload["retry_min"]
                self.forwarder.query_log = payload["log_queries"]
                logging.getLogger().setLevel(payload["log_level"].upper())
            elif tag == control.REOPEN_LOGS:
                logs.reopen()
            elif tag == control.STOP:
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
    logs.setup(spec.log_target, spec.log_level, f"worker {spec.index}")
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
        worker.send(control.BOOT_FAILED, f"worker {spec.index} failed to start: {e}")
        raise SystemExit(control.EXIT_BOOT_FAILED)
    try:
        worker.control_loop()
    except _Stop:
        pass
    worker.drain()
    raise SystemExit(control.EXIT_OK)
