#!/usr/bin/env python3
"""dnsrouter-feed at scale: its peak memory, its first load, and NOTIFY latency.

Every zone here is signed by Knot itself (support.knot_xfr.KnotPrimary,
NSEC) from generated text: N names directly below the apex ``feed.test.``
with random labels (so every shard gets its share), about 45 % A, 20 % A
and AAAA, 5 % AAAA, 15 % A and TXT, 12 % A and MX, and 3 % delegations
(two NS, one in the zone with its glue A and AAAA below the cut, a DS). A
delegation is two names (the cut and its glue), so the zone holds exactly N
names besides the apex. The feeder has 3 shards, each with one Knot
secondary (support.knot_xfr.KnotSecondary with the shard's TSIG key), a
file registry and metrics; all on 127.0.0.1.

For each zone, the primary is started (and has signed the zone), then the
3 secondaries, then the feeder, whose clock starts at its spawn:

* ``to zone serial``: until ``dnsrouter_feed_zone_serial`` on /metrics is
  the primary's serial (the first AXFR is in the state);
* ``to secondaries``: until each shard's secondary answers a UDP SOA query
  with that serial (the feeder NOTIFYed them, they transferred their shard);
* ``peak RSS``: VmHWM of /proc/PID/status of the feeder, read right before
  it is stopped (for the big zone also right after the load);
* the state: ``dnsrouter_feed_state_bytes`` (the database and its
  write-ahead log) and ``du`` of the state directory.

``--sizes`` (default 20,000 and 200,000 names): one zone each, fully loaded,
then stopped; the ratio of the peak RSS of the largest to the smallest
(the issue's target: 200k / 20k <= 1.5x).

``--big N`` (default 1,000,000): one more zone, loaded as above, then,
for each pause of ``--gaps`` (default 1 s, then none), ``--updates``
dynamic updates (knsupdate over TCP) of 10 names each, the pause before
each: 5 new names and 5 deleted, one in each tenth of the names in
canonical order, so every shard gets some. The primary sends no NOTIFY of
its own (knotd sends it about a second after the change: its delay, not
the feeder's, and it would race with the measured one): after each update
returns, this script sends the NOTIFY from 127.0.0.1 (the feeder takes it
as the primary's) to the feeder's listen address and, from the moment it
is sent, polls every ``--poll-ms``:

* (a) /metrics until ``dnsrouter_feed_notified_serial`` is the new serial
  for every backend: the feeder has the IXFR in and every secondary
  answered its NOTIFY;
* (b) each secondary (a UDP SOA query) until it serves the new serial.

p50 and p99 of both against the target p99 <= 1 s. The next update starts
once every secondary has it (and the pause is over). The pause is for Knot:
a Knot secondary NOTIFYed within about a second of its last refresh now
and then starts the next one 0.9 s late.

The Knot servers get room for a big zone in their journal; the primary
keeps Knot's ``tcp-io-timeout`` unless ``--primary-io-timeout`` says
otherwise (see Primary, and bench/README.md).

    .venv/bin/python bench/feed.py --quick            # 2,000 and 20,000 names, --big 50000, 10 updates a pause
    .venv/bin/python bench/feed.py                    # 20,000 and 200,000 names, --big 1000000, 50 updates a pause
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import psutil

from common import command_line, handle_signals, ignore_signals, percentile
from support import metrics
from support.knot_xfr import KnotPrimary, KnotSecondary, tool, tsig_key
from support.net import HOST, free_port, wait_until
from support.processes import program, spawn, stop, stop_all
from support.zones import zone_text

ORIGIN = "feed.test."
SHARDS = 3
NAMES_PER_UPDATE = 10
TARGET_RSS_RATIO = 1.5
TARGET_P99_S = 1.0


def feeder_executable() -> list[str]:
    """The dnsrouter-feed beside this interpreter, else ``python -m`` its module."""
    exe = program("dnsrouter-feed")
    return [str(exe)] if os.access(exe, os.X_OK) else [sys.executable, "-m", "dnsrouter.supervisor.tools.feed.main"]


# -- the zone --------------------------------------------------------------------

@dataclass
class Zone:
    names: int
    text: str
    plain: list[str]  # labels of names that are not delegations or glue, sorted
    rrsets: dict[str, int]  # rdtype -> RRsets, unsigned


def _label(rng: random.Random, taken: set[str]) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    while True:
        label = rng.choice(letters) + "".join(rng.choices(letters + "0123456789-", k=rng.randint(4, 11)))
        if not label.endswith("-") and label not in taken:
            taken.add(label)
            return label


def make_zone(n: int, seed: int = 1) -> Zone:
    """Exactly n names below the apex (see the module docstring)."""
    rng = random.Random(seed)
    taken: set[str] = {"ns"}
    lines: list[str] = []
    plain: list[str] = []
    rrsets: dict[str, int] = {}

    def count(*types: str) -> None:
        for t in types:
            rrsets[t] = rrsets.get(t, 0) + 1

    names = 0
    while names < n:
        label = _label(rng, taken)
        i = names
        v4 = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        v6 = f"2001:db8::{i >> 16:x}:{i & 0xffff:x}"
        r = rng.random()
        if r < 0.03 and names + 2 <= n:  # a delegation: the cut, its glue below it
            digest = "".join(rng.choices("0123456789abcdef", k=64))
            lines += [f"{label} NS ns1.{label}", f"{label} NS ns.dns-host.example.",
                      f"{label} DS {rng.randrange(65536)} 13 2 {digest}",
                      f"ns1.{label} A {v4}", f"ns1.{label} AAAA {v6}"]
            count("NS", "DS", "A", "AAAA")
            names += 2
            continue
        plain.append(label)
        names += 1
        if r < 0.48:
            lines.append(f"{label} A {v4}")
            count("A")
        elif r < 0.68:
            lines += [f"{label} A {v4}", f"{label} AAAA {v6}"]
            count("A", "AAAA")
        elif r < 0.73:
            lines.append(f"{label} AAAA {v6}")
            count("AAAA")
        elif r < 0.88:
            lines += [f"{label} A {v4}", f'{label} TXT "v=spf1 ip4:{v4} -all" "site={label}"']
            count("A", "TXT")
        else:
            lines += [f"{label} A {v4}", f"{label} MX 10 {label}", f"{label} MX 20 mx.mail-host.example."]
            count("A", "MX")
    plain.sort()
    return Zone(n, zone_text(ORIGIN, lines), plain, rrsets)


def update_lines(zone: Zone, number: int, rng: random.Random) -> list[str]:
    """knsupdate lines for update ``number``: NAMES_PER_UPDATE names, one in each
    tenth of the zone's plain names in order, added and deleted in turn."""
    lines = []
    step = len(zone.plain) // NAMES_PER_UPDATE
    for j in range(NAMES_PER_UPDATE):
        at = j * step + rng.randrange(step)
        if (j + number) % 2:
            label = zone.plain.pop(at)  # deleted: not picked again
            lines.append(f"del {label}.{ORIGIN}")
        else:
            label = f"{zone.plain[at]}-u{number}"  # sorts right after an existing name: the same tenth
            lines.append(f"add {label}.{ORIGIN} 300 A 198.51.100.{j + 1}")
    return lines


