#!/usr/bin/env python3
"""Benchmark dnsrouter against the bare backend and against dnsdist.

One invocation starts one Knot backend, then measures with dnsperf:

* the backend directly (baseline);
* dnsrouter with R routes (the matching route registered last, R-1
  non-matching routes before it) for each worker count;
* dnsdist with the equivalent R RegexRule/PoolAction rules, same order;
* a fixed-rate run (dnsperf -Q) against backend, router and dnsdist, to
  compare the latency each hop adds when nobody is saturated;
* with --client-address none,proxy,ecs, each dnsrouter measurement once per
  mode (one router per mode, their runs interleaved), against a backend that
  takes PROXY v2 headers and ECS, and the ratio of each mode to none;
* with --python-path, the same for the pure-Python packet path (mode
  python: --fast-path off) beside the compiled one (none);
* with --flood, every saturating run once more with names never seen before
  in the run (a random-subdomain flood: NXDOMAIN from Knot, no route cache
  hit in the router);
* with --cache N, one more router with the packet cache on (--cache-size N,
  mode cache) and one more dnsdist with its packet cache (N entries,
  dontAge, as PowerDNS advises in front of authoritative servers), in the
  same rounds: the packet cache table compares them (cache hits with
  repeated names, the flood's misses, the latency at the fixed rate).

Every run also reports the CPU time per query of the server measured.

It prints Markdown tables (and writes them to --out). See bench/README.md.

    python3 bench/run.py --quick
    python3 bench/run.py --transport udp,tcp --out bench/results.md
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rcode
import psutil

from common import (CpuMeter, Perf, bench_router, dnsperf_argv, handle_signals, ignore_signals, parse_dnsperf,
                    process_tree, start_router, wait_idle)
from report import Row, fmt, tables
from support.knot import KnotServer
from support.net import HOST, answered, free_port, query, raw_udp, wait_until
from support.processes import spawn, stop, stop_all
from support.router import Router
from support.zones import numbered_zone

ZONE = "zone.example.com."
# The same regexp text serves both routers: dnsrouter matches the name with
# its trailing dot under RE2, dnsdist 1.7's RegexRule matches the name
# without it under POSIX ERE; "\.?$" accepts both.
MATCH_RE = r"^h[0-9]+\.zone\.example\.com\.?$"
CLIENT_ADDRESS_MODES = ("none", "proxy", "ecs")  # [forward] client_address
# The backend's options when proxy or ecs is measured: it answers all modes.
KNOT_CLIENT_ADDRESS: dict[str, Any] = {"proxy_allowlist": ["127.0.0.0/8"], "edns_client_subnet": True}
# Flood names per second of dnsperf -l: above what any server here answers
# (Knot alone: 105,000-120,000 qps over UDP, 138,000 in a 1 s run), so that
# no name comes twice in a run. Drawing them costs ~1.7 s per million.
FLOOD_QPS = 200_000
# The rcode every query of a kind must get; any other is a problem.
EXPECTED_RCODE = {"throughput": "NOERROR", "flood": "NXDOMAIN", "fixed-rate": "NOERROR"}


def nomatch_re(i: int) -> str:
    return rf"^x\.zone{i}\.example\.com\.?$"


def write_flood_queries(path: str, names: int) -> None:
    """``names`` distinct names the matching route takes and the zone lacks
    (Knot: NXDOMAIN): h + 12 random digits, never a zone name (h + 4 digits).
    sample() draws without replacement, so no name comes twice; the fixed
    seed sends the same names in every invocation."""
    line = "h{:012d}." + ZONE + " A\n"
    with open(path, "w") as f:
        f.write("".join(map(line.format, random.Random(1).sample(range(10**12), names))))


class Target(NamedTuple):
    """What a dnsperf run is pointed at: the port, and the process whose CPU
    time, with all its descendants' (a router's workers), the run costs."""
    port: int
    pid: int | None


# -- dnsperf -----------------------------------------------------------------

def kernel_counters() -> dict[str, int]:
    """Host-wide UDP/TCP drop counters (/proc/net/snmp, netstat): on this
    machine only the benchmark's processes move them, so a delta over one
    run says whether a socket buffer or a listen queue overflowed."""
    want = {("Udp", "RcvbufErrors"), ("Udp", "SndbufErrors"), ("Udp", "InErrors"),
            ("TcpExt", "ListenOverflows"), ("TcpExt", "ListenDrops")}
    out: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for head, vals in zip(lines[::2], lines[1::2]):
            proto, names = head.split(":", 1)
            for name, val in zip(names.split(), vals.split(":", 1)[1].split()):
                if (proto, name) in want:
                    out[f"{proto}.{name}"] = int(val)
    return out


def run_dnsperf(target: Target, qfile: str, transport: str, args: argparse.Namespace,
                workdir: str, tag: str, qps_limit: int | None = None) -> Perf:
    """dnsperf against 127.0.0.1:port, ``--repeat`` times: the median run
    (by qps when saturating, by average latency at a fixed rate), with the
    lost queries, rcodes and kernel drops of every run added up."""
    runs = [_dnsperf_once(target, qfile, transport, args, workdir, f"{tag}-{i}", qps_limit)
            for i in range(args.repeat)]
    return median_run(runs, qps_limit)


def run_dnsperf_rounds(targets: dict[str, Target], qfile: str, transport: str, args: argparse.Namespace,
                       workdir: str, tag: str, qps_limit: int | None = None) -> dict[str, Perf]:
    """run_dnsperf against each target (name -> target: the routers' modes,
    and dnsdist or the backend where they are compared in the same rounds),
    in ``--repeat`` rounds of one run each, the order turned each round (a,
    b, c, then b, c, a, ...): a busy spell of the shared machine, or being
    first after a pause, then hits every target alike, not just one."""
    runs: dict[str, list[Perf]] = {name: [] for name in targets}
    names = list(targets)
    for i in range(args.repeat):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(_dnsperf_once(targets[name], qfile, transport, args, workdir,
                                            f"{mode_tag(tag, name)}-{i}", qps_limit))
    return {name: median_run(name_runs, qps_limit) for name, name_runs in runs.items()}


def median_run(runs: list[Perf], qps_limit: int | None) -> Perf:
    """The median of repeated runs, with the others' losses, rcodes and kernel drops added to it."""
    runs.sort(key=(lambda p: p.avg_s) if qps_limit else (lambda p: p.qps))
    median = runs[len(runs) // 2]
    for other in runs:
        if other is not median:
            median.lost += other.lost
            for table, extra in ((median.rcodes, other.rcodes), (median.kernel, other.kernel)):
                for key, n in extra.items():
                    table[key] = table.get(key, 0) + n
    median.spread = [p.qps if not qps_limit else p.avg_ms for p in runs]
    return median


def _dnsperf_once(target: Target, qfile: str, transport: str, args: argparse.Namespace,
                  workdir: str, tag: str, qps_limit: int | None) -> Perf:
    """One dnsperf run. -v gives every query's latency, from which the 99th
    percentile is computed (dnsperf 2.10 prints none). The target's processes
    are listed right before the run (a worker the supervisor restarted since
    the last run is in the set), their CPU time read before and after it."""
    argv = dnsperf_argv(target.port, qfile, transport=transport, clients=args.clients,
                        outstanding=args.outstanding, duration=args.duration, timeout=args.timeout, qps=qps_limit)
    out_path = os.path.join(workdir, f"dnsperf-{tag}.out")
    before = kernel_counters()
    cpu = CpuMeter(process_tree(target.pid))
    with open(out_path, "w") as out:
        proc = spawn(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(args.duration + args.timeout + 30)
        finally:
            stop(proc)
    cpu_use = cpu.read()
    after = kernel_counters()
    if not wait_idle(process_tree(target.pid)):
        print(f"warning: {tag}: the server was still busy a minute after dnsperf stopped", file=sys.stderr)
    with open(out_path, errors="replace") as f:
        perf = parse_dnsperf(f)
    if perf.sent == 0:
        raise RuntimeError(f"dnsperf produced no statistics, see {out_path}:\n{perf.raw_tail}")
    perf.kernel = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    perf.cpu_s, perf.cpu_exited = cpu_use
    return perf


# -- servers -----------------------------------------------------------------

def answers(port: int) -> bool:
    """h0001 gets NOERROR with an answer over UDP and over TCP."""
    return (answered(port, f"h0001.{ZONE}", "udp", timeout=0.5)
            and answered(port, f"h0001.{ZONE}", "tcp", timeout=1.0))


def rcode_of(port: int, name: str) -> str:
    try:
        r = query(name, "A", port=port, timeout=2.0)
    except (dns.exception.DNSException, OSError) as e:
        return f"no answer ({type(e).__name__})"
    return dns.rcode.to_text(r.rcode())


def sanity(port: int, routes: int, who: str) -> list[str]:
    """The routing table does what the benchmark assumes: the query names
    reach the backend, a non-matching route's own name goes to the backend
    (which REFUSEs it: not its zone), a name no route matches gets SERVFAIL,
    and a name of the flood's shape reaches the backend, which has no such
    name (13 digits: never one of the flood's, which must come new in a run)."""
    want = {f"h0002.{ZONE}": "NOERROR", f"nothing.{ZONE}": "SERVFAIL", f"h{'9' * 13}.{ZONE}": "NXDOMAIN"}
    if routes > 1:
        want[f"x.zone{routes - 2}.example.com."] = "REFUSED"
    got = {name: rcode_of(port, name) for name in want}
    return [f"{who}: {name} answered {got[name]}, expected {rc}" for name, rc in want.items() if got[name] != rc]


def write_routes(d: str, routes: int, backend: str) -> None:
    os.makedirs(d, exist_ok=True)
    for i in range(routes - 1):
        with open(os.path.join(d, f"r{i:06d}"), "w") as f:
            f.write(f"{backend},{nomatch_re(i)}")
    # 'zz' sorts after every 'r...' name: the matching route has the lowest precedence.
    with open(os.path.join(d, "zz-match"), "w") as f:
        f.write(f"{backend},{MATCH_RE}")


def lua_quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_dnsdist_conf(path: str, port: int, backend: str, routes: int, cache: int = 0) -> None:
    lines = [
        "setSecurityPollSuffix('')",
        f"setLocal('{HOST}:{port}')",
        # Health check with a name Knot answers authoritatively (the default
        # a.root-servers.net would get REFUSED).
        f"newServer({{address='{backend}', pool='p', checkName='{ZONE}', checkType='SOA'}})",
        f"newServer({{address='{backend}', pool='other', checkName='{ZONE}', checkType='SOA'}})",
    ]
    for i in range(routes - 1):
        lines.append(f"addAction(RegexRule({lua_quote(nomatch_re(i))}), PoolAction('other'))")
    lines.append(f"addAction(RegexRule({lua_quote(MATCH_RE)}), PoolAction('p'))")
    # Anything that falls through: answer like dnsrouter does, SERVFAIL.
    lines.append("addAction(AllRule(), RCodeAction(DNSRCode.SERVFAIL))")
    if cache:  # dontAge: the TTLs as the authoritative backend gave them, as dnsrouter's cache serves them
        lines.append(f"getPool('p'):setCache(newPacketCache({cache}, {{maxTTL=3600, maxNegativeTTL=300, "
                     f"dontAge=true}}))")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def router(routes_dir: str, workers: int, workdir: str, tag: str, mode: str = "none",
           baseline: str | None = None, cache: int = 0) -> Router:
    """The dnsrouter of this interpreter's environment, at --log-level warning
    (not whichever comes first on PATH: that may be another build), with
    ``--client-address mode`` unless mode is none (the default); mode python:
    the pure-Python packet path (--fast-path off), client address none; mode
    baseline: the command line ``baseline`` (another build), as it is; mode
    cache: the packet cache on, ``cache`` entries."""
    if mode == "baseline":
        assert baseline is not None
        return bench_router(os.path.join(workdir, f"router-{tag}"), workers=workers, routes_dir=routes_dir,
                            executable=shlex.split(baseline))
    args = {"none": [], "python": ["--fast-path", "off"],
            "cache": ["--cache-size", str(cache)]}.get(mode, ["--client-address", mode])
    return bench_router(os.path.join(workdir, f"router-{tag}"), workers=workers, routes_dir=routes_dir, args=args)


def mode_tag(tag: str, mode: str) -> str:
    """A router's or run's tag with its client-address mode (none: the tag as it was)."""
    return tag if mode == "none" else f"{tag}-{mode}"


# -- client address ------------------------------------------------------------

def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 header for an IPv4 datagram (haproxy specification 2.2),
    built here rather than with dnsrouter.proxy, so that the backend check
    does not rest on the code being measured."""
    return struct.pack("!12sBBH4s4sHH", b"\r\n\r\n\x00\r\nQUIT\n", 0x21, 0x12, 12,
                       socket.inet_aton(source[0]), socket.inet_aton(destination[0]), source[1], destination[1])


def has_ecs(reply: dns.message.Message) -> bool:
    return any(o.otype == dns.edns.OptionType.ECS for o in reply.options)


def check_backend_modes(port: int, modes: list[str]) -> None:
    """RuntimeError unless the backend answers what the modes send it: a
    datagram behind a PROXY v2 header (Knot drops one from outside its
    proxy-allowlist: the benchmark would measure timeouts) and a query with
    ECS (echoed when Knot reads it: edns-client-subnet on)."""
    name = f"h0001.{ZONE}"
    if "proxy" in modes:
        wire = raw_udp(port, proxy_v2_header(("192.0.2.1", 5300), (HOST, port))
                       + dns.message.make_query(name, "A").to_wire(), timeout=1.0)
        reply = dns.message.from_wire(wire) if wire else None
        if reply is None or reply.rcode() != dns.rcode.NOERROR or not reply.answer:
            raise RuntimeError(f"the backend on port {port} did not answer a query behind a PROXY v2 header "
                               f"(reply: {reply and dns.rcode.to_text(reply.rcode())}): no proxy-allowlist?")
    if "ecs" in modes:
        q = dns.message.make_query(name, "A", use_edns=0, options=[dns.edns.ECSOption("192.0.2.0", 24)])
        reply = dns.query.udp(q, HOST, port=port, timeout=1.0)
        if reply.rcode() != dns.rcode.NOERROR or not has_ecs(reply):
            raise RuntimeError(f"the backend on port {port} did not echo an ECS option "
                               f"(rcode {dns.rcode.to_text(reply.rcode())}): edns-client-subnet off?")


def check_router_mode(port: int, mode: str, who: str) -> None:
    """RuntimeError unless the router in this mode gets h0002 answered by the
    backend (proxy: the backend took the router's header), and, with ecs,
    takes the backend's echoed ECS option out of the reply."""
    if mode == "none":
        return
    try:
        reply = query(f"h0002.{ZONE}", "A", port=port, timeout=2.0)
    except (dns.exception.DNSException, OSError) as e:
        raise RuntimeError(f"{who}: no answer to h0002.{ZONE} with --client-address {mode} ({e!r})") from None
    if reply.rcode() != dns.rcode.NOERROR or not reply.answer:
        raise RuntimeError(f"{who}: h0002.{ZONE} with --client-address {mode} answered "
                           f"{dns.rcode.to_text(reply.rcode())} without the backend's records")
    if mode == "ecs" and has_ecs(reply):
        raise RuntimeError(f"{who}: the reply still carries the ECS option the router added")


def start(r: Router, startup_timeout: float) -> float:
    """Start r; the seconds until it answered h0001 over UDP and TCP."""
    return start_router(r, lambda: answers(r.port), startup_timeout, interval=0.1,
                        message=f"dnsrouter on port {r.port} did not answer h0001.{ZONE}")


def targets(routers: dict[str, Router], others: dict[str, Target] | None = None) -> dict[str, Target]:
    """Each mode's router as a dnsperf target (its supervisor's tree), then
    ``others`` (dnsdist, the backend), to be measured in the same rounds."""
    return {**{mode: Target(r.port, r.proc.pid if r.proc else None) for mode, r in routers.items()}, **(others or {})}


def dnsdists(d: Dnsdist | None, d_cache: Dnsdist | None) -> dict[str, Target]:
    """The dnsdist targets that run, by name, for run_dnsperf_rounds."""
    return {name: each.target for name, each in (("dnsdist", d), ("dnsdist-cache", d_cache)) if each is not None}


def worker_rss_mb(r: Router) -> list[float]:
    """RSS of each ``dnsrouter: worker K``, in K order."""
    out = []
    for _, proc in sorted(r.numbered_workers().items(), key=lambda item: int(item[0])):
        try:
            out.append(proc.memory_info().rss / 2**20)
        except psutil.Error:
            pass
    return out


class Dnsdist:
    def __init__(self, backend: str, routes: int, workdir: str, tag: str, startup_timeout: float,
                 cache: int = 0) -> None:
        """``cache``: entries of a packet cache on the matching pool (0: none)."""
        self.port = free_port("both")
        self.conf = os.path.join(workdir, f"dnsdist-{tag}.conf")
        self.log_path = os.path.join(workdir, f"dnsdist-{tag}.log")
        write_dnsdist_conf(self.conf, self.port, backend, routes, cache)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Dnsdist":
        with open(self.log_path, "wb") as log:
            self.proc = proc = spawn(["dnsdist", "--supervised", "--disable-syslog", "-C", self.conf],
                                     stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"dnsdist exited with {proc.returncode}:\n{self.log()}")
            return answers(self.port)

        try:
            wait_until(ready, timeout=self.startup_timeout, interval=0.1,
                       message=f"dnsdist on port {self.port} did not answer h0001.{ZONE}")
        except AssertionError as e:
            raise RuntimeError(f"{e}\n{self.log()[-3000:]}") from None
        return self

    @property
    def target(self) -> Target:
        return Target(self.port, self.proc.pid if self.proc else None)

    def rss_mb(self) -> float:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss / 2**20 if self.proc else math.nan
        except psutil.NoSuchProcess:
            return math.nan

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        stop(self.proc, timeout=10.0)


# -- main ----------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="-l 3, routes 1 and 1000 only")
    p.add_argument("--routes", help="comma separated route counts (default 1,1000,10000)")
    p.add_argument("--workers", default="1,2", help="comma separated dnsrouter worker counts")
    p.add_argument("--duration", type=int, help="dnsperf -l seconds (default 10, --quick 3)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per measurement; the tables show the median (qps moves ±10-15 %% between runs "
                        "on a small shared machine)")
    p.add_argument("--transport", default="udp", help="udp, tcp or udp,tcp")
    p.add_argument("--clients", type=int, default=20, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--timeout", type=int, default=2, help="dnsperf -t seconds (a query older is lost)")
    p.add_argument("--fixed-qps", type=int, default=2000, help="rate of the fixed-rate latency runs (0: skip)")
    p.add_argument("--names", type=int, default=5000, help="A records in the zone / query file")
    p.add_argument("--knot-workers", type=int, default=1, help="knotd udp/tcp workers")
    p.add_argument("--no-dnsdist", action="store_true", help="skip dnsdist even if installed")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory (dnsperf output, logs)")
    p.add_argument("--out", help="also write the tables to this file")
    p.add_argument("--client-address", default="none", metavar="MODES",
                   help="comma separated dnsrouter --client-address modes to measure in turn (none, proxy, ecs; "
                        "default none); with proxy or ecs the backend takes PROXY v2 headers and ECS")
    p.add_argument("--python-path", action="store_true",
                   help="also measure every dnsrouter with --fast-path off (the pure-Python packet path), "
                        "shown as mode python beside none")
    p.add_argument("--flood", action="store_true",
                   help="also measure every saturating run with names never seen before in the run "
                        "(h + 12 random digits: NXDOMAIN from the backend), in a table of their own")
    p.add_argument("--cache", type=int, default=0, metavar="N",
                   help="also measure dnsrouter with --cache-size N (mode cache) and dnsdist with a packet "
                        "cache of N entries, in the same rounds (the packet cache table)")
    p.add_argument("--baseline", metavar="COMMAND",
                   help="another dnsrouter build's command line (say, a virtual environment of the previous "
                        "release, with flags), measured beside the others as mode baseline")
    a = p.parse_args(argv)
    a.client_address = list(dict.fromkeys(m.strip() for m in a.client_address.split(",")))
    for m in a.client_address:
        if m not in CLIENT_ADDRESS_MODES:
            p.error(f"unknown client address mode {m!r} (known: {', '.join(CLIENT_ADDRESS_MODES)})")
    if a.python_path:  # measured like one more mode: its own router, runs interleaved
        a.client_address.append("python")
    if a.baseline:
        a.client_address.append("baseline")
    if a.cache:
        a.client_address.append("cache")
    a.routes = [int(x) for x in (a.routes or ("1,1000" if a.quick else "1,1000,10000")).split(",")]
    a.workers = [int(x) for x in a.workers.split(",")]
    a.transport = [t.strip() for t in a.transport.split(",")]
    for t in a.transport:
        if t not in ("udp", "tcp"):
            p.error(f"unknown transport {t!r}")
    if any(r < 1 for r in a.routes):
        p.error("route counts must be >= 1")
    if a.duration is None:
        a.duration = 3 if a.quick else 10
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handle_signals()
    if shutil.which("dnsperf") is None:
        print("dnsperf not found in PATH", file=sys.stderr)
        return 2
    have_dnsdist = shutil.which("dnsdist") is not None and not args.no_dnsdist
    client_modes = bool({"proxy", "ecs"} & set(args.client_address))
    workdir = tempfile.mkdtemp(prefix="dnsrouter-bench-")
    rows: list[Row] = []
    problems: list[str] = []
    t_start = time.monotonic()
    knot = None
    interrupted = False
    flood_names = args.duration * FLOOD_QPS

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def note(row: Row) -> None:
        p = row.perf
        bad = {k: v for k, v in p.rcodes.items() if k != EXPECTED_RCODE[row.kind]}
        # dnsperf starts the file over at its end: a flood run past it sent names twice.
        repeated = row.kind == "flood" and max(p.spread, default=p.qps) * args.duration > flood_names
        mode = "" if row.client_address == "none" else f" client-address={row.client_address}"
        log(f"  {row.kind} {row.scenario} {row.transport} routes={row.routes} workers={row.workers}{mode}: "
            f"qps={p.qps:.0f} avg={fmt(p.avg_ms)}ms p99={fmt(p.p99_ms)}ms cpu={fmt(p.cpu_us, 1)}us/q "
            f"lost={p.lost} rcodes={p.rcodes} kernel={p.kernel} reconnections={p.reconnections}")
        if p.lost or bad or p.kernel or p.reconnections or repeated or p.cpu_exited:
            problems.append(f"{row.kind} {row.scenario} {row.transport} routes={row.routes} "
                            f"workers={row.workers}{mode}: sent {p.sent}, lost {p.lost}, rcodes {p.rcodes}"
                            + (f", kernel drop counters {p.kernel}" if p.kernel else "")
                            + (f", TCP reconnections {p.reconnections}" if p.reconnections else "")
                            + (f", more queries than the {flood_names} flood names: some came twice "
                               f"(raise FLOOD_QPS)" if repeated else "")
                            + (f", {p.cpu_exited} of its processes exited during the run: CPU us/q too low"
                               if p.cpu_exited else ""))
        rows.append(row)

    def router_stderr_check(r: Router, tag: str, rc: int | None) -> None:
        text = r.log().strip()
        if text:
            lines = text.splitlines()
            problems.append(f"router {tag}: {len(lines)} stderr line(s); last: " + " || ".join(lines[-5:]))
        if rc not in (0, None):
            problems.append(f"router {tag}: exit status {rc} after SIGTERM")

    def start_routers(routers: dict[str, Router], rdir: str, routes: int, w: int, tag: str, check: bool) -> None:
        """One router per --client-address mode, into routers (so that the
        caller stops them all, even when one fails); check: the sanity check."""
        for mode in args.client_address:
            who = mode_tag(tag, mode)
            routers[mode] = r = router(rdir, w, workdir, who, mode, args.baseline, args.cache)
            ready_s = start(r, args.startup_timeout)
            mode_note = "" if mode == "none" else f" client-address={mode}"
            log(f"dnsrouter routes={routes} workers={w}{mode_note} answering after {ready_s:.1f}s")
            if check:
                problems.extend(sanity(r.port, routes, f"router {who}"))
            check_router_mode(r.port, mode, f"router {who}")

    def stop_routers(routers: dict[str, Router], tag: str) -> None:
        for mode, r in routers.items():
            router_stderr_check(r, mode_tag(tag, mode), r.stop())

    def note_runs(kind: str, t: str, routes: int, w: int, perfs: dict[str, Perf], routers: dict[str, Router],
                  d: Dnsdist | None, d_cache: Dnsdist | None = None) -> None:
        """The rows of one interleaved measurement: each router mode's, then
        dnsdist's if it ran (and the one with its packet cache, as mode cache)."""
        for mode, perf in perfs.items():
            if mode in ("dnsdist", "dnsdist-cache"):
                continue
            note(Row(kind, "dnsrouter", t, routes, w, perf, worker_rss_mb(routers[mode]), client_address=mode))
            if len(rows[-1].rss_mb) != w:
                problems.append(f"router {mode_tag(f'r{routes}-w{w}', mode)}: found {len(rows[-1].rss_mb)} "
                                f"worker processes, expected {w}")
        if "dnsdist" in perfs and d is not None:
            note(Row(kind, "dnsdist", t, routes, None, perfs["dnsdist"], [d.rss_mb()]))
        if "dnsdist-cache" in perfs and d_cache is not None:
            note(Row(kind, "dnsdist", t, routes, None, perfs["dnsdist-cache"], [d_cache.rss_mb()],
                     client_address="cache"))

    try:
        # With proxy or ecs measured, one backend answers every mode: it
        # takes PROXY v2 headers from loopback and reads ECS (none as well).
        knot = KnotServer({ZONE: numbered_zone(ZONE, args.names)}, workers=args.knot_workers,
                          workdir=os.path.join(workdir, "knot"),
                          **(KNOT_CLIENT_ADDRESS if client_modes else {}))
        knot.start()
        backend = knot.addr
        log(f"knotd on {backend}, workdir {workdir}")
        check_backend_modes(knot.port, args.client_address)
        knot_target = Target(knot.port, knot.pid)
        qfile = os.path.join(workdir, "queries.txt")
        with open(qfile, "w") as f:
            f.writelines(f"h{i:04d}.{ZONE} A\n" for i in range(1, args.names + 1))
        # Each saturating run: (kind, query file, prefix of its dnsperf outputs).
        scenarios = [("throughput", qfile, "")]
        if args.flood:
            scenarios.append(("flood", os.path.join(workdir, "flood.txt"), "flood-"))
            write_flood_queries(scenarios[-1][1], flood_names)
            log(f"{flood_names} flood names written")

        for t, (kind, qf, prefix) in itertools.product(args.transport, scenarios):
            note(Row(kind, "backend", t, None, None,
                     run_dnsperf(knot_target, qf, t, args, workdir, f"{prefix}backend-{t}")))

        # dnsdist runs interleaved with the routers of this worker count, as the
        # fixed-rate runs are: their ratio is the figure the targets are stated in.
        paired = 2 if 2 in args.workers else max(args.workers)
        for routes in args.routes:
            rdir = os.path.join(workdir, f"routes-{routes}")
            write_routes(rdir, routes, backend)
            d = Dnsdist(backend, routes, workdir, f"r{routes}", args.startup_timeout) if have_dnsdist else None
            d_cache = (Dnsdist(backend, routes, workdir, f"r{routes}-cache", args.startup_timeout, args.cache)
                       if have_dnsdist and args.cache else None)
            try:
                for each in (d, d_cache):
                    if each is not None:
                        each.start()
                        problems.extend(sanity(each.port, routes, f"dnsdist r{routes}"))
                for w in args.workers:
                    tag = f"r{routes}-w{w}"
                    routers: dict[str, Router] = {}
                    try:
                        start_routers(routers, rdir, routes, w, tag, check=True)
                        for t, (kind, qf, prefix) in itertools.product(args.transport, scenarios):
                            others = dnsdists(d, d_cache) if w == paired else {}
                            perfs = run_dnsperf_rounds(targets(routers, others), qf, t, args, workdir,
                                                       f"{prefix}r{routes}-w{w}-{t}")
                            note_runs(kind, t, routes, w, perfs, routers, d, d_cache)
                    finally:
                        stop_routers(routers, tag)
            finally:
                for each in (d, d_cache):
                    if each is not None:
                        each.stop()

        if args.fixed_qps:
            # Backend, routers and dnsdist all running, their runs interleaved:
            # the added latency is a difference of two small figures, which a
            # quiet or busy spell of the machine would otherwise decide.
            log(f"fixed-rate runs at {args.fixed_qps} qps")
            rdir = os.path.join(workdir, "routes-1")
            if not os.path.isdir(rdir):
                write_routes(rdir, 1, backend)
            routers = {}
            d = Dnsdist(backend, 1, workdir, "fixed", args.startup_timeout) if have_dnsdist else None
            d_cache = (Dnsdist(backend, 1, workdir, "fixed-cache", args.startup_timeout, args.cache)
                       if have_dnsdist and args.cache else None)
            try:
                start_routers(routers, rdir, 1, paired, f"fixed-w{paired}", check=False)
                for each in (d, d_cache):
                    if each is not None:
                        each.start()
                for t in args.transport:
                    others = {"backend": knot_target, **dnsdists(d, d_cache)}
                    perfs = run_dnsperf_rounds(targets(routers, others), qfile, t, args, workdir, f"fixed-{t}",
                                               args.fixed_qps)
                    note(Row("fixed-rate", "backend", t, None, None, perfs.pop("backend")))
                    note_runs("fixed-rate", t, 1, paired, perfs, routers, d, d_cache)
            finally:
                stop_routers(routers, f"fixed-w{paired}")
                for each in (d, d_cache):
                    if each is not None:
                        each.stop()
    except KeyboardInterrupt:  # Interrupted (SIGINT, SIGTERM) too
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        ignore_signals()
        stop_all()
        if knot is not None:
            knot.stop()
        if not args.keep and not interrupted:
            shutil.rmtree(workdir, ignore_errors=True)

    header = (f"## dnsrouter benchmark\n\n"
              f"{os.cpu_count()} CPUs; dnsperf -c {args.clients} -q {args.outstanding} -l {args.duration} "
              f"-t {args.timeout} -v; {args.names} names; knotd workers {args.knot_workers}; "
              + (f"median of {args.repeat} runs each (qps range in brackets; lost and rcodes: all runs); "
                 if args.repeat > 1 else "")
              + (f"client address modes {','.join(args.client_address)} (knotd: proxy-allowlist "
                 f"{','.join(KNOT_CLIENT_ADDRESS['proxy_allowlist'])}, edns-client-subnet on); "
                 if client_modes else "")
              + (f"flood: {flood_names} names h + 12 random digits, seed 1 (NXDOMAIN expected); "
                 if args.flood else "")
              + (f"packet caches of {args.cache} entries; " if args.cache else "")
              + f"dnsdist {'yes' if have_dnsdist else 'not run'}; total {time.monotonic() - t_start:.0f}s")
    text = tables(rows, header)
    if problems:
        text += "\n### Problems seen\n\n" + "\n".join(f"* {p}" for p in problems) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.keep or interrupted:
        print(f"(work directory kept: {workdir})", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
