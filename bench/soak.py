#!/usr/bin/env python3
"""Soak: dnsrouter under a steady dnsperf load for minutes; do its processes leak?

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 1000] [--workers 2]

One Knot server (zone soak.example.com., --names A records), the router in
front of it (one route, file registry), and dnsperf at a fixed rate (-Q) for
the whole run, on 127.0.0.1 only. Every --interval seconds (10) it records
the RSS, open file descriptors and threads of every router process (the
supervisor and each worker, by psutil) and prints them as a table at the
end, with dnsperf's summary and a verdict per process and measure:

    flat   the last sample is within --tolerance (10 %) of the first sample
           after the warm-up (--warmup, default a fifth of the run, at most
           60 s); for descriptors and threads, within 2 as well (a count of
           20 must not fail for one more thread)
    GROWS  otherwise (the slope over the run after the warm-up is shown too)

Exit status: 0 flat and dnsperf lost under 0.1 %, 1 otherwise, 2 when it
could not run. Bounded in time: dnsperf runs --minutes, and everything is
stopped (SIGTERM, then SIGKILL) at the latest a minute later, on Ctrl-C or
SIGTERM too. --keep keeps the work directory (router log, dnsperf output).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

from common import Interrupted, bench_router, handle_signals, ignore_signals, parse_dnsperf, start_router
from support.knot import KnotServer
from support.net import HOST, answered
from support.processes import spawn, stop
from support.router import Router
from support.zones import numbered_zone

ZONE = "soak.example.com."
MEASURES = ("rss", "fds", "threads")
COUNT_SLACK = 2  # descriptors/threads: within the tolerance or within this many


@dataclass
class Sample:
    t: float  # seconds since the load started
    procs: dict[str, tuple[int, float, int, int]]  # role -> (pid, rss MB, fds, threads)


def router_processes(router: Router) -> dict[str, psutil.Process]:
    out = {"supervisor": psutil.Process(router.proc.pid)}
    for number, proc in router.numbered_workers().items():
        out[f"worker {number}"] = proc
    return out


def sample(router: Router, t: float) -> Sample:
    procs = {}
    for role, proc in sorted(router_processes(router).items()):
        try:
            with proc.oneshot():
                procs[role] = (proc.pid, proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads())
        except psutil.Error:
            pass  # gone between listing and reading: shows as missing in this row
    return Sample(t, procs)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def verdict(samples: list[Sample], warmup: float, tolerance: float) -> tuple[bool, list[str]]:
    after = [s for s in samples if s.t >= warmup]
    if len(after) < 2:
        return False, [f"not enough samples after the {warmup:g}s warm-up to judge"]
    base, last = after[0], after[-1]
    lines, flat = [], True
    for role in sorted(set(base.procs) | set(last.procs)):
        if role not in base.procs or role not in last.procs:
            lines.append(f"{role:11s} missing in the first or last sample after warm-up")
            flat = False
            continue
        if base.procs[role][0] != last.procs[role][0]:
            lines.append(f"{role:11s} was replaced during the run (pid {base.procs[role][0]} -> "
                         f"{last.procs[role][0]}): a worker died")
            flat = False
        for i, measure in enumerate(MEASURES, start=1):
            first, final = base.procs[role][i], last.procs[role][i]
            limit = first * (1 + tolerance)
            if measure != "rss":
                limit = max(limit, first + COUNT_SLACK)
            ok = final <= limit
            flat &= ok
            slope = slope_per_minute([(s.t, s.procs[role][i]) for s in after if role in s.procs])
            unit = " MB" if measure == "rss" else ""
            lines.append(f"{role:11s} {measure:7s} {first:9.1f}{unit} at {base.t:4.0f}s -> {final:9.1f}{unit} "
                         f"at {last.t:4.0f}s ({(final - first) / first * 100 if first else 0:+5.1f} %, "
                         f"{slope:+.2f}{unit}/min)  {'flat' if ok else 'GROWS'}")
    return flat, lines


def table(samples: list[Sample]) -> str:
    roles = sorted({r for s in samples for r in s.procs})
    head = "   t  " + "".join(f"| {r:^26s}" for r in roles)
    sub = "      " + "".join("| {:>8s} {:>7s} {:>8s} ".format("RSS MB", "fds", "threads") for _ in roles)
    rows = [head, sub]
    for s in samples:
        row = f"{s.t:5.0f}s"
        for r in roles:
            if r in s.procs:
                _, rss, fds, threads = s.procs[r]
                row += f"| {rss:8.1f} {fds:7d} {threads:8d} "
            else:
                row += "| " + "-".center(25) + " "
        rows.append(row)
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=1000, help="queries per second (dnsperf -Q)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the reference sample (default: a fifth of the run, <= 60)")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--names", type=int, default=5000, help="names in the zone (distinct query names)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    duration = max(1.0, args.minutes * 60)
    warmup = args.warmup if args.warmup is not None else min(60.0, duration / 5)
    if shutil.which("dnsperf") is None:
        print("dnsperf not found (Debian package dnsperf)", file=sys.stderr)
        return 2

    handle_signals()
    workdir = tempfile.mkdtemp(prefix="dnsrouter-soak-")
    knot = router = perf_proc = None
    perf_out = os.path.join(workdir, "dnsperf.out")
    samples: list[Sample] = []
    hard_deadline = time.monotonic() + duration + 60 + 60  # start-up included
    try:
        knot = KnotServer({ZONE: numbered_zone(ZONE, args.names, width=5)},
                          workdir=os.path.join(workdir, "knot")).start()
        router = bench_router(os.path.join(workdir, "router"), workers=args.workers, log_level="info",
                              routes_dir=os.path.join(workdir, "routes"))
        router.route("soak", rf"{knot.addr},\.soak\.example\.com\.$")
        start_router(router, lambda: answered(router, f"h00001.{ZONE}")
                     and len(router.worker_pids()) == args.workers,
                     timeout=15, message="the router never answered from Knot")
        qfile = os.path.join(workdir, "queries.txt")
        with open(qfile, "w") as f:
            f.writelines(f"h{i:05d}.{ZONE} A\n" for i in range(1, args.names + 1))

        print(f"soak: {duration:g}s at {args.rate} qps, {args.workers} workers, router {router.addr}, "
              f"Knot {knot.addr}, sample every {args.interval:g}s, warm-up {warmup:g}s; work dir {workdir}",
              flush=True)
        with open(perf_out, "w") as out:
            perf_proc = spawn(
                ["dnsperf", "-s", HOST, "-p", str(router.port), "-d", qfile, "-l", str(int(duration)),
                 "-Q", str(args.rate), "-c", "4", "-q", "500", "-t", "3", "-S", str(int(args.interval))],
                stdout=out, stderr=subprocess.STDOUT)
        start = time.monotonic()
        next_at = start
        while True:
            now = time.monotonic()
            if now >= next_at:
                samples.append(sample(router, now - start))
                s = samples[-1]
                print(f"  {s.t:5.0f}s " + "  ".join(f"{role}: {rss:.1f} MB {fds} fds {thr} thr"
                                                     for role, (_, rss, fds, thr) in s.procs.items()),
                      flush=True)
                next_at += args.interval
            if router.proc.poll() is not None:
                raise RuntimeError(f"the router exited with {router.proc.returncode}")
            if perf_proc.poll() is not None or now >= start + duration + 15 or now >= hard_deadline:
                break
            try:
                perf_proc.wait(max(0.01, min(next_at, start + duration + 15) - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if time.monotonic() - start - samples[-1].t > args.interval / 2:
            samples.append(sample(router, time.monotonic() - start))  # the end of the load
    except Interrupted as e:
        print(f"soak: interrupted by {e}; stopping", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return 2
    except Exception as e:  # anything: report it, and stop every process below
        print(f"soak: {type(e).__name__}: {e}", file=sys.stderr)
        if router is not None:
            print(router.log()[-3000:], file=sys.stderr)
        print(f"soak: work directory kept for a look: {workdir}", file=sys.stderr)
        return 2
    finally:
        ignore_signals()  # no second interrupt half way through cleanup
        stop(perf_proc, timeout=10)
        if router is not None:
            router.stop()
        if knot is not None:
            knot.stop()

    with open(perf_out, errors="replace") as f:
        perf_text = f.read()
    perf = parse_dnsperf(perf_text.splitlines())
    print()
    print(table(samples))
    print()
    print(f"dnsperf: {perf.sent} sent, {perf.completed} completed, {perf.lost} lost, "
          f"{perf.qps:.0f} qps, average latency {perf.avg_ms:.2f} ms, rcodes {perf.rcodes}")
    flat, lines = verdict(samples, warmup, args.tolerance)
    print("\n".join(lines))
    lost_ok = perf.sent > 0 and perf.lost <= perf.sent * 0.001
    others = {k: v for k, v in perf.rcodes.items() if k != "NOERROR"}
    if not lost_ok:
        print(f"dnsperf lost {perf.lost} of {perf.sent} queries (more than 0.1 %)")
    if others:
        print(f"answers other than NOERROR: {others}")
    print(f"verdict: {'FLAT' if flat else 'NOT FLAT'}"
          f"{'' if lost_ok and not others else ', with query losses or errors'}")
    if args.keep:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if flat and lost_ok and not others else 1


if __name__ == "__main__":
    sys.exit(main())