JOURNAL = "4G"  # journal-max-usage: Knot's 100 MiB default holds no signed zone beyond about 300,000 names


def big_journal(config: str, origin: str) -> str:
    """A knotd config whose zone may keep up to JOURNAL in its journal. The
    support servers keep the whole zone there (``journal-content: all``);
    with Knot's default limit the primary fails to load a bigger zone ("zone
    event 'load' failed (not enough space provided)") and a secondary could
    not store its shard."""
    line = f'  - domain: "{origin}"\n'
    assert config.count(line) == 1
    return config.replace(line, f"{line}    journal-max-usage: {JOURNAL}\n")


class Primary(KnotPrimary):
    """KnotPrimary with room for a big zone (big_journal) and Knot's
    ``tcp-io-timeout`` (ms) set: how long knotd waits to send one message of an
    outgoing transfer before it drops the connection (its default, 500 ms,
    cuts off a reader as slow as the feeder: see the README)."""

    def __init__(self, *args: object, io_timeout: int, **kw: object) -> None:
        self.io_timeout = io_timeout
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def config(self) -> str:
        text = big_journal(super().config(), self.origin)
        if not self.io_timeout:
            return text
        assert text.count("server:\n") == 1
        return text.replace("server:\n", f"server:\n    tcp-io-timeout: {self.io_timeout}\n")

    def update(self, lines: Sequence[str], timeout: float = 60.0) -> int:
        """KnotPrimary.update() over TCP (knsupdate -v: one try) with a long timeout.

        knotd takes about 3 s to apply and sign an update of a 1,000,000-name
        zone (it re-creates the whole NSEC chain): KnotPrimary.update()'s
        knsupdate, 5 s of UDP tries, sends the update again meanwhile (knotd
        then processes each copy, "no changes to the zone were made") and
        gives up once the copies queue up beyond that."""
        before = self.serial()
        script = "".join(f"{line}\n" for line in [f"server {HOST} {self.port}", f"zone {self.origin}",
                                                   f"origin {self.origin}", *lines, "send", "answer"])
        out = subprocess.run([tool("knsupdate", "knot-dnsutils"), "-v", "-t", f"{timeout:.0f}"], input=script,
                             capture_output=True, text=True, timeout=timeout + 10)
        if out.returncode != 0 or "NOERROR" not in out.stdout:
            raise RuntimeError(f"knsupdate to {self.addr} failed ({out.returncode}):\n{script}{out.stdout}"
                               f"{out.stderr}\n{self.log_tail()}")
        wait_until(lambda: self.serial() > before, timeout, interval=0.01,
                   message=f"{self.origin} on {self.addr}: no serial above {before} after an update")
        return self.serial()


