#!/usr/bin/env python3
"""CPU per query: two dnsrouter builds, at the same fixed rate, in one invocation.

Throughput on a 2-vCPU machine shared by dnsperf, Knot and the router moves
by ±10 % from run to run, more than most single changes gain. The CPU time
the workers spend per query at a rate that saturates nobody is a steadier
figure: this runs dnsperf -Q RATE against each build in turn, ROUNDS times
interleaved, and prints the median worker CPU µs per query (user + system,
from /proc) and the median average latency of each, with the ratio; and,
measured before each run, what the workers spend idle (ms of CPU a second).

    python3 bench/cpu.py --baseline /path/to/other/venv/bin/dnsrouter
    python3 bench/cpu.py --baseline "$PWD/.venv/bin/dnsrouter --fast-path off"

Each build is a command line (split as a shell would), so one build with
different flags compares too. ``--flood`` sends names never seen in the run
(run.py's random-subdomain flood, NXDOMAIN from Knot): every query a route
cache miss.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from common import CpuMeter, bench_router, dnsperf_argv, handle_signals, ignore_signals, parse_dnsperf, start_router
from run import ZONE, write_flood_queries, write_routes
from support.knot import KnotServer
from support.net import answered
from support.processes import program, spawn, stop, stop_all
from support.zones import numbered_zone


def measure(executable: list[str], routes_dir: str, workdir: str, qfile: str, args) -> tuple[float, float, float]:
    """(worker CPU µs per query, average latency ms) of one fixed-rate run,
    and the workers' CPU ms a second while idle before it."""
    r = bench_router(workdir, workers=args.workers, executable=executable, routes_dir=routes_dir)
    try:
        start_router(r, lambda: answered(r.port, f"h0001.{ZONE}"), 30, "router did not answer")
        idle = CpuMeter(r.workers_procs())
        time.sleep(args.idle)  # the measurement: what the clocks and threads cost with no query
        idle_ms = idle.read().seconds * 1000 / args.idle
        cpu = CpuMeter(r.workers_procs())  # the workers only: the figure compared is theirs
        out = os.path.join(workdir, "dnsperf.out")
        with open(out, "w") as f:
            proc = spawn(dnsperf_argv(r.port, qfile, duration=args.duration, timeout=2, clients=20,
                                      outstanding=200, qps=args.rate, transport=args.transport),
                         stdout=f, stderr=subprocess.STDOUT)
            try:
                proc.wait(args.duration + 30)
            finally:
                stop(proc)
        cpu_s = cpu.read().seconds
        with open(out, errors="replace") as f:
            perf = parse_dnsperf(f)
        perf.cpu_s = cpu_s
        if perf.lost or set(perf.rcodes) != {"NXDOMAIN" if args.flood else "NOERROR"}:
            print(f"  warning: lost {perf.lost}, rcodes {perf.rcodes}", file=sys.stderr)
        return perf.cpu_us, perf.avg_ms, idle_ms
    finally:
        r.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="the other build's dnsrouter command line")
    p.add_argument("--candidate", default=str(program("dnsrouter")),
                   help="this build's dnsrouter (default: the one next to this interpreter)")
    p.add_argument("--rate", type=int, default=10000, help="dnsperf -Q")
    p.add_argument("--duration", type=int, default=5, help="dnsperf -l seconds per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--routes", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    p.add_argument("--flood", action="store_true", help="every name new in the run, as run.py --flood")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured before each run")
    args = p.parse_args()
    handle_signals()
    work = tempfile.mkdtemp(prefix="dnsrouter-cpu-")
    results: dict[str, list[tuple[float, float, float]]] = {"baseline": [], "candidate": []}
    try:
        with KnotServer({ZONE: numbered_zone(ZONE, 5000)}, workdir=os.path.join(work, "knot")) as knot:
            routes = os.path.join(work, "routes")
            write_routes(routes, args.routes, knot.addr)
            qfile = os.path.join(work, "queries.txt")
            if args.flood:
                write_flood_queries(qfile, args.rate * args.duration)
            else:
                with open(qfile, "w") as f:
                    f.writelines(f"h{i:04d}.{ZONE} A\n" for i in range(1, 5001))
            for n in range(args.rounds):
                for name in results:
                    got = measure(shlex.split(getattr(args, name)), routes, os.path.join(work, f"{name}-{n}"), qfile, args)
                    print(f"round {n + 1} {name}: {got[0]:.1f} µs CPU per query, avg latency {got[1]:.3f} ms, "
                          f"idle {got[2]:.1f} ms/s", file=sys.stderr)
                    results[name].append(got)
    finally:
        ignore_signals()
        stop_all()
    print(f"\n{args.workers} workers, {args.routes} route(s), {'flood' if args.flood else 'repeated names'}, "
          f"dnsperf -m {args.transport} -Q {args.rate} "
          f"-l {args.duration}, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| build | worker CPU µs/query | avg latency ms | idle worker CPU ms/s |\n| --- | --- | --- | --- |")
    med = {k: [statistics.median(column) for column in zip(*v)] for k, v in results.items()}
    for name, (cpu, avg, idle) in med.items():
        print(f"| {name} | {cpu:.1f} | {avg:.3f} | {idle:.1f} |")
    print("| ratio | " + " | ".join(f"{c / b:.2f}" if b else "-" for c, b in zip(med["candidate"], med["baseline"])) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
