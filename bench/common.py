"""What the bench scripts share (run.py, convergence.py, failover.py, soak.py, cpu.py, latency.py).

The servers, processes, zones, queries and metrics come from the test
suite's support package (tests/support/): importing this module, first in
every script, puts tests/ on sys.path. Here: signal handling, the router
started, waited for and reported on, the CPU time a server's processes
spend, and dnsperf's command line and output.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence

import psutil

# The benchmarks measure with the very servers, zones and helpers the tests
# use, so that a number here and an assertion there mean the same setup:
# tests/support/ is a package of tests/, which is not installed.
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from support.net import HOST, wait_until  # noqa: E402
from support.processes import program  # noqa: E402
from support.router import Router  # noqa: E402


def command_line() -> str:
    """How this script was started, relative interpreter path first."""
    return shlex.join([os.path.relpath(sys.executable), *sys.argv])


# -- signals -----------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop everything and leave."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def handle_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt), so a script
    stopped by a timeout or a CI runner cleans up in its finally blocks
    exactly as on Ctrl-C, even if it was started with SIGINT ignored."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def ignore_signals() -> None:
    """For the cleanup itself: a second Ctrl-C must not cut it short and
    leave servers behind (stop() has its own deadlines, so it cannot hang)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -- the router --------------------------------------------------------------

def router_executable() -> list[str]:
    """The dnsrouter beside this interpreter (a virtual environment's, not
    whichever comes first on PATH), else ``python -m dnsrouter``."""
    exe = program("dnsrouter")
    return [str(exe)] if os.access(exe, os.X_OK) else [sys.executable, "-m", "dnsrouter"]


def bench_router(workdir: str, *, workers: int, log_level: str = "warning",
                 executable: Sequence[str] | None = None, routes_dir: str | None = None,
                 args: Sequence[str] = ()) -> Router:
    """A Router (not started) living in ``workdir``."""
    return Router(routes_dir=routes_dir, workers=workers, args=list(args), workdir=workdir,
                  executable=executable or router_executable(), log_level=log_level)


def start_router(router: Router, ready: Callable[[], bool], timeout: float, message: str,
                 interval: float = 0.02) -> float:
    """Start the router and wait until ready() says it serves; the seconds that took.

    RuntimeError, with the router's log, if it exits or is not ready in time.
    """
    t0 = time.monotonic()
    router.start(wait=False)

    def check() -> bool:
        if router.proc.poll() is not None:
            raise RuntimeError(f"dnsrouter exited with {router.proc.returncode}:\n{router.log()[-3000:]}")
        return ready()

    try:
        wait_until(check, timeout=timeout, interval=interval, message=message)
    except AssertionError as e:
        raise RuntimeError(f"{e}\n{router.log()[-3000:]}") from None
    return time.monotonic() - t0


def finish_router(router: Router | None, log_level: str, lines: int = 40) -> None:
    """Stop the router (SIGTERM, then SIGKILL), print its exit status and the tail of its stderr."""
    err = ""
    if router is not None:
        print(f"router exit status: {router.stop()}")
        err = router.log()
    print(f"router stderr (--log-level {log_level}, last {lines} lines): " + ("(empty)" if not err.strip() else ""))
    for line in err.splitlines()[-lines:]:
        print("  | " + line)


# -- CPU time ------------------------------------------------------------------

def process_tree(pid: int | None) -> list[psutil.Process]:
    """The process and all its descendants (the router's supervisor and its
    workers) as of now; [] if it is gone or None."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu_seconds(proc: psutil.Process) -> float | None:
    """User + system seconds of proc, all its threads; None once it is gone."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


class CpuUse(NamedTuple):
    seconds: float  # user + system; NaN if no process of the set could be read at the start
    exited: int     # processes of the set gone by the end: their time is missing from seconds


class CpuMeter:
    """The CPU seconds (user + system) a fixed set of processes spends from
    the meter's making until read(). The set is taken by the caller right
    before the measured work: a process started later is not counted, and
    one gone by the end counts for nothing (its last times cannot be read),
    so a worker that crashed and was replaced mid-run makes the figure low:
    read() says how many went, for the caller to flag it."""

    def __init__(self, procs: Iterable[psutil.Process]) -> None:
        self.start = [(p, t) for p in procs if (t := _cpu_seconds(p)) is not None]

    def read(self) -> CpuUse:
        if not self.start:
            return CpuUse(math.nan, 0)
        now = [(_cpu_seconds(p), t) for p, t in self.start]
        return CpuUse(sum((end - t for end, t in now if end is not None), 0.0), sum(end is None for end, _ in now))