class Secondary(KnotSecondary):
    """KnotSecondary with room for a big shard (big_journal)."""

    def config(self) -> str:
        return big_journal(super().config(), self.origin)


# -- probes ------------------------------------------------------------------------

class SoaProbe:
    """UDP SOA queries to one server, from one socket."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((HOST, port))
        self.query = dns.message.make_query(ORIGIN, "SOA")

    def serial(self, timeout: float = 0.2) -> int | None:
        self.query.id = random.randrange(65536)
        self.sock.settimeout(timeout)
        try:
            self.sock.send(self.query.to_wire())
            while True:
                reply = dns.message.from_wire(self.sock.recv(65535))
                if reply.id == self.query.id:
                    break
        except (OSError, dns.exception.DNSException):
            return None
        if reply.rcode() != dns.rcode.NOERROR:
            return None
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return int(rrset[0].serial)
        return None

    def close(self) -> None:
        self.sock.close()


def notify(port: int) -> bool:
    """A NOTIFY for the zone, as the primary sends it; whether NOERROR came back."""
    q = dns.message.make_query(ORIGIN, "SOA")
    q.flags = dns.flags.AA
    q.set_opcode(dns.opcode.NOTIFY)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q.to_wire(), (HOST, port))
        try:
            reply = dns.message.from_wire(s.recv(65535))
        except (OSError, dns.exception.DNSException):
            return False
    return reply.id == q.id and reply.rcode() == dns.rcode.NOERROR


def scrape(port: int) -> metrics.Samples | None:
    """The feeder's /metrics, None while it does not answer."""
    try:
        status, body = metrics.http_get(f"http://{HOST}:{port}/metrics", timeout=2)
    except OSError:
        return None
    return metrics.parse(body.decode()) if status == 200 else None


def sum_of(samples: metrics.Samples, name: str) -> float:
    """The sum of a metric over all its labels."""
    return sum(v for (n, _), v in samples.items() if n == name)


def notified(samples: metrics.Samples) -> dict[str, float]:
    """backend -> dnsrouter_feed_notified_serial."""
    return {dict(labels)["backend"]: v for (name, labels), v in samples.items()
            if name == "dnsrouter_feed_notified_serial"}


