#!/usr/bin/env python3
"""Average latency at low fixed rates: dnsrouter with 1 and 2 workers, and dnsdist.

run.py's fixed-rate row says how far the router is from dnsdist at one
rate and worker count. This says how that distance moves with the rate
and with the number of workers, which at low rates decides more than the
packet path does: a worker that sleeps longer between queries wakes more
slowly (on a virtual machine an idle CPU halts, and waking it is an exit
to the host). For each rate, every server in turn (started, two dnsperf
-Q runs, stopped), ROUNDS rounds; the median of its runs.

With --cache N, the routers run with their packet cache (--cache-size N)
and dnsdist with its own (N entries, dontAge), and the query file's names
are asked over and over: after the first pass every answer is a hit. With
--affinity auto,off each router is also measured unpinned ([server]
cpu_affinity = off): on a host whose CPUs the load generator shares, a
pinned worker waits for its CPU where an unpinned one takes the idle one.

    python3 bench/latency.py --rates 1000,2000,4000 --workers 1,2
    python3 bench/latency.py --rates 2000 --cache 10000 --names 500 --affinity auto,off --rounds 5
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
    p.add_argument("--cache", type=int, default=0, metavar="N",
                   help="routers with --cache-size N, dnsdist with a packet cache of N entries")
    p.add_argument("--names", type=int, default=5000, help="names in the zone and the query file")
    p.add_argument("--affinity", default="auto", help="comma separated [server] cpu_affinity values for the routers")
    args = p.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    affinities = args.affinity.split(",")
    # name -> (workers, cpu_affinity); dnsdist -> None
    specs: dict[str, tuple[int, str] | None] = {
        f"dnsrouter, {w} worker{'s' if w > 1 else ''}" + ("" if a == "auto" else f", cpu_affinity {a}"): (w, a)
        for a in affinities for w in map(int, args.workers.split(","))}
    if not args.no_dnsdist:
        specs["dnsdist"] = None
    servers = list(specs)
    handle_signals()
    work = tempfile.mkdtemp(prefix="dnsrouter-latency-")
    runs: dict[tuple[int, str], list[float]] = {(r, s): [] for r in rates for s in servers}
    try:
        with KnotServer({ZONE: numbered_zone(ZONE, args.names)}, workdir=os.path.join(work, "knot")) as knot:
            routes = os.path.join(work, "routes")
            write_routes(routes, 1, knot.addr)
            qfile = os.path.join(work, "queries.txt")
            with open(qfile, "w") as f:
                f.writelines(f"h{i:04d}.{ZONE} A\n" for i in range(1, args.names + 1))
            for n in range(args.rounds):
                for rate in rates:
                    for i, name in enumerate(servers):
                        tag = f"{n}-{rate}-{i}"
                        spec = specs[name]
                        if spec is None:
                            server = Dnsdist(knot.addr, 1, work, tag, 30, args.cache).start()
                        else:
                            ini = os.path.join(work, f"{tag}.ini")
                            with open(ini, "w") as f:
                                f.write(f"[server]\ncpu_affinity = {spec[1]}\n[cache]\nsize = {args.cache}\n")
                            server = bench_router(os.path.join(work, tag), workers=spec[0], routes_dir=routes,
                                                  args=["--config", ini])
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
          f"({args.rounds} rounds, each server started in turn)"
          + (f"; packet caches of {args.cache} entries, {args.names} names" if args.cache else "") + "\n")
    print("| rate | " + " | ".join(servers) + " |\n|" + " --- |" * (len(servers) + 1))
    for rate in rates:
        print(f"| {rate} | " + " | ".join(f"{statistics.median(runs[rate, s]):.3f}" for s in servers) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
