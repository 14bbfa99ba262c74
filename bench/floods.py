#!/usr/bin/env python3
"""What floods cost the router (issue 28), each figure a ratio to routed queries in the same invocation.

One Knot backend (``zone.example.com.``, h0001..h5000) and one dnsrouter
with 2 workers and metrics, on 127.0.0.1 only; every measurement is
repeated ``--repeat`` times, the rounds interleaved (a busy spell of the
shared machine hits every kind alike), and the median kept:

* **routed**: dnsperf at full speed on names the route sends to Knot (the
  reference every ratio is taken against);
* **junk**: the issue's junk mix (support/floods.junk: random bytes, bit
  flips, compression loops, truncated queries, QR set, QDCOUNT 0 or 2,
  AXFR, bad labels) blasted as fast as one process sends from 4 sockets,
  for ``--duration``; what the router *processed* a second is read from its
  own counters (``dnsrouter_queries_total`` + ``dnsrouter_dropped_total``
  over the blast), not what was sent;
* **no route**: dnsperf on names no route matches (SERVFAIL, or REFUSED
  with ``[forward] no_route = refused``, made by the router itself);
* **AXFR**: dnsperf asking AXFR over UDP (NOTIMP, made by the router itself);
* **limits on**, against **limits off**: a router with ``[limits] client_qps`` and
  ``[rrl] responses_per_second`` at 10,000,000 (the checks run on every
  query, and never limit), routed names, against a router with them off;
  both answer routed queries only, none of the junk. Only when the router exports ``dnsrouter_limits_networks`` (the
  limiter exists); otherwise the script says it skipped them.

    .venv/bin/python bench/floods.py [--duration 10] [--repeat 3] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import (CpuMeter, Perf, bench_router, command_line, dnsperf_argv, finish_router, handle_signals,
                    ignore_signals, parse_dnsperf, process_tree, start_router, wait_idle)
from support.floods import Blaster, junk
from support.knot import KnotServer
from support.metrics import samples
from support.net import answered, free_port, rcode_of
from support.processes import spawn, stop, stop_all
from support.router import Router
from support.zones import numbered_zone

ZONE = "zone.example.com."
HOSTS = 5000
MATCH_RE = r"^h[0-9]+\.zone\.example\.com\.$"
HIGH = 10_000_000  # a rate the checks compare with and no client here reaches


def write(path: str, lines: list[str]) -> str:
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def dnsperf(port: int, qfile: str, args: argparse.Namespace, log: str, router: Router) -> Perf:
    """One dnsperf run at full speed, with the router's CPU seconds over it."""
    argv = dnsperf_argv(port, qfile, duration=args.duration, timeout=1, clients=args.clients,
                        outstanding=args.outstanding)
    meter = CpuMeter(process_tree(router.proc.pid))
    with open(log, "w") as out:
        proc = spawn(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(args.duration + 30)
        finally:
            stop(proc)
    used = meter.read()
    with open(log) as f:
        perf = parse_dnsperf(f)
    perf.cpu_s, perf.cpu_exited = used
    wait_idle(process_tree(router.proc.pid), timeout=20)
    return perf


PROCESSED = ("dnsrouter_queries_total", "dnsrouter_dropped_total")


def processed(mport: int) -> float:
    return sum(v for (name, _), v in samples(mport).items() if name in PROCESSED)


def settled_processed(mport: int, timeout: float = 15.0) -> float:
    """queries + dropped once they stop moving (the workers report once a second)."""
    last = processed(mport)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.2)  # a report interval and a bit: the window compared, not a wait for an event
        now = processed(mport)
        if now == last:
            return now
        last = now
    return last


def blast(router: Router, mport: int, datagrams: list[bytes], args: argparse.Namespace) -> tuple[float, float, Perf]:
    """(processed a second, sent a second, a Perf with the router's CPU) of one junk blast."""
    before = settled_processed(mport)
    meter = CpuMeter(process_tree(router.proc.pid))
    started = time.monotonic()
    with Blaster(router.port, datagrams, sockets=4, sources=[f"127.0.3.{i}" for i in range(1, 5)],
                 duration=args.duration) as blaster:
        sent = blaster.wait(args.duration + 30)
    took = time.monotonic() - started
    after = settled_processed(mport)
    used = meter.read()
    perf = Perf(completed=int(after - before), qps=(after - before) / took)
    perf.cpu_s, perf.cpu_exited = used
    wait_idle(process_tree(router.proc.pid), timeout=20)
    return (after - before) / took, sent / took, perf


