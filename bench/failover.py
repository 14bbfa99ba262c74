#!/usr/bin/env python3
"""Failover: what clients see when one backend of a pool dies under load.

Two knotd serve the SAME zone (a.example.com., from make_split_zone) and
form one pool: two route files with the same regexp, file registry
(--routes-dir), dnsrouter with 2 workers and its default health and forward
settings (check every 2 s, fall 3; forward timeout 1 s, then one retry on
another backend of the pool). dnsperf sends names of that zone at a fixed
rate, 8 client sockets (so SO_REUSEPORT spreads them over both workers):

    dnsperf -s 127.0.0.1 -p PORT -d NAMES -Q RATE -l 5+SECONDS -t 3 -c 8 -q OUTSTANDING -v

Two runs on the same router, one after the other:

* control: both backends alive all along;
* kill: 5 s after dnsperf starts, one knotd gets SIGKILL (KnotServer.kill());
  dnsperf goes on for --seconds more.

For each run this prints dnsperf's own totals (sent, completed, lost =
timed out after 3 s, response codes); client-visible failures = lost +
SERVFAIL (+ any other non-NOERROR code). The totals of the kill run bound
the failures caused by the kill. To attribute them in time, dnsperf runs
with -v (one line per query: rcode and latency, or "T" for a timeout),
line buffered through stdbuf; each line is stamped on arrival here, and its
send time is taken as arrival - latency (arrival - 3 s for a timeout).
A table per second relative to the kill follows. While the kill run goes
on, /routes is polled every 100 ms to see when the router marks the dead
backend down.

    .venv/bin/python bench/failover.py [--rate 2000] [--seconds 10]
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from common import (bench_router, command_line, dnsperf_argv, finish_router, handle_signals, ignore_signals,
                    parse_dnsperf, start_router, verbose_line)
from support import metrics
from support.knot import KnotServer
from support.net import HOST, answered, free_port, wait_until
from support.processes import spawn, stop
from support.zones import make_split_zone

ZONE = "a.example.com."
REGEXP = r"^h[0-9]+\.a\.example\.com\.$"
PRE_KILL = 5.0
DNSPERF_TIMEOUT = 3.0
CLIENTS = 8
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=2000, help="queries per second (dnsperf -Q, default 2000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="dnsperf time after the kill (default 10)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-control", action="store_true", help="skip the control run without a kill")
    args = ap.parse_args()
    handle_signals()
    total = PRE_KILL + args.seconds
    outstanding = max(100, int(args.rate * (DNSPERF_TIMEOUT + 1)))

    print("command: " + command_line())
    zone = make_split_zone(n=300)
    workdir = tempfile.mkdtemp(prefix="dnsrouter-failover-")
    names_path = os.path.join(workdir, "names.txt")
    with open(names_path, "w") as f:
        f.writelines(f"{name} A\n" for name in zone.names[ZONE])

    knots: list[KnotServer] = []
    router = None
    runs: list[DnsperfRun] = []
    try:
        for _ in range(2):
            knots.append(KnotServer({ZONE: zone.zones[ZONE]}).start())
        mport = free_port("tcp")
        router = bench_router(workdir, workers=args.workers, args=["--metrics", f"{HOST}:{mport}"])
        for i, knot in enumerate(knots, start=1):
            router.route(f"knot{i}", f"{knot.addr},{REGEXP}")
        print("router:  " + shlex.join(router.command()))

        def both_up() -> bool:
            try:
                state = metrics.backends_up(mport)
            except OSError:
                return False
            return len(state) == 2 and all(state.values())
        start_router(router, both_up, timeout=20, message="the router never had both backends up")
        # /routes is the supervisor's view; the workers follow it shortly after
        wait_until(lambda: answered(router.port, zone.names[ZONE][0]), timeout=10,
                   message="the router does not answer names of the zone")

        perf_argv = dnsperf_argv(router.port, names_path, qps=args.rate, duration=total, timeout=DNSPERF_TIMEOUT,
                                 clients=CLIENTS, outstanding=outstanding)
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
        victim, survivor = knots[0], knots[1]
        down_seen: list[float] = []
        stop_poll = threading.Event()

        cpu = LoadNote()
        run = DnsperfRun(stdbuf + perf_argv)
        runs.append(run)
        time.sleep(max(0.0, run.started + PRE_KILL - time.monotonic()))
        t_kill = time.monotonic()
        victim.kill()

        def poll_down() -> None:
            while not stop_poll.is_set():
                try:
                    if metrics.backends_up(mport).get(victim.addr) is False:
                        down_seen.append(time.monotonic())
                        return
                except OSError:
                    pass
                stop_poll.wait(0.1)
        poller = threading.Thread(target=poll_down, daemon=True)
        poller.start()
        run.wait(total + DNSPERF_TIMEOUT + 30)
        stop_poll.set()
        poller.join(5)

        describe(f"kill run (SIGKILL of knotd {victim.addr} at t={PRE_KILL:g} s, "
                            f"{total:g} s at {args.rate} qps)", run)
        if down_seen:
            print(f"  /routes showed {victim.addr} down {down_seen[0] - t_kill:.2f} s after the kill "
                  f"(polled every 0.1 s)")
        else:
            print(f"  /routes never showed {victim.addr} down during the run")
        print(cpu.report())
        per_second_table(run, t_kill)
        print()
        text = metrics.text(mport)
        print("router metrics after the runs:")
        for line in metrics.lines(text, "dnsrouter_backend_up", "dnsrouter_backend_timeouts_total",
                                 "dnsrouter_backend_queries_total", "dnsrouter_responses_total",
                                 "dnsrouter_worker_restarts_total", "dnsrouter_dropped_total"):
            print("  " + line)
        print(f"  (survivor: {survivor.addr})")
        return 0
    finally:
        ignore_signals()
        for run in runs:
            run.stop()
        finish_router(router, "warning")
        for knot in knots:
            knot.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
