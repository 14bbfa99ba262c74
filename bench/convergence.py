#!/usr/bin/env python3
"""Route convergence: from an etcd write to the first answer through the new route.

One invocation starts etcd, two Knot backends (zones a.example.com. and
b.example.com.), and one dnsrouter (2 workers) on that etcd per API of
--etcd-api (default ``v3,v2``: ``--etcd-api v3`` and ``--etcd-api v2``), all
on 127.0.0.1. The routers run side by side, each on its own keys (etcd 3.4
keeps the v2 keys and the v3 keys in separate stores, so a write through one
API is not seen by the other's router), and their writes are interleaved,
the order turned each round, so that a busy spell of the machine hits every
API alike. Then, per API:

* known backends (the common case): each of --writes writes puts a NEW key
  ``/dnsrouter/wNNNN`` = ``<knot>:<port>,^hNNNN\\.<zone>\\.$`` whose regexp
  matches exactly one name that had no route (SERVFAIL, checked before the
  write), on a backend the router already health-checks. The time is taken
  from the start of the write to the first probe answer that is NOERROR
  with the record;
* new backend (a smaller sample, --new-backends): the same, but the key
  names a backend address the router has never seen (a third knotd that
  listens on many ports, one per write and API), so the route also waits
  for that backend's first health check.

The writes: v2, an HTTP PUT to /v2/keys over one keep-alive connection (a
client that writes often); v3, a Put RPC over one gRPC channel of the v3
client of tests/support/etcd.py (etcd-sdk-python, the library the router
uses): what ``etcdctl put`` sends, without the process start that an
etcdctl per write would add to every figure (a whole ``etcdctl put`` takes
12-15 ms here, the RPC alone about 2 ms). One real ``etcdctl
put`` (a subprocess) is made and measured the same way before the timed
writes, to show that route reaches the v3 router too; it is not in the
statistics.

Probing: right after etcd acknowledges the write, this process sends UDP
queries for the name, one at a time (send, wait for the reply, send the
next: a ping-pong, no pause between, 200 ms timeout per query), round robin
over --probe-sockets fresh sockets (fresh source ports, so SO_REUSEPORT
spreads them over both workers), until every socket has had the new answer.
"first" is the first answer through the new route (whichever worker), "all"
the moment the last probe socket got one. Queries are prebuilt wire bytes
with a new ID each; only the first good reply of a write is parsed in full
to check its address. The probe keeps one router worker and this process
busy while it runs, on a 2-core machine shared with etcd, the supervisors
and Knot: the figures include that contention. The other API's router sits
idle meanwhile (its health checks only).

At the end, ``dnsrouter_snapshot_version`` from each router's /metrics
checks that every write produced a route snapshot (one per known-backend
write, two per new-backend write: the route, then its backend coming up),
and with both APIs a table gives median, p90, p99 and max of write -> first
answer for each and the ratio v3/v2.

    .venv/bin/python bench/convergence.py [--etcd-api v3,v2] [--writes 200] [--new-backends 20]
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.rdatatype

from common import (bench_router, command_line, finish_router, handle_signals, ignore_signals, percentile,
                    start_router)
from support import metrics
from support.etcd import ETCDCTL, EtcdServer, etcdctl, put, put3, v3_client
from support.knot import KnotServer
from support.net import HOST, answered, free_port
from support.zones import make_split_zone

PREFIX = "/dnsrouter/"


def summary(label: str, values_s: list[float]) -> str:
    v = sorted(x * 1000 for x in values_s)
    if not v:
        return f"  {label:<34} (no samples)"
    return (f"  {label:<34} n={len(v):<4} median {percentile(v, 50):7.2f}  p90 {percentile(v, 90):7.2f}  "
            f"p99 {percentile(v, 99):7.2f}  max {v[-1]:7.2f}  (min {v[0]:.2f}) ms")


APIS = ("v3", "v2")


class EtcdV2:
    """One keep-alive HTTP connection to etcd's v2 keys API (a client that writes often)."""

    api = "v2"
    write = "etcd v2 PUT"

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=5)

    def put(self, key: str, value: str) -> None:
        body = urllib.parse.urlencode({"value": value})
        path = "/v2/keys" + urllib.parse.quote(PREFIX + key, safe="/")
        self.conn.request("PUT", path, body=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status not in (200, 201):
            raise RuntimeError(f"etcd PUT {key}: {resp.status} {data[:200]!r}")

    def warm(self) -> None:
        """Open the connection (a GET of the prefix) before the first timed write."""
        self.conn.request("GET", "/v2/keys" + PREFIX)
        self.conn.getresponse().read()

    def close(self) -> None:
        self.conn.close()


class EtcdV3:
    """One v3 client (tests/support/etcd.py's, the router's library): one gRPC
    channel, a Put RPC per write, which is what ``etcdctl put`` sends."""

    api = "v3"
    write = "etcd v3 put"

    def __init__(self, url: str) -> None:
        self._stack = contextlib.ExitStack()
        self.client = self._stack.enter_context(v3_client(url))

    def put(self, key: str, value: str) -> None:
        self.client.put(PREFIX + key, value)

    def warm(self) -> None:
        """Connect the channel (a range read of the prefix) before the first timed write."""
        self.client.get_prefix_response(PREFIX)

    def close(self) -> None:
        self._stack.close()


class Etcdctl:
    """``etcdctl put`` as a subprocess per write (a process start each: for one check, not for statistics)."""

    api = "v3"
    write = "etcdctl put"

    def __init__(self, url: str) -> None:
        self.url = url

    def put(self, key: str, value: str) -> None:
        # "--" : a value may start with '-' (not ours, but etcdctl would take it for a flag)
        out = etcdctl(self.url, "put", "--", PREFIX + key, value)
        if out.strip() != "OK":
            raise RuntimeError(f"etcdctl put {key}: {out!r}")


def ask(port: int, name: str, timeout: float = 0.5) -> tuple[int, list[str]] | None:
    """(rcode, A addresses) of one query through the router, None on timeout."""
    q = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((HOST, port))
        try:
            s.send(q.to_wire())
            r = dns.message.from_wire(s.recv(65535))
        except OSError:  # timeout, or refused while the router is still starting
            return None
    addrs = [rd.address for rr in r.answer if rr.rdtype == dns.rdatatype.A for rd in rr]
    return r.rcode(), addrs


class Probe:
    """Ping-pong UDP queries for one name over a few fresh sockets."""

    TIMEOUT = 0.2

    def __init__(self, port: int, name: str, nsockets: int) -> None:
        self.wire = bytearray(dns.message.make_query(name, "A").to_wire())
        self.socks = []
        for _ in range(nsockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(self.TIMEOUT)
            s.connect((HOST, port))
            self.socks.append(s)
        self.queries = 0
        self.timeouts = 0

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def once(self, s: socket.socket) -> bytes | None:
        """One query; the reply's bytes, or None on timeout."""
        qid = random.getrandbits(16)
        struct.pack_into("!H", self.wire, 0, qid)
        s.send(self.wire)
        self.queries += 1
        while True:
            try:
                data = s.recv(4096)
            except socket.timeout:
                self.timeouts += 1
                return None
            if len(data) >= 12 and struct.unpack_from("!H", data, 0)[0] == qid:
                return data
            # a late reply to an earlier query of this socket: keep reading

    @staticmethod
    def answered(data: bytes) -> bool:
        rcode = data[3] & 0x0F
        ancount = struct.unpack_from("!H", data, 6)[0]
        return rcode == 0 and ancount > 0

    def run(self, deadline: float) -> tuple[float, float, bytes]:
        """Probe until every socket got an answer: (time of first, time of all, first reply)."""
        pending = list(self.socks)
        first = None
        first_reply = b""
        while pending:
            for s in list(pending):
                data = self.once(s)
                if data is not None and self.answered(data):
                    now = time.perf_counter()
                    pending.remove(s)
                    if first is None:
                        first, first_reply = now, data
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no answer through the new route before the deadline "
                                   f"({len(pending)}/{len(self.socks)} probe sockets still waiting)")
        return first, time.perf_counter(), first_reply


def report(title: str, ms: list[dict], probe_sockets: int, after_ack: bool, write: str) -> None:
    print(title)
    print(summary("first answer via new route", [m["first"] for m in ms]))
    print(summary(f"all {probe_sockets} probe sockets answered", [m["all"] for m in ms]))
    print(summary(f"{write} acknowledged", [m["ack"] for m in ms]))
    if after_ack:
        print(summary("first answer after the write's ack", [m["after_ack"] for m in ms]))
    q = sum(m["queries"] for m in ms)
    print(f"  probe queries: {q} ({q / len(ms):.1f} per write), timeouts {sum(m['timeouts'] for m in ms)}")


STATS = (("median", 50), ("p90", 90), ("p99", 99), ("max", 100))


def compare(title: str, per_api: dict[str, list[float]]) -> None:
    """One row per API of median/p90/p99/max (ms), then the ratio v3/v2."""
    print(title)
    print(f"  | API   | n    | {' | '.join(f'{k:>7}' for k, _ in STATS)} |")
    print(f"  | ----- | ---- | {' | '.join('-' * 7 for _ in STATS)} |")
    rows = {}
    for api, values in per_api.items():
        v = sorted(x * 1000 for x in values)
        rows[api] = [percentile(v, p) for _, p in STATS]
        print(f"  | {api:<5} | {len(v):<4} | {' | '.join(f'{x:7.2f}' for x in rows[api])} |")
    if "v3" in rows and "v2" in rows:
        ratios = [a / b if b else float("nan") for a, b in zip(rows["v3"], rows["v2"])]
        print(f"  | v3/v2 |      | {' | '.join(f'{r:7.2f}' for r in ratios)} |")


def measure(etcd: Any, router_port: int, key: str, value: str, name: str, expect: str,
            nsockets: int, deadline_s: float) -> dict:
    before = ask(router_port, name)
    if before is None or before[0] != 2:  # SERVFAIL
        raise RuntimeError(f"{name} should get SERVFAIL before its route exists, got {before}")
    probe = Probe(router_port, name, nsockets)
    try:
        t0 = time.perf_counter()
        etcd.put(key, value)
        t_ack = time.perf_counter()
        first, last, reply = probe.run(t0 + deadline_s)
    finally:
        probe.close()
    msg = dns.message.from_wire(reply)
    got = [rd.address for rr in msg.answer if rr.rdtype == dns.rdatatype.A for rd in rr]
    if got != [expect]:
        raise RuntimeError(f"{name}: expected A {expect}, got {got}")
    return {"ack": t_ack - t0, "first": first - t0, "all": last - t0,
            "after_ack": first - t_ack, "queries": probe.queries, "timeouts": probe.timeouts}


def route(name: str) -> str:
    """The regexp that matches exactly ``name``."""
    return "^" + name.replace(".", r"\.") + "$"


@dataclass
class Side:
    """One API under test: its router, its writer and what it measured."""
    api: str
    router: Any = None
    mport: int = 0
    writer: Any = None
    extra_ports: list[int] = field(default_factory=list)
    known: list[dict] = field(default_factory=list)
    fresh: list[dict] = field(default_factory=list)
    versions: list[float] = field(default_factory=list)  # before, after known, after fresh
    routes: float = 0.0


def parse_apis(text: str) -> list[str]:
    apis = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in apis if a not in APIS]
    if not apis or bad or len(set(apis)) != len(apis):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct APIs among {','.join(APIS)}")
    return apis


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--etcd-api", type=parse_apis, default=list(APIS), metavar="v3,v2",
                    help="the etcd APIs to measure, one router each, side by side (default v3,v2)")
    ap.add_argument("--writes", type=int, default=200, help="known-backend writes per API (default 200)")
    ap.add_argument("--new-backends", type=int, default=20,
                    help="writes per API that each name a backend address never seen before "
                         "(default 20; 0: skip)")
    ap.add_argument("--probe-sockets", type=int, default=4, help="probe sockets per write (default 4)")
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds a write may take to converge")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between writes (default 0.02)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log-level", default="warning", help="the router's --log-level (default warning)")
    args = ap.parse_args()
    if args.writes < 1:
        ap.error("--writes must be at least 1")
    if "v3" in args.etcd_api and shutil.which(ETCDCTL) is None:
        ap.error(f"--etcd-api v3 needs {ETCDCTL!r} (Debian package etcd-client)")
    handle_signals()

    print("command: " + command_line())
    sides = [Side(api) for api in args.etcd_api]
    # names h0001..: the known-backend writes, then the new-backend ones, then the etcdctl check
    n_names = args.writes + args.new_backends + 10
    check_name = f"h{args.writes + args.new_backends + 1:04d}.a.example.com."
    zone = make_split_zone(n=n_names)
    za, zb = "a.example.com.", "b.example.com."

    workdir = tempfile.mkdtemp(prefix="dnsrouter-convergence-")
    etcd_srv = knot_a = knot_b = knot_new = None
    try:
        etcd_srv = EtcdServer().start()
        knot_a = KnotServer({za: zone.zones[za]}).start()
        knot_b = KnotServer({zb: zone.zones[zb]}).start()
        for side in sides:
            side.extra_ports = [free_port("both") for _ in range(args.new_backends)]
        extra_ports = [p for side in sides for p in side.extra_ports]
        if extra_ports:
            # the same zone as knot_a, reachable at many addresses no router knows yet
            knot_new = KnotServer({za: zone.zones[za]}, extra_ports=extra_ports).start()

        for side in sides:
            # both known backends registered (and checked) before the measured writes
            base = {"base-a": rf"{knot_a.addr},^ns\.a\.example\.com\.$",
                    "base-b": rf"{knot_b.addr},^ns\.b\.example\.com\.$"}
            for key, value in base.items():
                if side.api == "v2":
                    put(etcd_srv.url, PREFIX + key, value)
                else:
                    put3(etcd_srv.url, PREFIX + key, value)
            side.mport = free_port("tcp")
            side.router = bench_router(os.path.join(workdir, side.api), workers=args.workers,
                                       log_level=args.log_level,
                                       args=["--etcd", etcd_srv.url, "--etcd-api", side.api,
                                             "--metrics", f"{HOST}:{side.mport}"])
            port = side.router.port
            print(f"router {side.api}: " + shlex.join(side.router.command()))
            start_router(side.router, lambda: all(answered(port, n, timeout=0.2)
                                                  for n in ("ns.a.example.com.", "ns.b.example.com.")),
                         timeout=20, message=f"{side.api} router never answered through both base routes")
        # The writers only once every router runs: spawn() forks with a preexec_fn, which runs
        # gRPC's fork handlers, and those hang while this process holds a live gRPC channel.
        for side in sides:
            side.writer = EtcdV2(etcd_srv.client_port) if side.api == "v2" else EtcdV3(etcd_srv.url)
            side.writer.warm()

        for side in sides:
            if side.api == "v3":
                # one real etcdctl put, measured like the others but not in the statistics
                m = measure(Etcdctl(etcd_srv.url), side.router.port, "etcdctl-check",
                            f"{knot_a.addr},{route(check_name)}", check_name, zone.addresses[check_name],
                            args.probe_sockets, args.deadline)
                print(f"etcdctl put (one subprocess, {check_name} -> {zone.addresses[check_name]}): OK, "
                      f"exited after {m['ack'] * 1000:.2f} ms, first answer via the route at "
                      f"{m['first'] * 1000:.2f} ms (not in the statistics)")
        time.sleep(0.3)  # let the start-up snapshots settle before reading the version
        for side in sides:
            side.versions.append(metrics.first(side.mport, "dnsrouter_snapshot_version"))

        def interleaved(n: int) -> Any:
            """(round, side) for n rounds, every API once a round, the order turned each round."""
            for i in range(n):
                k = i % len(sides)
                for side in sides[k:] + sides[:k]:
                    yield i + 1, side

        for i, side in interleaved(args.writes):
            z, knot = (za, knot_a) if i % 2 else (zb, knot_b)
            name = f"h{i:04d}.{z}"
            side.known.append(measure(side.writer, side.router.port, f"w{i:04d}", f"{knot.addr},{route(name)}",
                                      name, zone.addresses[name], args.probe_sockets, args.deadline))
            time.sleep(args.gap)
        for side in sides:
            side.versions.append(metrics.first(side.mport, "dnsrouter_snapshot_version"))

        for j, side in interleaved(args.new_backends):
            name = f"h{args.writes + j:04d}.{za}"
            eport = side.extra_ports[j - 1]
            side.fresh.append(measure(side.writer, side.router.port, f"n{j:04d}", f"{HOST}:{eport},{route(name)}",
                                      name, zone.addresses[name], args.probe_sockets, args.deadline))
            time.sleep(args.gap)
        time.sleep(0.3)
        for side in sides:
            side.versions.append(metrics.first(side.mport, "dnsrouter_snapshot_version"))
            side.routes = metrics.first(side.mport, "dnsrouter_routes")

        ok = True
        for side in sides:
            known, fresh = side.known, side.fresh
            print()
            print(f"=== etcd API {side.api} ({side.writer.write}) ===")
            report(f"known backends: {len(known)} writes of a new key (route to an already healthy backend), "
                   f"time from the start of the {side.writer.write}:", known, args.probe_sockets,
                   after_ack=True, write=side.writer.write)
            if fresh:
                print()
                report(f"new backend: {len(fresh)} writes of a new key naming a backend address never seen "
                       f"before (waits for its first health check):", fresh, args.probe_sockets,
                       after_ack=False, write=side.writer.write)
            print()
            v0, v1, v2 = side.versions
            d1, d2 = v1 - v0, v2 - v1
            ok1 = d1 == len(known)
            # A new backend's route and its first passing check usually make two
            # snapshots; when the check ends before the supervisor drains its
            # event queue, both land in one. Fewer than one per write is a loss.
            ok2 = len(fresh) <= d2 <= 2 * len(fresh)
            print(f"dnsrouter_snapshot_version: {v0:.0f} before the writes, {v1:.0f} after the known-backend "
                  f"writes (+{d1:.0f}, expected +{len(known)}: {'OK' if ok1 else 'MISMATCH'})")
            if fresh:
                print(f"  {v2:.0f} after the new-backend writes (+{d2:.0f} for {len(fresh)} writes; expected "
                      f"+{len(fresh)}..+{2 * len(fresh)}: the route, then the backend up, sometimes in one "
                      f"snapshot: {'OK' if ok2 else 'MISMATCH'})")
            # the two base routes, the etcdctl check (v3), the measured writes
            expected_routes = 2 + (side.api == "v3") + len(known) + len(fresh)
            print(f"dnsrouter_routes: {side.routes:.0f} (expected {expected_routes})")
            ok = ok and ok1 and ok2

        print()
        compare(f"write -> first answer via the new route, known backends, ms ({args.writes} writes per API, "
                f"interleaved):", {s.api: [m["first"] for m in s.known] for s in sides})
        if args.new_backends:
            compare(f"write -> first answer via the new route, new backend, ms ({args.new_backends} writes "
                    f"per API):", {s.api: [m["first"] for m in s.fresh] for s in sides})
        compare("write acknowledged, known backends, ms:", {s.api: [m["ack"] for m in s.known] for s in sides})
        print()
        return 0 if ok else 1
    finally:
        ignore_signals()
        for side in sides:
            if side.writer is not None:
                side.writer.close()
        for side in sides:
            print(f"[{side.api}] ", end="")
            finish_router(side.router, args.log_level)
        for k in (knot_new, knot_b, knot_a):
            if k is not None:
                k.close()
        if etcd_srv is not None:
            etcd_srv.stop()
            etcd_srv.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
