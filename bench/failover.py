#!/usr/bin/env python3
"""Failover: what clients see when one member of a pool fails, or clients misbehave, under load.

Every scenario builds the same setup afresh: two knotd serve the SAME zone
(a.example.com., from make_split_zone) and form one pool (two route files
with the same regexp, file registry --routes-dir), dnsrouter in front with
its default health and forward settings (workers as below, --metrics for
/routes and /metrics). All of it on 127.0.0.1 only.

Resolver scenarios (``--scenarios kill,stop,slow-tcp``, the default)
--------------------------------------------------------------------

Six clients (processes by default, --clients threads for threads; see
bench/README.md for why) behave like a resolver on a LAN: one query at a
time, a single try with the scenario's timeout, from a fresh socket (a new
source port, as a resolver's port randomization gives, so SO_REUSEPORT
spreads them over the workers), at --qps (300) in total, for --before (5)
seconds, then the fault, then --after (5) seconds. A query not answered in
time fails, and so does any answer other than NOERROR with records
(SERVFAIL above all). Bounded: each client stops at the end of its schedule,
and at most qps * (before + after) queries are sent.

* kill (client timeout 200 ms): SIGKILL of one knotd (KnotServer.kill());
  the kernel answers its port with ICMP port unreachable.
* stop (400 ms): SIGSTOP of one knotd, silent (its sockets stay open, no
  ICMP); SIGCONT after the run, always (also on Ctrl-C or error).
* slow-tcp (1 s): --slow-readers (16) TCP connections to the router, each
  sending --pipeline (300) queries at once for big.a.example.com. TXT (60
  strings of 200 characters: an answer of about 13 KB, fetched by the router over
  TCP after Knot's truncated UDP reply) and never reading a byte. The router
  runs with --workers 1 here, so the six UDP clients share their worker with
  all sixteen (the worst case); kill and stop use --workers 2 (this 2-CPU
  machine's default, auto).

Each scenario prints its setup, the outcomes before and after the fault
(failed of sent, by kind, p50/p99/max latency of the answered queries), when
/routes showed the faulty member down (kill, stop) or when the router cut the
slow readers off (slow-tcp), the router's counters, and at the end the table
of the issue:

    | fault | client timeout | failed |

dnsperf-kill: the older run
---------------------------

``--scenarios dnsperf-kill``: dnsperf sends names of the zone at --rate
(2000) qps, 8 client sockets, dnsperf's own 3 s timeout:

    dnsperf -s 127.0.0.1 -p PORT -d NAMES -Q RATE -l 5+SECONDS -t 3 -c 8 -q OUTSTANDING -v

Two runs on the same router (2 workers): control (both backends alive),
then kill (5 s after dnsperf starts, one knotd gets SIGKILL; dnsperf goes on
for --seconds more). For each: dnsperf's totals, client-visible failures =
lost + SERVFAIL (+ any other non-NOERROR code), and a table per second by
send time (arrival of dnsperf's -v line, under stdbuf -oL, minus latency).

    .venv/bin/python bench/failover.py [--scenarios kill,stop,slow-tcp] [--before 5] [--after 5]
    .venv/bin/python bench/failover.py --scenarios dnsperf-kill [--rate 2000] [--seconds 10]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import math
import multiprocessing
import os
import queue
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import dns.message
import psutil

from common import (Interrupted, bench_router, command_line, dnsperf_argv, finish_router, handle_signals, ignore_signals,
                    parse_dnsperf, percentile, start_router, verbose_line)
from support import metrics
from support.knot import KnotServer
from support.net import HOST, answered, free_port, wait_until
from support.processes import die_with_parent, spawn, stop
from support.router import Router
from support.zones import SplitZone, make_split_zone

ZONE = "a.example.com."
REGEXP = r"^(h[0-9]+|big)\.a\.example\.com\.$"
BIG_TXT_COUNT = 60  # big.a.example.com.: 60 TXT strings of 200 characters, an answer of about 13 KB

# -- the resolver scenarios ---------------------------------------------------

CLIENTS = 6
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
TIMEOUT = "timeout"  # the outcome of a query not answered within the client's timeout
POLL = 0.05  # seconds between two looks at /routes and the slow readers while the clients run


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str  # as in the table
    timeout: float  # the clients' patience (one try)
    workers: int  # of the router


SCENARIOS = {
    "kill": Scenario("kill", "one member SIGKILLed", 0.2, 2),
    "stop": Scenario("stop", "one member SIGSTOPped (silent, no ICMP)", 0.4, 2),
    "slow-tcp": Scenario("slow-tcp", "16 TCP clients pipelining queries and never reading", 1.0, 1),
}


@dataclass(frozen=True)
class Outcome:
    sent: float  # time.monotonic() when the query left (the clock is the machine's: the same in every process)
    result: str  # NOERROR (with an answer), another rcode, NODATA (NOERROR without one), timeout, or an error
    latency: float | None  # seconds, for a reply in time

    @property
    def failed(self) -> bool:
        return self.result != "NOERROR"


def resolver(index: int, port: int, queries: list[bytes], timeout: float, qps: float, duration: float,
             barrier: threading.Barrier, stopping: threading.Event) -> list[Outcome]:
    """One client: a query at a time, one try each, paced at qps / CLIENTS, for ``duration`` seconds.

    All clients leave the barrier together (with the orchestrator, whose
    clock then marks the start); client i starts i/CLIENTS of an interval
    late, so the queries of all clients are evenly spread. A query that
    takes longer than the interval delays the next one (no catch-up burst).
    """
    interval = CLIENTS / qps
    out: list[Outcome] = []
    barrier.wait(60)
    start = time.monotonic()
    end = start + duration
    next_at = start + index * interval / CLIENTS
    i = index
    while not stopping.is_set():
        delay = next_at - time.monotonic()
        if delay > 0 and stopping.wait(delay):  # pacing: the schedule, not a condition to poll
            break
        if next_at >= end:
            break
        wire = queries[i % len(queries)]
        i += CLIENTS
        qid = struct.pack("!H", random.getrandbits(16))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((HOST, port))
            sent = time.monotonic()
            s.send(qid + wire[2:])
            out.append(one_reply(s, qid, sent, sent + timeout))
        next_at = max(next_at + interval, time.monotonic())
    return out


def one_reply(s: socket.socket, qid: bytes, sent: float, deadline: float) -> Outcome:
    """The Outcome of the query with ID ``qid`` sent at ``sent`` on ``s``: its reply by ``deadline``, or none."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Outcome(sent, TIMEOUT, None)
        s.settimeout(remaining)
        try:
            reply = s.recv(65535)
        except socket.timeout:
            continue
        except OSError as e:  # ECONNREFUSED: ICMP port unreachable from the router's port
            return Outcome(sent, type(e).__name__, None)
        latency = time.monotonic() - sent
        if len(reply) < 12 or reply[:2] != qid:
            continue
        rcode = RCODES.get(reply[3] & 0xF, f"RCODE{reply[3] & 0xF}")
        if rcode == "NOERROR" and reply[6:8] == b"\0\0":
            rcode = "NODATA"
        return Outcome(sent, rcode, latency)