def wait_idle(procs: list[psutil.Process], timeout: float = 60.0, window: float = 0.25, busy: float = 0.1) -> bool:
    """Until ``procs`` use less than ``busy`` of a CPU over ``window``
    seconds, at most ``timeout``; False if they never did. A server behind
    on its queries goes on after dnsperf stops (dnsdist with 10,000 regexp
    rules works through a full receive queue for seconds) and would take the
    CPUs from the next run, another server's."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meter = CpuMeter(procs)
        time.sleep(window)  # the window measured, not a wait for an event
        used = meter.read().seconds
        if math.isnan(used) or used < busy * window:  # NaN: none of them left to wait for
            return True
    return False


# -- dnsperf -----------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def dnsperf_argv(port: int, qfile: str, *, duration: float, timeout: float, clients: int,
                 outstanding: int, transport: str | None = None, qps: int | None = None) -> list[str]:
    """dnsperf against 127.0.0.1:port; -v: one line per query (rcode, latency)."""
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", qfile]
    if transport:
        argv += ["-m", transport]
    if qps:
        argv += ["-Q", str(qps)]
    return argv + ["-l", _num(duration), "-t", _num(timeout), "-c", str(clients),
                   "-q", str(outstanding), "-v"]


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


# "> NOERROR h0001.zone.example.com. A 0.000114", or "> T h0001... A" for a timeout
VERBOSE_LINE = re.compile(r"^> (\S+) \S+ \S+(?: ([0-9.]+))?$")


def verbose_line(line: str) -> tuple[str, float | None] | None:
    """(rcode or 'T', latency in seconds or None) of a dnsperf -v line; None for other lines."""
    m = VERBOSE_LINE.match(line.rstrip("\n"))
    if not m:
        return None
    return m.group(1), float(m.group(2)) if m.group(2) else None


@dataclass
class Perf:
    """dnsperf's totals; p99 from its -v lines (dnsperf 2.10 prints no percentile)."""
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    avg_s: float = math.nan
    max_s: float = math.nan
    p99_ms: float = math.nan
    rcodes: dict[str, int] = field(default_factory=dict)
    reconnections: int = 0
    kernel: dict[str, int] = field(default_factory=dict)  # counter deltas during the run
    cpu_s: float = math.nan  # CPU seconds of the server measured during the run (CpuMeter)
    cpu_exited: int = 0      # its processes that exited during the run: their CPU is missing from cpu_s
    raw_tail: str = ""
    spread: list[float] = field(default_factory=list)  # the figure of each repeated run

    @property
    def avg_ms(self) -> float:
        return self.avg_s * 1000.0

    @property
    def cpu_us(self) -> float:
        """The server's CPU microseconds per query answered (lost queries cost too, but answer nothing)."""
        return self.cpu_s / self.completed * 1e6 if self.completed else math.nan


_STAT = {
    "sent": re.compile(r"^\s*Queries sent:\s+(\d+)"),
    "completed": re.compile(r"^\s*Queries completed:\s+(\d+)"),
    "lost": re.compile(r"^\s*Queries lost:\s+(\d+)"),
    "qps": re.compile(r"^\s*Queries per second:\s+([\d.]+)"),
    "avg": re.compile(r"^\s*Average Latency \(s\):\s+([\d.]+)(?:.*max ([\d.]+))?"),
}


def parse_dnsperf(lines: Iterable[str]) -> Perf:
    """The Perf of dnsperf's output (an iterable of lines, with or without newlines)."""
    perf = Perf()
    lat: list[float] = []
    tail: list[str] = []
    section = "queries"
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("> "):
            parsed = verbose_line(line)
            if parsed and parsed[1] is not None:
                lat.append(parsed[1])
            continue
        tail.append(line)
        # dnsperf -m tcp adds "Connection Statistics" with its own
        # "Average Latency" (of connecting): not the queries' latency.
        if line.startswith("Connection Statistics"):
            section = "connections"
        m = re.match(r"^\s*Reconnections:\s+(\d+)", line)
        if m:
            perf.reconnections = int(m.group(1))
        if section != "queries":
            continue
        for key, rx in _STAT.items():
            m = rx.match(line)
            if m:
                v = m.group(1)
                if key == "qps":
                    perf.qps = float(v)
                elif key == "avg":
                    perf.avg_s = float(v)
                    if m.group(2):
                        perf.max_s = float(m.group(2))
                else:
                    setattr(perf, key, int(v))
        if "Response codes:" in line:
            for code, n in re.findall(r"([A-Z]+)\s+(\d+)\s+\(", line.split(":", 1)[1]):
                perf.rcodes[code] = int(n)
    lat.sort()
    perf.p99_ms = percentile(lat, 99.0) * 1000.0
    # Keep the non-per-query lines that are not boilerplate (timeouts, errors).
    perf.raw_tail = "".join(t + "\n" for t in tail[-40:])
    return perf

