"""What bench/run.py, bench/convergence.py and bench/failover.py share.

The servers themselves come from the test suite (tests/router_process.py,
tests/knot_server.py, tests/etcd_server.py); importing this module puts
tests/ on sys.path. Here: child processes in their own session and their
stopping, the router started, waited for and reported on, dnsperf's command
line and output, one-shot queries, and the router's /metrics and /routes.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from netutil import HOST, wait_until  # noqa: E402
from router_process import Router  # noqa: E402


def command_line() -> str:
    """How this script was started, relative interpreter path first."""
    return shlex.join([os.path.relpath(sys.executable), *sys.argv])


# -- child processes ---------------------------------------------------------

# Every process started by spawn(), stopped by stop_all() even on Ctrl-C.
# Children get their own session, so a Ctrl-C in the terminal reaches only
# the script, which stops them in order.
_procs: list[subprocess.Popen] = []


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    _procs.append(proc)
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL the process group on timeout."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  ! pid {proc.pid} ignored SIGTERM for {timeout:g}s, killing its group", file=sys.stderr)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    # Leftovers in the group (a child that outlived its parent).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc in _procs:
        _procs.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_procs)):
        stop(proc, timeout=5.0)


# -- the router --------------------------------------------------------------

def router_executable() -> list[str]:
    """The dnsrouter next to this interpreter (a virtual environment's), else ``python -m dnsrouter``."""
    exe = os.path.join(os.path.dirname(sys.executable), "dnsrouter")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "dnsrouter"]


def bench_router(workdir: str, *, workers: int, log_level: str = "warning",
                 executable: Sequence[str] | None = None, routes_dir: str | None = None,
                 args: Sequence[str] = ()) -> Router:
    """A Router (not started) in its own session, living in ``workdir``."""
    return Router(routes_dir=routes_dir, workers=workers, args=list(args), workdir=workdir,
                  executable=executable or router_executable(), log_level=log_level, new_session=True)


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


# -- queries -----------------------------------------------------------------

def answered(port: int, name: str, transport: str = "udp", timeout: float = 0.5) -> bool:
    """Whether one query for name's A gets NOERROR with an answer."""
    q = dns.message.make_query(name, "A")
    try:
        if transport == "udp":
            r = dns.query.udp(q, HOST, port=port, timeout=timeout)
        else:
            r = dns.query.tcp(q, HOST, port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)


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
    raw_tail: str = ""
    spread: list[float] = field(default_factory=list)  # the figure of each repeated run

    @property
    def avg_ms(self) -> float:
        return self.avg_s * 1000.0


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


# -- the router's HTTP endpoints ---------------------------------------------

def metrics_text(mport: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{mport}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(mport: int, name: str) -> float | None:
    """The value of the first sample of metric ``name`` (None if absent)."""
    for line in metrics_text(mport).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def metric_lines(text: str, *prefixes: str) -> list[str]:
    return [line for line in text.splitlines()
            if not line.startswith("#") and line.startswith(prefixes)]


def routes_state(mport: int) -> dict[str, bool]:
    """backend address -> up, from /routes."""
    with urllib.request.urlopen(f"http://{HOST}:{mport}/routes", timeout=2) as r:
        table = json.loads(r.read())
    return {b["address"]: b["up"] for route in table["routes"] for b in route["backends"]}