def _resolver_thread(results: queue.Queue, index: int, *args: object) -> None:
    try:
        results.put((index, resolver(index, *args)))
    except BaseException as e:  # noqa: BLE001 - reported by the orchestrator
        results.put((index, e))


def _resolver_process(results: multiprocessing.Queue, index: int, *args: object) -> None:
    """A client process: it dies with the orchestrator, and leaves Ctrl-C
    (sent to the whole terminal process group) to the orchestrator, which
    stops it through ``stopping``."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _resolver_thread(results, index, *args)


class Clients:
    """CLIENTS resolvers (threads or processes) measuring one scenario; start() returns their common start time."""

    def __init__(self, kind: str, port: int, queries: list[bytes], timeout: float, qps: float,
                 duration: float) -> None:
        self.kind = kind
        self.duration, self.timeout = duration, timeout
        if kind == "processes":
            ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
            self.barrier, self.stopping, self.results = ctx.Barrier(CLIENTS + 1), ctx.Event(), ctx.Queue()
            target, make = _resolver_process, ctx.Process
        else:
            self.barrier, self.stopping, self.results = threading.Barrier(CLIENTS + 1), threading.Event(), queue.Queue()
            target, make = _resolver_thread, threading.Thread
        self.workers = [make(target=target, daemon=True,
                             args=(self.results, i, port, queries, timeout, qps, duration, self.barrier,
                                   self.stopping))
                        for i in range(CLIENTS)]
        self.outcomes: dict[int, list[Outcome]] = {}

    def start(self) -> float:
        for w in self.workers:
            w.start()
        self.barrier.wait(60)  # every client is up (a spawned process takes a few hundred ms)
        return time.monotonic()

    def done(self, timeout: float) -> bool:
        """Collect what the clients have returned, waiting up to ``timeout``; True once all have."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < CLIENTS:
            try:
                index, result = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if isinstance(result, BaseException):
                raise RuntimeError(f"client {index} failed: {result!r}")
            self.outcomes[index] = result
        return True

    def all(self) -> list[Outcome]:
        return sorted((o for out in self.outcomes.values() for o in out), key=lambda o: o.sent)

    def close(self) -> None:
        """Stop the clients early (if they are still running) and wait for them."""
        self.stopping.set()
        self.barrier.abort()  # a client still waiting to start leaves at once
        started = [w for w in self.workers if w.ident is not None]
        deadline = time.monotonic() + 5
        # A process exits only once its results are out of the queue's pipe: read them meanwhile.
        while any(w.is_alive() for w in started) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self.results.get(timeout=0.05)
        for w in started:
            if isinstance(w, multiprocessing.process.BaseProcess) and w.is_alive():
                w.kill()
                w.join(5)