def status_kb(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def du_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


# -- one zone ------------------------------------------------------------------------

@dataclass
class Latency:
    """Seconds from the NOTIFY sent, one entry per update."""

    ixfr_in: list[float] = field(default_factory=list)  # until dnsrouter_feed_zone_serial has it
    a: list[float] = field(default_factory=list)  # until every backend's dnsrouter_feed_notified_serial has it
    b: list[float] = field(default_factory=list)  # until every secondary serves it
    b_each: list[float] = field(default_factory=list)  # until each secondary serves it
    resent: int = 0  # NOTIFYs the feeder sent beyond one per secondary and serial


@dataclass
class Result:
    names: int
    rrs_unsigned: int = 0
    sign_s: float = float("nan")  # KnotPrimary start (load + sign)
    serial: int = 0
    to_zone_s: float = float("nan")
    to_secondaries_s: float = float("nan")
    axfr_in_s: float = float("nan")  # from the feeder's log
    axfr_tries: int = 0  # AXFRs the feeder started before it had the zone (dnsrouter_feed_transfers_in_total)
    cpu_load_s: float = float("nan")  # the feeder's CPU (user + system) until the secondaries had it
    hwm_load_kb: int = 0  # VmHWM right after the load
    hwm_kb: int = 0  # VmHWM right before the stop
    rss_kb: int = 0  # VmRSS right before the stop
    state_bytes: float = float("nan")  # dnsrouter_feed_state_bytes after the load
    state_files: dict[str, int] = field(default_factory=dict)  # file -> bytes after the load
    state_du: int = 0
    latency: dict[float, Latency] = field(default_factory=dict)  # by the pause between updates
    problems: list[str] = field(default_factory=list)
    transfers: list[list[str]] = field(default_factory=list)  # per secondary, as its log says


def write_config(path: str, work: str, primary: KnotPrimary, listen: int, mport: int, keys: list[str],
                 secondaries: list[KnotSecondary]) -> None:
    os.makedirs(os.path.join(work, "routes"), exist_ok=True)
    text = f"""[feed]
zone = {ORIGIN}
primary = {primary.addr}
listen = {HOST}:{listen}
state = {work}/state

[registry]
routes_dir = {work}/routes

[metrics]
listen = {HOST}:{mport}

[log]
level = info
""" + "".join(f"\n[shard {k}]\ntsig = {keys[k]}\nbackends = {secondaries[k].addr}\n" for k in range(SHARDS))
    with open(path, "w") as f:
        f.write(text)


def run_zone(result: Result, updates: int, args: argparse.Namespace, work: str) -> None:
    """Measure one zone of result.names names into result (as far as it gets on an error)."""
    n = result.names
    t = time.monotonic()
    zone = make_zone(n)
    result.rrs_unsigned = sum(zone.rrsets.values())
    print(f"\n== {n:,} names: {sum(zone.rrsets.values()):,} RRsets unsigned "
          f"({', '.join(f'{k} {v:,}' for k, v in sorted(zone.rrsets.items()))}), "
          f"{len(zone.text) / 1e6:.1f} MB of text, made in {time.monotonic() - t:.1f} s", flush=True)
    feed_port, mport = free_port("both"), free_port("tcp")
    keys = [tsig_key(f"shard{k}") for k in range(SHARDS)]
    os.makedirs(work)
    feeder = None
    probes: list[SoaProbe] = []
    with contextlib.ExitStack() as stack:
        t = time.monotonic()
        # Knot reads and signs about 10,000 names a second here; the rest is margin.
        primary = stack.enter_context(Primary(ORIGIN, zone.text, io_timeout=args.primary_io_timeout,
                                              startup_timeout=120 + n / 1000))
        result.sign_s = time.monotonic() - t
        result.serial = primary.serial()
        print(f"primary {primary.addr}: loaded and signed in {result.sign_s:.1f} s, serial {result.serial}",
              flush=True)
        secondaries = [stack.enter_context(Secondary(ORIGIN, HOST, feed_port, tsig=keys[k],
                                                         startup_timeout=30))
                       for k in range(SHARDS)]
        probes = [SoaProbe(s.port) for s in secondaries]
        stack.callback(lambda: [p.close() for p in probes])
        conf = os.path.join(work, "feed.ini")
        write_config(conf, work, primary, feed_port, mport, keys, secondaries)
        log_path = os.path.join(work, "feed.log")
        try:
            with open(log_path, "wb") as log:
                t0 = time.monotonic()
                feeder = spawn([*args.feeder, "--config", conf], stdout=log, stderr=subprocess.STDOUT)
            proc = psutil.Process(feeder.pid)

            def alive() -> None:
                if feeder.poll() is not None:
                    raise RuntimeError(f"dnsrouter-feed exited with {feeder.returncode}:\n{tail(log_path)}")

            deadline = t0 + args.load_timeout
            # -- the first load
            while True:
                alive()
                samples = scrape(mport)
                if samples and metrics.value(samples, "dnsrouter_feed_zone_serial") == result.serial:
                    result.to_zone_s = time.monotonic() - t0
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the feeder did not reach serial {result.serial} in {args.load_timeout:g} s"
                                       f"\n{tail(log_path)}")
                time.sleep(0.05)
            print(f"feeder at serial {result.serial} after {result.to_zone_s:.2f} s", flush=True)
            waiting = set(range(SHARDS))
            while waiting:
                alive()
                for k in list(waiting):
                    if probes[k].serial() == result.serial:
                        waiting.discard(k)
                if not waiting:
                    result.to_secondaries_s = time.monotonic() - t0
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"secondaries {sorted(waiting)} not at serial {result.serial} in "
                                       f"{args.load_timeout:g} s\n{tail(log_path)}\n"
                                       + "\n".join(secondaries[k].log_tail(10) for k in waiting))
                time.sleep(0.05)
            cpu = proc.cpu_times()
            result.cpu_load_s = cpu.user + cpu.system
            result.hwm_load_kb = status_kb(feeder.pid, "VmHWM")
            m = re.search(r"by AXFR from \S+ in ([0-9.]+) s", open(log_path, errors="replace").read())
            if m:
                result.axfr_in_s = float(m.group(1))
            print(f"all {SHARDS} secondaries at serial {result.serial} after {result.to_secondaries_s:.2f} s; "
                  f"feeder VmHWM {result.hwm_load_kb / 1024:.1f} MB, CPU {result.cpu_load_s:.1f} s", flush=True)
            samples = scrape(mport) or {}
            result.axfr_tries = int(sum(metrics.value(samples, "dnsrouter_feed_transfers_in_total", type="axfr",
                                                      result=res) for res in ("ok", "failed")))
            result.state_bytes = metrics.value(samples, "dnsrouter_feed_state_bytes")
            state = os.path.join(work, "state")
            result.state_files = {name: os.path.getsize(os.path.join(state, name)) for name in sorted(os.listdir(state))}
            result.state_du = du_bytes(state)

            # -- updates and NOTIFY latency
            rng = random.Random(2)
            backends = {s.addr for s in secondaries}
            number = 0
            for gap in args.gaps if updates else []:
                latency = result.latency.setdefault(gap, Latency())
                sent = sum_of(scrape(mport) or {}, "dnsrouter_feed_notifies_sent_total")
                for u in range(1, updates + 1):
                    alive()
                    time.sleep(gap)  # a pause before each update, not a wait for an event
                    number += 1
                    serial = primary.update(update_lines(zone, number, rng))
                    t0 = time.monotonic()
                    if not notify(feed_port):
                        result.problems.append(f"update {number}: the feeder did not answer the NOTIFY with NOERROR")
                    a: float | None = None
                    ixfr_in: float | None = None
                    b: list[float | None] = [None] * SHARDS
                    deadline = t0 + args.update_timeout
                    while (a is None or None in b) and time.monotonic() < deadline:
                        for k in range(SHARDS):
                            if b[k] is None and (s := probes[k].serial()) is not None and s >= serial:
                                b[k] = time.monotonic() - t0
                        if a is None:
                            samples = scrape(mport) or {}
                            if ixfr_in is None and metrics.value(samples, "dnsrouter_feed_zone_serial") >= serial:
                                ixfr_in = time.monotonic() - t0
                            acked = notified(samples)
                            if all(acked.get(addr, 0) >= serial for addr in backends):
                                a = time.monotonic() - t0
                        time.sleep(args.poll_ms / 1000)  # the poll interval
                    if a is None or None in b:
                        result.problems.append(f"update {number} (serial {serial}): not done in "
                                               f"{args.update_timeout:g} s (a {a}, b {b})")
                        a = args.update_timeout if a is None else a
                        b = [args.update_timeout if x is None else x for x in b]
                    done = [x for x in b if x is not None]
                    latency.ixfr_in.append(a if ixfr_in is None else ixfr_in)
                    latency.a.append(a)
                    latency.b.append(max(done))
                    latency.b_each += done
                    if u % 10 == 0 or u == updates:
                        print(f"  pause {gap:g} s, update {u}/{updates}: serial {serial}, (a) {a * 1000:.0f} ms, "
                              f"(b) {latency.b[-1] * 1000:.0f} ms", flush=True)
                latency.resent = int(sum_of(scrape(mport) or {}, "dnsrouter_feed_notifies_sent_total") - sent
                                     - updates * SHARDS)
            alive()
            result.transfers = [s.transfers() for s in secondaries]
        finally:
            if feeder is not None and feeder.poll() is None:
                result.hwm_kb = status_kb(feeder.pid, "VmHWM")  # right before the stop
                result.rss_kb = status_kb(feeder.pid, "VmRSS")
            if args.keep:  # the Knot directories go with their servers
                for name, server in [("primary", primary), *((f"secondary{k}", s) for k, s in enumerate(secondaries))]:
                    with open(os.path.join(work, f"{name}.log"), "w") as f:
                        f.write(server.log())
            if feeder is not None:
                code = stop(feeder, timeout=30)
                if code not in (0, None):
                    result.problems.append(f"dnsrouter-feed exited with {code}")
                for line in open(log_path, errors="replace").read().splitlines():
                    if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                        result.problems.append("feeder log: " + line[:300])


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# -- report ------------------------------------------------------------------------------