def make_router(workdir: str, name: str, knot: KnotServer, ini: str) -> tuple[Router, int]:
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    conf = write(os.path.join(d, "dnsrouter.ini"), ini.splitlines())
    mport = free_port("tcp")
    router = bench_router(d, workers=2, args=["--config", conf, "--metrics", f"127.0.0.1:{mport}"])
    router.route("zone", f"{knot.addr},{MATCH_RE}")
    start_router(router, lambda: answered(router, "h0001.zone.example.com."), 20, f"router {name} not routing")
    assert rcode_of(router, "h0001.nowhere.example.") == 2, "an unrouted name does not get SERVFAIL"
    return router, mport


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each run")
    p.add_argument("--repeat", type=int, default=3, help="rounds (the median is kept)")
    p.add_argument("--clients", type=int, default=20, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--keep", action="store_true", help="keep the work directory (dnsperf outputs, router logs)")
    args = p.parse_args()
    handle_signals()
    workdir = tempfile.mkdtemp(prefix="bench-floods-")
    routers: list[Router] = []
    knot: KnotServer | None = None
    try:
        knot = KnotServer({ZONE: numbered_zone(ZONE, HOSTS)}, workers=2).start()
        names = [f"h{i:04d}.zone.example.com." for i in range(1, HOSTS + 1)]
        files = {
            "routed": write(os.path.join(workdir, "routed"), [f"{n} A" for n in names]),
            "no route": write(os.path.join(workdir, "noroute"),
                              [f"h{i:04d}.nowhere.example. A" for i in range(1, HOSTS + 1)]),
            "AXFR": write(os.path.join(workdir, "axfr"), [f"{ZONE} AXFR"] * 100),
        }
        garbage = junk(50_000, seed=28, names=names)
        off, off_m = make_router(workdir, "off", knot, "")
        routers.append(off)
        limiter = "dnsrouter_limits_networks" in {name for name, _ in samples(off_m)}
        on = plain = None
        if limiter:
            # Two more routers that answer routed queries only, one with the limits: the one
            # above also takes the junk, and a router's state after a blast is not a fresh one's.
            on, _ = make_router(workdir, "on", knot, f"[limits]\nclient_qps = {HIGH}\n"
                                                     f"[rrl]\nresponses_per_second = {HIGH}\n")
            plain, _ = make_router(workdir, "plain", knot, "")
            routers += [on, plain]
        kinds = ["routed", "junk", "no route", "AXFR"] + (["limits off", "limits on"] if on else [])
        runs: dict[str, list[Perf]] = {k: [] for k in kinds}
        sent_rates: list[float] = []
        for i in range(args.repeat):
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                log = os.path.join(workdir, f"{kind.replace(' ', '-')}-{i}.out")
                if kind == "junk":
                    _, sent_rate, perf = blast(off, off_m, garbage, args)
                    sent_rates.append(sent_rate)
                elif kind.startswith("limits"):
                    r = on if kind == "limits on" else plain
                    assert r is not None
                    perf = dnsperf(r.port, files["routed"], args, log, r)
                else:
                    perf = dnsperf(off.port, files[kind], args, log, off)
                runs[kind].append(perf)
                print(f"round {i + 1} {kind}: {perf.qps:,.0f} a second, rcodes {perf.rcodes or '-'}, "
                      f"lost {perf.lost}", file=sys.stderr)
        med = {k: sorted(v, key=lambda p: p.qps)[len(v) // 2] for k, v in runs.items()}
        base = med["routed"]
        print(f"\n`{command_line()}`: dnsrouter, 2 workers, one Knot; dnsperf -c {args.clients} "
              f"-q {args.outstanding} -l {args.duration:g}; median of {args.repeat} (range in brackets)\n")
        print("| kind | per second | routed | ratio | router CPU µs each | routed | ratio | rcodes |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for kind in kinds:
            perf = med[kind]
            spread = sorted(p.qps for p in runs[kind])
            rng = f"{perf.qps:,.0f} ({spread[0]:,.0f}-{spread[-1]:,.0f})"
            ratio = perf.qps / base.qps if base.qps else float("nan")
            cpu_ratio = perf.cpu_us / base.cpu_us if base.cpu_us else float("nan")
            rcodes = ", ".join(f"{k} {v}" for k, v in sorted(perf.rcodes.items())) if kind != "junk" else \
                f"blasted {median(sent_rates):,.0f}/s"
            print(f"| {kind} | {rng} | {base.qps:,.0f} | **{ratio:.2f}** | {perf.cpu_us:.1f} | "
                  f"{base.cpu_us:.1f} | {cpu_ratio:.2f} | {rcodes} |")
        if on:
            off_perf, on_perf = med["limits off"], med["limits on"]
            print(f"\nlimits on against limits off (routers that answer routed queries only): "
                  f"**{on_perf.qps / off_perf.qps:.3f}**x the qps, {on_perf.cpu_us / off_perf.cpu_us:.3f}x "
                  f"the router CPU a query")
        else:
            print("\nlimits on: not measured, this router exports no dnsrouter_limits_networks "
                  "(the limiter is not there yet)")
    finally:
        ignore_signals()
        for r in routers:
            finish_router(r, "warning", lines=5)
        if knot is not None:
            knot.close()
        stop_all()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