@dataclass
class Phase:
    """The outcomes of the queries sent in one period (before, or since, the fault)."""
    outcomes: list[Outcome]

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.failed for o in self.outcomes)

    @property
    def lost(self) -> int:
        return sum(o.result == TIMEOUT for o in self.outcomes)

    def latencies(self) -> list[float]:
        return sorted(o.latency for o in self.outcomes if o.latency is not None)

    def p99_ms(self) -> float:
        return percentile(self.latencies(), 99.0) * 1000.0

    def describe(self) -> str:
        kinds = collections.Counter(o.result for o in self.outcomes if o.failed)
        lat = self.latencies()
        how = ", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "none"
        return (f"failed {self.failed} of {self.sent} ({how}); answered in time: p50 "
                f"{percentile(lat, 50.0) * 1000:.1f} ms, p99 {percentile(lat, 99.0) * 1000:.1f} ms, "
                f"max {(lat[-1] if lat else math.nan) * 1000:.1f} ms")


def phases(outcomes: list[Outcome], t_fault: float) -> tuple[Phase, Phase]:
    """(before the fault, since the fault), by send time."""
    return (Phase([o for o in outcomes if o.sent < t_fault]), Phase([o for o in outcomes if o.sent >= t_fault]))


def failure_times(outcomes: list[Outcome], t_fault: float) -> str:
    """When the failed queries were sent, in ms relative to the fault, grouped by 100 ms."""
    bins = collections.Counter(math.floor((o.sent - t_fault) * 10) for o in outcomes if o.failed)
    return ", ".join(f"[{b * 100:+d},{(b + 1) * 100:+d}) ms: {n}" for b, n in sorted(bins.items())) or "none"


class Pool:
    """Two knotd serving ZONE in one pool (two route files, same regexp, file
    registry), dnsrouter in front with --metrics; close() stops everything,
    a SIGSTOPped knotd included."""

    def __init__(self, zone: SplitZone, workdir: str, workers: int) -> None:
        self.zone, self.workdir, self.workers = zone, workdir, workers
        self.knots: list[KnotServer] = []
        self.router: Router | None = None
        self.mport = free_port("tcp")

    def start(self) -> "Pool":
        for _ in range(2):
            self.knots.append(KnotServer({ZONE: self.zone.zones[ZONE]}).start())
        self.router = bench_router(self.workdir, workers=self.workers, args=["--metrics", f"{HOST}:{self.mport}"])
        for i, knot in enumerate(self.knots, start=1):
            self.router.route(f"knot{i}", f"{knot.addr},{REGEXP}")
        start_router(self.router, self.both_up, timeout=20, message="the router never had both backends up")
        # /routes is the supervisor's view; the workers follow it shortly after
        wait_until(lambda: answered(self.router.port, self.zone.names[ZONE][0]), timeout=10,
                   message="the router does not answer names of the zone")
        return self

    def up(self) -> dict[str, bool]:
        """Backend address -> up, from /routes; {} while /routes does not answer."""
        try:
            return metrics.backends_up(self.mport)
        except OSError:
            return {}

    def both_up(self) -> bool:
        state = self.up()
        return len(state) == 2 and all(state.values())

    def describe(self) -> list[str]:
        return ["router:  " + shlex.join(self.router.command()),
                "members: " + ", ".join(k.addr for k in self.knots) + f" (knotd, zone {ZONE}, file registry)"]

    def counters(self, udp_queries: int) -> list[str]:
        """The counters that tell what happened, once the workers have
        reported (every second) at least ``udp_queries`` UDP queries."""
        def reported() -> bool:
            return metrics.value(metrics.samples(self.mport), "dnsrouter_queries_total", transport="udp") >= udp_queries
        with contextlib.suppress(AssertionError):
            wait_until(reported, timeout=5, interval=0.1)
        text = metrics.text(self.mport)
        return metrics.lines(text, "dnsrouter_queries_total", "dnsrouter_backend_up", "dnsrouter_backend_timeouts_total",
                             "dnsrouter_backend_retries_total", "dnsrouter_backend_icmp_errors_total",
                             "dnsrouter_backend_late_replies_total", "dnsrouter_responses_total",
                             "dnsrouter_dropped_total", "dnsrouter_tcp_closed_total",
                             "dnsrouter_worker_restarts_total")

    def close(self) -> None:
        for knot in self.knots:
            resume(knot)  # a stopped knotd would sit on its SIGTERM until stop() SIGKILLs it
        finish_router(self.router, "warning", lines=20)
        for knot in self.knots:
            knot.close()


