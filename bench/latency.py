#!/usr/bin/env python3
"""Average latency at low fixed rates: dnsrouter with 1 and 2 workers, and dnsdist.

run.py's fixed-rate row says how far the router is from dnsdist at one
rate and worker count. This says how that distance moves with the rate
and with the number of workers, which at low rates decides more than the
packet path does: a worker that sleeps longer between queries wakes more
slowly (on a virtual machine an idle CPU halts, and waking it is an exit
to the host). For each rate, every server in turn (started, two dnsperf
-Q runs, stopped), ROUNDS rounds; the median of its runs.

    python3 bench/latency.py --rates 1000,2000,4000 --workers 1,2
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from common import bench_router, dnsperf_argv, handle_signals, ignore_signals, parse_dnsperf, start_router
from run import ZONE, Dnsdist, write_routes
from support.knot import KnotServer
from support.net import answered
from support.processes import spawn, stop, stop_all
from support.zones import numbered_zone


def average_ms(port: int, qfile: str, rate: int, duration: float) -> float:
    proc = spawn(dnsperf_argv(port, qfile, duration=duration, timeout=2, clients=20, outstanding=200, qps=rate),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=duration + 30)
    finally:
        stop(proc)
    perf = parse_dnsperf(out.splitlines())
    if perf.lost:
        print(f"  warning: {perf.lost} queries lost at {rate} qps", file=sys.stderr)
    return perf.avg_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1000,2000,4000", help="comma separated dnsperf -Q rates")
    p.add_argument("--workers", default="1,2", help="comma separated dnsrouter worker counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3, help="dnsperf -l seconds per run (two a round)")
    p.add_argument("--no-dnsdist", action="store_true")
    args = p.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    servers = [f"dnsrouter, {w} worker{'s' if w > 1 else ''}" for w in map(int, args.workers.split(","))]
    if not args.no_dnsdist:
        servers.append("dnsdist")
    handle_signals()
    work = tempfile.mkdtemp(prefix="dnsrouter-latency-")
    runs: dict[tuple[int, str], list[float]] = {(r, s): [] for r in rates for s in servers}
    try:
        with KnotServer({ZONE: numbered_zone(ZONE, 5000)}, workdir=os.path.join(work, "knot")) as knot:
            routes = os.path.join(work, "routes")
            write_routes(routes, 1, knot.addr)
            qfile = os.path.join(work, "queries.txt")
            with open(qfile, "w") as f:
                f.writelines(f"h{i:04d}.{ZONE} A\n" for i in range(1, 5001))
            for n in range(args.rounds):
                for rate in rates:
                    for i, name in enumerate(servers):
                        tag = f"{n}-{rate}-{i}"
                        if name == "dnsdist":
                            server = Dnsdist(knot.addr, 1, work, tag, 30).start()
                        else:
                            server = bench_router(os.path.join(work, tag), workers=int(name.split()[1]),
                                                  routes_dir=routes)
                            start_router(server, lambda: answered(server.port, f"h0001.{ZONE}"), 30,
                                         "router did not answer")
                        try:
                            runs[rate, name] += [average_ms(server.port, qfile, rate, args.duration) for _ in range(2)]
                        finally:
                            server.stop()
                        print(f"round {n + 1}, {rate} qps, {name}: {runs[rate, name][-2:]}", file=sys.stderr)
    finally:
        ignore_signals()
        stop_all()
    print(f"\naverage latency ms, dnsperf -Q RATE -l {args.duration:g}, median of {2 * args.rounds} runs "
          f"({args.rounds} rounds, each server started in turn)\n")
    print("| rate | " + " | ".join(servers) + " |\n|" + " --- |" * (len(servers) + 1))
    for rate in rates:
        print(f"| {rate} | " + " | ".join(f"{statistics.median(runs[rate, s]):.3f}" for s in servers) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
