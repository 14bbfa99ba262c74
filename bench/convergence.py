#!/usr/bin/env python3
"""Route convergence: from an etcd write to the first answer through the new route.

One invocation starts etcd, two Knot backends (zones a.example.com. and
b.example.com.), and dnsrouter (2 workers) on etcd, all on 127.0.0.1, then:

* known backends (the common case): each of --writes writes PUTs a NEW key
  ``/dnsrouter/wNNNN`` = ``<knot>:<port>,^hNNNN\\.<zone>\\.$`` whose regexp
  matches exactly one name that had no route (SERVFAIL, checked before the
  write), on a backend the router already health-checks. The time is taken
  from the start of the HTTP PUT to the first probe answer that is NOERROR
  with the record;
* new backend (a smaller sample, --new-backends): the same, but the key
  names a backend address the router has never seen (a third knotd that
  listens on many ports, one per write), so the route also waits for that
  backend's first health check.

Probing: right after etcd acknowledges the PUT, this process sends UDP
queries for the name, one at a time (send, wait for the reply, send the
next: a ping-pong, no pause between, 200 ms timeout per query), round robin
over --probe-sockets fresh sockets (fresh source ports, so SO_REUSEPORT
spreads them over both workers), until every socket has had the new answer.
"first" is the first answer through the new route (whichever worker), "all"
the moment the last probe socket got one. Queries are prebuilt wire bytes
with a new ID each; only the first good reply of a write is parsed in full
to check its address. The probe keeps one router worker and this process
busy while it runs, on a 2-core machine shared with etcd, the supervisor
and Knot: the figures include that contention.

At the end, ``dnsrouter_snapshot_version`` from /metrics checks that every
write produced a route snapshot (one per known-backend write, two per
new-backend write: the route, then its backend coming up).

    .venv/bin/python bench/convergence.py [--writes 200] [--new-backends 20]
"""
from __future__ import annotations

import argparse
import http.client
import random
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.parse

import dns.message
import dns.rdatatype

from common import (bench_router, command_line, finish_router, handle_signals, ignore_signals, percentile,
                    start_router)
from support import metrics
from support.etcd import EtcdServer, put
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


class Etcd:
    """One keep-alive HTTP connection to etcd's v2 keys API (a client that writes often)."""

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

    def close(self) -> None:
        self.conn.close()


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


def report(title: str, ms: list[dict], probe_sockets: int, after_ack: bool) -> None:
    print(title)
    print(summary("first answer via new route", [m["first"] for m in ms]))
    print(summary(f"all {probe_sockets} probe sockets answered", [m["all"] for m in ms]))
    print(summary("etcd PUT acknowledged", [m["ack"] for m in ms]))
    if after_ack:
        print(summary("first answer after the PUT's ack", [m["after_ack"] for m in ms]))
    q = sum(m["queries"] for m in ms)
    print(f"  probe queries: {q} ({q / len(ms):.1f} per write), timeouts {sum(m['timeouts'] for m in ms)}")


def measure(etcd: Etcd, router_port: int, key: str, value: str, name: str, expect: str,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=200, help="known-backend writes (default 200)")
    ap.add_argument("--new-backends", type=int, default=20,
                    help="writes that each name a backend address never seen before (default 20; 0: skip)")
    ap.add_argument("--probe-sockets", type=int, default=4, help="probe sockets per write (default 4)")
    ap.add_argument("--deadline", type=float, default=10.0, help="seconds a write may take to converge")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between writes (default 0.02)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log-level", default="warning", help="the router's --log-level (default warning)")
    args = ap.parse_args()
    if args.writes < 1:
        ap.error("--writes must be at least 1")
    handle_signals()

    print("command: " + command_line())
    n_names = args.writes + args.new_backends + 10
    zone = make_split_zone(n=n_names)
    za, zb = "a.example.com.", "b.example.com."

    workdir = tempfile.mkdtemp(prefix="dnsrouter-convergence-")
    etcd_srv = knot_a = knot_b = knot_new = router = client = None
    try:
        etcd_srv = EtcdServer().start()
        knot_a = KnotServer({za: zone.zones[za]}).start()
        knot_b = KnotServer({zb: zone.zones[zb]}).start()
        extra_ports = [free_port("both") for _ in range(args.new_backends)]
        if extra_ports:
            # the same zone as knot_a, reachable at many addresses the router does not know yet
            knot_new = KnotServer({za: zone.zones[za]}, extra_ports=extra_ports).start()

        # both known backends registered (and checked) before the measured writes
        put(etcd_srv.url, PREFIX + "base-a", rf"{knot_a.addr},^ns\.a\.example\.com\.$")
        put(etcd_srv.url, PREFIX + "base-b", rf"{knot_b.addr},^ns\.b\.example\.com\.$")

        mport = free_port("tcp")
        router = bench_router(workdir, workers=args.workers, log_level=args.log_level,
                              args=["--etcd", etcd_srv.url, "--etcd-api", "v2", "--metrics", f"{HOST}:{mport}"])
        port = router.port
        print("router:  " + shlex.join(router.command()))
        start_router(router, lambda: all(answered(port, n, timeout=0.2)
                                         for n in ("ns.a.example.com.", "ns.b.example.com.")),
                     timeout=20, message="router never answered through both base routes")
        time.sleep(0.3)  # let the start-up snapshots settle before reading the version
        v0 = metrics.first(mport, "dnsrouter_snapshot_version")

        client = Etcd(etcd_srv.client_port)
        known = []
        for i in range(1, args.writes + 1):
            z, knot = (za, knot_a) if i % 2 else (zb, knot_b)
            name = f"h{i:04d}.{z}"
            regexp = "^" + name.replace(".", r"\.") + "$"
            known.append(measure(client, port, f"w{i:04d}", f"{knot.addr},{regexp}", name,
                                 zone.addresses[name], args.probe_sockets, args.deadline))
            time.sleep(args.gap)
        v1 = metrics.first(mport, "dnsrouter_snapshot_version")

        fresh = []
        for j, eport in enumerate(extra_ports, start=1):
            name = f"h{args.writes + j:04d}.{za}"
            regexp = "^" + name.replace(".", r"\.") + "$"
            fresh.append(measure(client, port, f"n{j:04d}", f"{HOST}:{eport},{regexp}", name,
                                 zone.addresses[name], args.probe_sockets, args.deadline))
            time.sleep(args.gap)
        time.sleep(0.3)
        v2 = metrics.first(mport, "dnsrouter_snapshot_version")
        routes = metrics.first(mport, "dnsrouter_routes")

        print()
        report(f"known backends: {len(known)} writes of a new key (route to an already healthy backend), "
               f"time from the start of the etcd PUT:", known, args.probe_sockets, after_ack=True)
        if fresh:
            print()
            report(f"new backend: {len(fresh)} writes of a new key naming a backend address never seen before "
                   f"(waits for its first health check):", fresh, args.probe_sockets, after_ack=False)
        print()
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
        print(f"dnsrouter_routes: {routes:.0f} (expected {2 + len(known) + len(fresh)})")
        return 0 if ok1 and ok2 else 1
    finally:
        ignore_signals()
        if client is not None:
            client.close()
        finish_router(router, args.log_level)
        for k in (knot_new, knot_b, knot_a):
            if k is not None:
                k.close()
        if etcd_srv is not None:
            etcd_srv.stop()
            etcd_srv.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