def resume(knot: KnotServer) -> None:
    """SIGCONT; harmless for a knotd that runs or has exited."""
    if knot.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(knot.pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(knot: KnotServer) -> Iterator[None]:
    """knotd SIGSTOPped (seen stopped) for the block, SIGCONTed after it whatever ends it."""
    try:
        os.kill(knot.pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(knot.pid).status() == psutil.STATUS_STOPPED, timeout=5, interval=0.001,
                   message=f"knotd {knot.addr} not stopped")
        yield
    finally:
        resume(knot)


class DownWatch:
    """When /routes first showed ``addr`` down."""

    def __init__(self, pool: Pool, addr: str) -> None:
        self.pool, self.addr = pool, addr
        self.seen: float | None = None

    def poll(self) -> None:
        if self.seen is None and self.pool.up().get(self.addr) is False:
            self.seen = time.monotonic()

    def report(self, t_fault: float) -> str:
        if self.seen is None:
            return f"/routes never showed {self.addr} down during the run"
        return f"/routes showed {self.addr} down {self.seen - t_fault:.2f} s after the fault (polled every {POLL:g} s)"


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info


class SlowReaders:
    """TCP connections to the router that each send ``pipeline`` queries at
    once and never read. Default socket buffers, as a real client has, unless
    ``rcvbuf`` is given: then that receive buffer and 1200-byte segments
    (as tests/test_slow_clients.py), so that the kernel holds little and the
    router's own queue, and its output limit, come into play."""

    def __init__(self, port: int, query: bytes, count: int, pipeline: int, rcvbuf: int = 0) -> None:
        self.port, self.count, self.rcvbuf = port, count, rcvbuf
        self.payload = b"".join(struct.pack("!H", len(query)) + struct.pack("!H", i) + query[2:]
                                for i in range(pipeline))
        self.sockets: list[socket.socket] = []
        self.cut: dict[int, float] = {}  # connection -> when it was first seen closed or reset by the router
        self.unsent = 0  # connections whose queries the router did not take within 2 s

    def start(self) -> None:
        for _ in range(self.count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sockets.append(s)
            if self.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1200)
            s.settimeout(2)
            s.connect((HOST, self.port))
            try:
                s.sendall(self.payload)
            except OSError:
                self.unsent += 1

    def poll(self) -> None:
        now = time.monotonic()
        for i, s in enumerate(self.sockets):
            if i not in self.cut and s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != _TCP_ESTABLISHED:
                self.cut[i] = now

    def report(self, t_fault: float) -> str:
        head = (f"{self.count} connections, each sending {len(self.payload):,} bytes of queries at once"
                + (f" (SO_RCVBUF {self.rcvbuf}, MSS 1200)" if self.rcvbuf else " (default socket buffers)"))
        if not self.cut:
            return head + f"; none cut off by the router during the run (polled every {POLL:g} s)"
        times = sorted(t - t_fault for t in self.cut.values())
        return (head + f"; {len(self.cut)} cut off by the router, {times[0]:.2f}-{times[-1]:.2f} s after they "
                f"started" + (f"; {self.unsent} could not send all their queries" if self.unsent else ""))

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def until(t: float) -> None:
    """Wait for a moment of the schedule (not a condition: nothing to poll)."""
    time.sleep(max(0.0, t - time.monotonic()))


def short_ms(ms: float) -> str:
    """54 (from 10 ms up), 2.3 (below): as the issue's table gives them."""
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


@dataclass
class Row:
    scenario: Scenario
    before: Phase
    after: Phase

    def failed(self) -> str:
        total = Phase(self.before.outcomes + self.after.outcomes)
        return f"{total.failed:,} of {total.sent:,}"

    def cells(self) -> list[str]:
        if self.scenario.name == "slow-tcp":
            lost = self.before.lost + self.after.lost
            what = (f"other UDP clients: {lost} lost, p99 {short_ms(self.after.p99_ms())} ms "
                    f"({short_ms(self.before.p99_ms())} ms before the fault); failed {self.failed()}")
        else:
            what = self.failed()
        return [self.scenario.fault, f"{self.scenario.timeout * 1000:g} ms" if self.scenario.timeout < 1
                else f"{self.scenario.timeout:g} s", what]


def run_scenario(sc: Scenario, zone: SplitZone, workdir: str, args: argparse.Namespace) -> Row:
    """One scenario on a fresh pool: clients for --before s, the fault, --after s more."""
    duration = args.before + args.after
    print(f"== {sc.name}: {sc.fault}; {CLIENTS} clients ({args.clients}), one try each, timeout "
          f"{sc.timeout * 1000:g} ms, {args.qps:g} qps in total, {args.before:g} s + {args.after:g} s")
    queries = [dns.message.make_query(name, "A").to_wire() for name in zone.names[ZONE]]
    pool = Pool(zone, workdir, sc.workers)
    clients: Clients | None = None
    readers: SlowReaders | None = None
    try:
        pool.start()
        for line in pool.describe():
            print("  " + line)
        victim = pool.knots[0]
        watch = DownWatch(pool, victim.addr)
        load = LoadNote()
        clients = Clients(args.clients, pool.router.port, queries, sc.timeout, args.qps, duration)
        t0 = clients.start()
        until(t0 + args.before)
        with contextlib.ExitStack() as fault:
            t_fault = time.monotonic()
            if sc.name == "kill":
                victim.kill()
            elif sc.name == "stop":
                fault.enter_context(frozen(victim))
            else:
                big = dns.message.make_query(zone.big_txt[ZONE], "TXT").to_wire()
                readers = SlowReaders(pool.router.port, big, args.slow_readers, args.pipeline, args.reader_rcvbuf)
                fault.callback(readers.close)
                readers.start()
            print(f"  fault at t={t_fault - t0:.3f} s, applied in {(time.monotonic() - t_fault) * 1000:.1f} ms")
            while not clients.done(POLL):
                if time.monotonic() > t0 + duration + sc.timeout + 30:
                    raise RuntimeError("the clients did not finish in time")
                if readers is not None:
                    readers.poll()
                else:
                    watch.poll()
            # the fault lasts until the clients are done: SIGCONT, sockets closed here
        before, after = phases(clients.all(), t_fault)
        print(f"  before the fault: {before.describe()}")
        print(f"  since the fault:  {after.describe()}")
        print(f"  failed queries by send time relative to the fault: {failure_times(clients.all(), t_fault)}")
        print("  " + (readers.report(t_fault) if readers is not None else watch.report(t_fault)))
        print(load.report())
        print("  router counters:")
        for line in pool.counters(len(clients.all())):
            print("    " + line)
        return Row(sc, before, after)
    finally:
        ignore_signals()  # a second Ctrl-C must not cut the cleanup short
        if clients is not None:
            clients.close()
        if readers is not None:
            readers.close()
        pool.close()
        print()
        handle_signals()


def print_table(rows: list[Row]) -> None:
    print("| fault | client timeout | failed |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def resolver_scenarios(names: list[str], args: argparse.Namespace) -> int:
    zone = make_split_zone(n=300, big_txt_count=BIG_TXT_COUNT)
    workdir = tempfile.mkdtemp(prefix="dnsrouter-failover-")
    rows = []
    try:
        for name in names:
            rows.append(run_scenario(SCENARIOS[name], zone, os.path.join(workdir, name), args))
    finally:
        ignore_signals()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    return 0


# -- dnsperf-kill ------------------------------------------------------------

PRE_KILL = 5.0
DNSPERF_TIMEOUT = 3.0
DNSPERF_CLIENTS = 8
SLOW = 0.1  # answered, but late enough to count separately (the router's 1 s forward timeout, say)


class DnsperfRun:
    """dnsperf -v in the background; every output line stamped with time.monotonic() on arrival."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.lines: list[tuple[float, str]] = []
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float) -> None:
        self.proc.wait(timeout)
        self._reader.join(5)

    def stop(self) -> None:
        stop(self.proc, timeout=5.0)

    def per_query(self) -> list[tuple[float, str, float | None]]:
        """(estimated send time, rcode or 'T', latency) per query."""
        out = []
        for t, line in self.lines:
            parsed = verbose_line(line)
            if parsed is None:
                continue
            code, lat = parsed
            if code == "T":
                out.append((t - DNSPERF_TIMEOUT, "T", None))
            else:
                latency = lat or 0.0
                out.append((t - latency, code, latency))
        return out


class LoadNote:
    """The 1-minute load average before and after a run.

    The machine is shared (other test runs may be going on): a glitch in a
    run means little without knowing what else wanted the two cores. (Per
    process and whole-machine CPU times disagree in this VM, so only the
    load average is reported.)
    """

    def __init__(self) -> None:
        self.load0 = os.getloadavg()[0]

    def report(self) -> str:
        return f"  1-minute load average {self.load0:.2f} before the run, {os.getloadavg()[0]:.2f} after"


def describe(label: str, run: DnsperfRun) -> int:
    t = parse_dnsperf(line for _, line in run.lines)
    rc = t.rcodes
    servfail = rc.get("SERVFAIL", 0)
    other = sum(n for c, n in rc.items() if c not in ("NOERROR", "SERVFAIL"))
    failures = t.lost + servfail + other
    print(f"{label}:")
    print(f"  queries sent {t.sent}, completed {t.completed}, lost (timeout 3 s) {t.lost}")
    print("  response codes: " + (", ".join(f"{c} {n}" for c, n in rc.items()) or "(none)"))
    print(f"  client-visible failures (lost + SERVFAIL + other non-NOERROR): {failures}"
          f" ({100.0 * failures / t.sent if t.sent else 0:.3f}% of sent)")
    print(f"  dnsperf: {t.qps} qps, average latency {t.avg_s} s, max {t.max_s} s")
    return failures


def per_second_table(run: DnsperfRun, t_kill: float, what: str = "the kill") -> None:
    """Queries by send second relative to ``t_kill``."""
    buckets: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    slow: dict[int, float] = collections.defaultdict(float)
    for sent, code, lat in run.per_query():
        sec = math.floor(sent - t_kill)
        buckets[sec][code] += 1
        if lat is not None:
            slow[sec] = max(slow[sec], lat)
            if lat > SLOW:
                buckets[sec]["slow"] += 1
    if not buckets:
        print("  (no per-query lines from dnsperf -v)")
        return
    print(f"  by send time, seconds relative to {what} (send time = arrival of dnsperf's -v line - latency):")
    print(f"  {'second':>10} {'queries':>8} {'NOERROR':>8} {'SERVFAIL':>8} {'lost':>6} {'other':>6} "
          f"{'>' + format(SLOW * 1000, 'g') + 'ms':>8} {'max latency':>12}")
    for sec in sorted(buckets):
        c = buckets[sec]
        other = sum(n for k, n in c.items() if k not in ("NOERROR", "SERVFAIL", "T", "slow"))
        total = sum(n for k, n in c.items() if k != "slow")
        print(f"  {f'[{sec},{sec + 1})':>10} {total:>8} {c['NOERROR']:>8} {c['SERVFAIL']:>8} "
              f"{c['T']:>6} {other:>6} {c['slow']:>8} {slow[sec] * 1000:>10.1f}ms")

    def failed(c: collections.Counter) -> int:
        return sum(n for k, n in c.items() if k not in ("NOERROR", "slow"))
    before = sum(failed(c) for s, c in buckets.items() if s < 0)
    after = sum(failed(c) for s, c in buckets.items() if s >= 0)
    print(f"  failures sent before {what}: {before}; sent at or after {what}: {after}")


def dnsperf_kill(args: argparse.Namespace) -> int:
    total = PRE_KILL + args.seconds
    outstanding = max(100, int(args.rate * (DNSPERF_TIMEOUT + 1)))
    zone = make_split_zone(n=300)
    workdir = tempfile.mkdtemp(prefix="dnsrouter-failover-")
    names_path = os.path.join(workdir, "names.txt")
    with open(names_path, "w") as f:
        f.writelines(f"{name} A\n" for name in zone.names[ZONE])

    pool = Pool(zone, workdir, args.workers)
    runs: list[DnsperfRun] = []
    try:
        pool.start()
        for line in pool.describe():
            print(line)
        perf_argv = dnsperf_argv(pool.router.port, names_path, qps=args.rate, duration=total,
                                 timeout=DNSPERF_TIMEOUT, clients=DNSPERF_CLIENTS, outstanding=outstanding)
        stdbuf = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        print("dnsperf: " + shlex.join(perf_argv) + "   (run under stdbuf -oL, output read line by line)")
        print()

        if not args.no_control:
            cpu = LoadNote()
            run = DnsperfRun(stdbuf + perf_argv)
            runs.append(run)
            run.wait(total + DNSPERF_TIMEOUT + 30)
            describe(f"control run (no kill, {total:g} s at {args.rate} qps)", run)
            print(cpu.report())
            per_second_table(run, run.started, "dnsperf's start")
            print()

        # the kill run
        victim, survivor = pool.knots[0], pool.knots[1]
        watch = DownWatch(pool, victim.addr)
        cpu = LoadNote()
        run = DnsperfRun(stdbuf + perf_argv)
        runs.append(run)
        until(run.started + PRE_KILL)
        t_kill = time.monotonic()
        victim.kill()
        deadline = time.monotonic() + total + DNSPERF_TIMEOUT + 30
        while run.proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("dnsperf did not finish in time")
            watch.poll()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(0.1)
        run.wait(5)

        describe(f"kill run (SIGKILL of knotd {victim.addr} at t={PRE_KILL:g} s, "
                 f"{total:g} s at {args.rate} qps)", run)
        print("  " + watch.report(t_kill))
        print(cpu.report())
        per_second_table(run, t_kill)
        print()
        print("router metrics after the runs:")
        for line in pool.counters(0):
            print("  " + line)
        print(f"  (survivor: {survivor.addr})")
        return 0
    finally:
        ignore_signals()
        for run in runs:
            run.stop()
        pool.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="kill,stop,slow-tcp",
                    help="comma-separated, run in the order given: kill, stop, slow-tcp (resolver clients), "
                         "dnsperf-kill (the dnsperf run); default kill,stop,slow-tcp")
    ap.add_argument("--before", type=float, default=5.0, help="seconds of load before the fault (default 5)")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of load from the fault on (default 5)")
    ap.add_argument("--qps", type=float, default=300.0, help="the resolver clients' total rate (default 300)")
    ap.add_argument("--clients", choices=("processes", "threads"), default="processes",
                    help="run the six resolver clients as processes (default) or as threads of this one")
    ap.add_argument("--slow-readers", type=int, default=16, help="slow-tcp: connections (default 16)")
    ap.add_argument("--pipeline", type=int, default=300, help="slow-tcp: queries sent on each (default 300)")
    ap.add_argument("--reader-rcvbuf", type=int, default=0, metavar="BYTES",
                    help="slow-tcp: the connections' SO_RCVBUF, with 1200-byte segments (default: the kernel's)")
    ap.add_argument("--rate", type=int, default=2000, help="dnsperf-kill: qps (dnsperf -Q, default 2000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="dnsperf-kill: time after the kill (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="dnsperf-kill: router workers (default 2)")
    ap.add_argument("--no-control", action="store_true", help="dnsperf-kill: skip the control run without a kill")
    args = ap.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS and n != "dnsperf-kill"]
    if unknown or not names:
        ap.error(f"unknown scenarios {unknown}: choose from {', '.join([*SCENARIOS, 'dnsperf-kill'])}")
    if args.slow_readers != 16:
        SCENARIOS["slow-tcp"] = Scenario("slow-tcp", f"{args.slow_readers} TCP clients pipelining queries and "
                                         "never reading", 1.0, 1)
    handle_signals()
    print("command: " + command_line())
    print()
    status = 0
    resolvers = [n for n in names if n in SCENARIOS]
    try:
        if resolvers:
            status |= resolver_scenarios(resolvers, args)
        if "dnsperf-kill" in names:
            status |= dnsperf_kill(args)
    except Interrupted as e:
        print(f"failover: interrupted by {e}; every process it started is stopped", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