def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def ms(values: list[float], p: float) -> str:
    return f"{percentile(sorted(values), p) * 1000:.0f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(sized: list[Result], big: Result | None, args: argparse.Namespace) -> None:
    print(f"\ncommand: {command_line()}\n")
    rows = sized + ([big] if big else [])
    print("| names | RRsets unsigned | Knot load + sign s | feeder start -> zone serial s | AXFR in s | "
          "AXFR tries | -> 3 secondaries s | feeder CPU s | peak RSS MB (VmHWM) | state MB (metric) | state du MB |")
    print("|" + " --- |" * 11)
    for r in rows:
        print(f"| {r.names:,} | {r.rrs_unsigned:,} | {r.sign_s:.1f} | {r.to_zone_s:.2f} | {r.axfr_in_s:.2f} | "
              f"{r.axfr_tries} | {r.to_secondaries_s:.2f} | {r.cpu_load_s:.1f} | {mb(r.hwm_kb)} | {r.state_bytes / 1e6:.1f} | "
              f"{r.state_du / 1e6:.1f} |")
    loaded = sorted((r for r in sized if not math.isnan(r.to_secondaries_s) and r.hwm_kb), key=lambda r: r.names)
    if len(loaded) >= 2:
        lo, hi = loaded[0], loaded[-1]
        ratio = hi.hwm_kb / lo.hwm_kb
        print(f"\npeak RSS {hi.names:,} / {lo.names:,} names: {mb(hi.hwm_kb)} / {mb(lo.hwm_kb)} MB = "
              f"**{ratio:.2f}x** (target <= {TARGET_RSS_RATIO}x: {verdict(ratio <= TARGET_RSS_RATIO)})")
    if big is not None:
        print(f"\nbig zone, {big.names:,} names: first load {big.to_zone_s:.1f} s to the zone's serial, "
              f"{big.to_secondaries_s:.1f} s to all {SHARDS} secondaries; peak RSS {mb(big.hwm_load_kb)} MB "
              f"after the load, {mb(big.hwm_kb)} MB at the end (RSS then {mb(big.rss_kb)} MB); state "
              f"{big.state_bytes / 1e6:.1f} MB (" + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in
                                                                big.state_files.items()) + ")")
        if big.latency:
            print(f"\nNOTIFY -> ... on the {big.names:,}-name zone, updates of {NAMES_PER_UPDATE} names, "
                  f"polled every {args.poll_ms:g} ms; ms:\n")
            print("| pause between updates | updates | measured | p50 | p99 | max | target p99 <= 1 s |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for gap, lat in big.latency.items():
                if not lat.a:
                    continue
                for label, values, target in (
                        ("the feeder's dnsrouter_feed_zone_serial (IXFR in: part of a)", lat.ixfr_in, False),
                        ("(a) every backend's dnsrouter_feed_notified_serial", lat.a, True),
                        ("(b) every secondary serves it", lat.b, True),
                        ("(b) each secondary, one by one", lat.b_each, False)):
                    p99 = percentile(sorted(values), 99)
                    print(f"| {gap:g} s | {len(lat.a)} | {label} | {ms(values, 50)} | {ms(values, 99)} | "
                          f"{max(values) * 1000:.0f} | {verdict(p99 <= TARGET_P99_S) if target else ''} |")
            print("\nNOTIFYs the feeder sent again (unanswered at first): "
                  + ", ".join(f"{lat.resent} with a pause of {gap:g} s" for gap, lat in big.latency.items()))
        kinds = [" ".join(f"{k}x{ts.count(k)}" for k in ("AXFR", "IXFR") if ts.count(k)) for ts in big.transfers]
        print(f"transfers in per secondary: {'; '.join(kinds)}")
    problems = [(r.names, p) for r in rows for p in r.problems]
    print("\nProblems seen:" + ("" if problems else " none"))
    for names, p in problems:
        print(f"  - {names:,} names: {p}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help="comma separated zone sizes (names) for the peak RSS ratio "
                                   "(default 20000,200000; --quick 2000,20000)")
    p.add_argument("--big", type=int, help="names in the big zone: first load, RSS, state, NOTIFY latency "
                                           "(default 1000000, --quick 50000; 0: skip)")
    p.add_argument("--updates", type=int, help="updates on the big zone for each pause of --gaps (default 50, --quick 10)")
    p.add_argument("--quick", action="store_true", help="--sizes 2000,20000 --big 50000 --updates 10")
    p.add_argument("--poll-ms", type=float, default=5.0, help="poll interval while an update spreads (default 5)")
    p.add_argument("--load-timeout", type=float, default=3600.0,
                   help="seconds a first load may take, feeder and secondaries (default 3600)")
    p.add_argument("--gaps", type=lambda t: [float(x) for x in t.split(",")], default=[1.0, 0.0], metavar="S,S",
                   help="seconds of pause between the end of one update (every secondary has it) and the next: "
                        "--updates updates for each (default 1,0)")
    p.add_argument("--update-timeout", type=float, default=30.0, help="seconds an update may take to spread")
    p.add_argument("--primary-io-timeout", type=int, default=0, metavar="MS",
                   help="the primary's tcp-io-timeout in ms (default 0: Knot's own, 500 ms, which drops a "
                        "reader that stalls that long)")
    p.add_argument("--feeder", type=shlex.split, default=feeder_executable(), metavar="COMMAND",
                   help="the feeder's command line, split as a shell would (default: the dnsrouter-feed "
                        "beside this interpreter)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (feeder config, log, state)")
    args = p.parse_args()
    sizes = [int(s) for s in (args.sizes or ("2000,20000" if args.quick else "20000,200000")).split(",")]
    big = args.big if args.big is not None else (50000 if args.quick else 1000000)
    updates = args.updates if args.updates is not None else (10 if args.quick else 50)
    if big and big < 20 * NAMES_PER_UPDATE:
        p.error("--big needs at least 200 names")
    handle_signals()
    print("command: " + command_line(), flush=True)
    work = tempfile.mkdtemp(prefix="dnsrouter-feed-bench-")
    sized = [Result(n) for n in sizes]
    big_result = Result(big) if big else None
    failed = False
    try:
        for result in sized + ([big_result] if big_result else []):
            try:
                run_zone(result, updates if result is big_result else 0, args,
                         os.path.join(work, f"big{result.names}" if result is big_result else f"z{result.names}"))
            except Exception as e:  # the next zone may still work; the report says what this one got
                failed = True
                traceback.print_exc()
                result.problems.append(f"stopped by {type(e).__name__}: " + " | ".join(str(e).splitlines()[:3]))
    finally:
        ignore_signals()
        stop_all()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(sized, big_result, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
