"""dnsrouter-feed against real servers: a Knot primary that signs the zone
itself and takes dynamic updates, the feeder with three shards, three Knot
secondaries (one TSIG key each), and the router on the feeder's routes.

The acceptance test: after the first load and after each round of updates
(names added and deleted in several shards, a new delegation with DS, a
changed record; then the zone moved from NSEC to NSEC3), every secondary
reaches the primary's serial by IXFR, holds exactly its shard (what
``dnsrouterctl shard`` makes of the primary's zone with the feeder's map),
and ``delv`` with the zone's own trust anchor gets, through the router, for
existing and non-existing names, what it gets from the primary.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import socket
import sqlite3
import struct
import threading
from typing import Iterator

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.xfr
import dns.zone
import pytest

from dnsrouter.routes import compile_set, parse_value
from dnsrouter.supervisor.tools import shard
from support import delv
from support.etcd import EtcdServer, put3, read_prefix3, revision
from support.feeder import Feeder
from support.knot_xfr import KnotPrimary, KnotSecondary, tsig_key
from support.net import HOST, free_port, raw_udp, wait_until
from support.router import Router
from support.zones import zone_text

pytestmark = pytest.mark.system

ORIGIN = "feed.test."
APEX = dns.name.from_text(ORIGIN)
SHARDS = 3
LABELS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
          "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
          "whiskey", "xray", "yankee", "zulu"]
DS = "12345 13 2 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def zone_lines() -> list[str]:
    lines = ["@ MX 10 mail.zulu", "ns1 A 127.0.0.1", "mail.zulu A 192.0.2.25",
             # A signed delegation with glue below it, one out of the zone, one whose
             # name server is in another shard (the feeder adds its address there).
             "sub NS ns.sub", f"sub DS {DS}", "ns.sub A 192.0.2.53",
             "out NS ns.elsewhere.example.", "cross NS ns1.zulu", "ns1.zulu A 192.0.2.54",
             "*.wild.golf TXT \"wildcard\"", "a.b.c.hotel TXT \"below empty non-terminals\""]
    for i, label in enumerate(LABELS):
        lines.append(f"{label} A 192.0.2.{i + 1}")
        lines += [f"h{j}.{label} A 198.51.100.{j}" for j in range(6)]
        lines.append(f"{label} TXT \"{label}\"")
    return lines


def shard_of_zone(zone: dns.zone.Zone, lows: tuple[bytes, ...]) -> list[set[tuple]]:
    """What each secondary must hold: the shard tool's split of the whole zone at the feeder's map."""
    return [{(name.canonicalize(), r.rdtype, r.covers, r.ttl, rdata.to_digestable())
             for name, held in s.records.items() for r in held for rdata in r}
            for s in shard.split(zone, SHARDS, lows).shards]


def records(zone: dns.zone.Zone) -> set[tuple]:
    return {(name.canonicalize(), r.rdtype, r.covers, r.ttl, rdata.to_digestable())
            for name, node in zone.nodes.items() for r in node for rdata in r}


def lows_of(feeder: Feeder) -> tuple[bytes, ...]:
    with contextlib.closing(sqlite3.connect(f"file:{feeder.state}/zone.sqlite?mode=ro", uri=True)) as db:
        return tuple(bytes.fromhex(low) for low in json.loads(
            db.execute("SELECT value FROM meta WHERE name = 'lows'").fetchone()[0]))


class Setup:
    def __init__(self, stack: contextlib.ExitStack, tmp_path, nsec3: bool = False) -> None:
        self.keys = [tsig_key(f"shard{k}") for k in range(SHARDS)]
        feed_port = free_port()
        self.secondaries = [stack.enter_context(KnotSecondary(ORIGIN, HOST, feed_port, tsig=self.keys[k]))
                            for k in range(SHARDS)]
        self.primary = stack.enter_context(KnotPrimary(ORIGIN, zone_text(ORIGIN, zone_lines()), nsec3=nsec3,
                                                       notify=[(HOST, feed_port)]))
        self.feeder = stack.enter_context(Feeder(ORIGIN, self.primary.addr,
                                                 [(self.keys[k], [s.addr]) for k, s in enumerate(self.secondaries)],
                                                 port=feed_port))
        self.anchor = delv.write_anchor(tmp_path / "anchor.conf", ORIGIN, self.primary.ksk())
        self.rng = random.Random(25)

    def caught_up(self) -> int:
        """Every secondary at the primary's serial; that serial."""
        serial = self.primary.serial()
        wait_until(lambda: self.feeder.serial(0) == serial, 30,
                   message=f"the feeder did not reach serial {serial}:\n{self.feeder.log_tail()}")
        for secondary in self.secondaries:
            secondary.wait_serial(serial, timeout=30)
        return serial

    def check_shards(self) -> None:
        whole = self.primary.zone_records()
        want = shard_of_zone(whole, lows_of(self.feeder))
        for k, secondary in enumerate(self.secondaries):
            held = records(secondary.zone_records())
            assert held == want[k], (f"shard {k}: missing {sorted(want[k] - held)[:5]}, "
                                     f"extra {sorted(held - want[k])[:5]}")

    def check_answers(self, router: Router, names: list[str]) -> int:
        """delv through the router agrees with delv at the primary; how many validated."""
        whole = self.primary.zone_records()
        existing = sorted(n.to_text() for n in whole.nodes if n != APEX)
        sample = self.rng.sample(existing, 12) + names + [ORIGIN] + [
            f"nx{self.rng.randrange(1000)}.{label}.{ORIGIN}" for label in self.rng.sample(LABELS, 5)] + [
            f"{self.rng.choice('abcdefghijklmnopqrstuvwxyz')}{self.rng.randrange(100)}.{ORIGIN}" for _ in range(5)]
        queries = [(name, rdtype) for name in dict.fromkeys(sample) for rdtype in ("A", "TXT")]
        reference = delv.lookup_many(self.primary.port, self.anchor, ORIGIN, queries)
        got = delv.lookup_many(router.port, self.anchor, ORIGIN, queries)
        wrong = [q for q in queries if got[q].outcome != reference[q].outcome]
        assert not wrong, "\n".join(f"{q}: router {got[q].describe()}\n  primary {reference[q].describe()}"
                                    for q in wrong[:3])
        validated = sum(reference[q].validated for q in queries)
        kinds = {reference[q].kind for q in queries}
        assert {"answer", "nxdomain"} <= kinds and validated >= len(queries) // 2, kinds
        return validated


def round_of_updates(setup: Setup, number: int) -> list[str]:
    """Names added and deleted in several shards, a new delegation with DS, a changed record."""
    added = [f"new{number}.{label}.{ORIGIN}" for label in ("alpha", "lima", "yankee")] + [f"fresh{number}.{ORIGIN}"]
    deleted = [f"h{number}.{label}.{ORIGIN}" for label in ("bravo", "mike", "zulu")]
    lines = [f"add {name} 300 A 203.0.113.{number}" for name in added]
    lines += [f"del {name}" for name in deleted]
    lines += [f"add deleg{number}.{ORIGIN} 300 NS ns.deleg{number}.{ORIGIN}",
              f"add deleg{number}.{ORIGIN} 300 DS {DS}",
              f"add ns.deleg{number}.{ORIGIN} 300 A 192.0.2.{100 + number}",
              f"del {LABELS[number]}.{ORIGIN} A", f"add {LABELS[number]}.{ORIGIN} 600 A 203.0.113.{200 + number}"]
    setup.primary.update(lines)
    return added + deleted + [f"{LABELS[number]}.{ORIGIN}", f"deleg{number}.{ORIGIN}"]


def test_secondaries_and_the_router_follow_the_signed_zone_through_updates_and_nsec3(tmp_path):
    with contextlib.ExitStack() as stack:
        setup = Setup(stack, tmp_path)
        router = stack.enter_context(Router(routes_dir=str(setup.feeder.routes_dir)))
        first = setup.caught_up()
        wait_until(lambda: len(list(setup.feeder.routes_dir.iterdir())) == SHARDS, 10, message="routes")
        setup.check_shards()
        setup.check_answers(router, [])
        for number in (1, 2):
            names = round_of_updates(setup, number)
            setup.caught_up()
            setup.check_shards()
            setup.check_answers(router, names)
        assert setup.primary.set_nsec3(True) > first
        names = round_of_updates(setup, 3)
        setup.caught_up()
        setup.check_shards()
        assert any(r.rdtype == dns.rdatatype.NSEC3 for s in setup.secondaries
                   for _, node in s.zone_records().nodes.items() for r in node)
        setup.check_answers(router, names)
        for secondary in setup.secondaries:  # the first load whole, every change after it by IXFR
            assert secondary.transfers()[0] == "AXFR" and set(secondary.transfers()[1:]) == {"IXFR"}, \
                secondary.transfers()
        assert setup.feeder.metric("dnsrouter_feed_transfers_in_total", type="axfr", result="ok") == 1
        assert setup.feeder.metric("dnsrouter_feed_transfers_in_total", type="ixfr", result="ok") >= 4
        assert "changes per shard 0:" in setup.feeder.log()


def test_ixfr_out_is_the_shards_share_of_the_change_and_keyless_requests_are_refused(tmp_path):
    with contextlib.ExitStack() as stack:
        setup = Setup(stack, tmp_path, nsec3=True)
        before = setup.caught_up()
        feeder = setup.feeder
        axfr = [sum(len(r) for m in feeder.transfer(k, "AXFR") for r in m.answer) for k in range(SHARDS)]
        setup.primary.update([f"add one.alpha.{ORIGIN} 300 A 192.0.2.99"])  # one name, in shard 0
        after = setup.caught_up()
        for k in range(SHARDS):
            messages = feeder.transfer(k, "IXFR", serial=before)
            answer = [r for m in messages for r in m.answer]
            soas = [r[0].serial for r in answer if r.rdtype == dns.rdatatype.SOA]
            assert soas[:3] == [after, before, after] and soas[-1] == after  # RFC 1995: incremental
            changed = {r.name.to_text() for r in answer if r.rdtype != dns.rdatatype.SOA}
            # Every shard: the apex's new signatures and NSEC3 records; only shard 0 the new name.
            assert (f"one.alpha.{ORIGIN}" in changed) == (k == 0), (k, changed)
            assert len(answer) < axfr[k] / 5, (k, len(answer), axfr[k])
            assert feeder.metric("dnsrouter_feed_transfers_out_total", shard=str(k), type="ixfr") >= 1
        # No key: REFUSED. A shard's key name with another secret: NOTAUTH, unsigned.
        assert feeder.ask_soa(None).rcode() == dns.rcode.REFUSED
        with pytest.raises(dns.xfr.TransferError) as refused:
            feeder.transfer(None, "AXFR")
        assert refused.value.rcode == dns.rcode.REFUSED
        wrong = dns.tsig.Key(feeder.key(1).name, b"another secret", feeder.key(1).algorithm)
        query = dns.message.make_query(ORIGIN, "SOA")
        query.use_tsig({wrong.name: wrong}, wrong.name, algorithm=wrong.algorithm)
        reply = dns.message.from_wire(raw_udp(feeder.port, query.to_wire()), keyring=False)
        assert reply.rcode() == dns.rcode.NOTAUTH and not reply.answer
        # A NOTIFY from an address other than the primary's does not start a transfer.
        notify = dns.message.make_query(ORIGIN, "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.2", 0))
            other.settimeout(2)
            other.sendto(notify.to_wire(), (HOST, feeder.port))
            assert dns.message.from_wire(other.recv(65535)).rcode() == dns.rcode.REFUSED
        assert feeder.metric("dnsrouter_feed_refused_total", reason="notify") == 1
        assert feeder.metric("dnsrouter_feed_refused_total", reason="no shard key") >= 2


def test_a_feeder_killed_and_started_again_continues_by_ixfr_not_axfr(tmp_path):
    with contextlib.ExitStack() as stack:
        setup = Setup(stack, tmp_path)
        setup.caught_up()
        for round_number in (1, 2):
            setup.feeder.kill()
            setup.primary.update([f"add killed{round_number}.kilo.{ORIGIN} 300 A 192.0.2.{round_number}",
                                  f"del h{round_number}.echo.{ORIGIN}"])
            setup.feeder.start()
            setup.caught_up()
            assert setup.feeder.metric("dnsrouter_feed_transfers_in_total", type="ixfr", result="ok") == 1
            assert setup.feeder.metric("dnsrouter_feed_transfers_in_total", type="axfr", result="ok") == 0
            assert "by IXFR" in setup.feeder.log_since_start() and "by AXFR" not in setup.feeder.log_since_start()
        setup.check_shards()


class CuttingPrimary:
    """A primary in Python that serves a zone whole (AXFR), and can be told to
    cut every transfer's stream after its first message."""

    def __init__(self, zone: dns.zone.Zone) -> None:
        self.zone = zone
        self.cut = False
        self.clients: set[str] = set()  # the addresses queries and transfers came from
        self.port = free_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((HOST, self.port))
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((HOST, self.port))
        self.tcp.listen()
        self.addr = f"{HOST}:{self.port}"
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def soa(self) -> dns.rrset.RRset:
        return self.zone.find_rrset(APEX, "SOA")

    def _serve_udp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                wire, peer = self.udp.recvfrom(65535)
                self.clients.add(peer[0])
                query = dns.message.from_wire(wire)
                response = dns.message.make_response(query)
                response.answer.append(self.soa())
                self.udp.sendto(response.to_wire(), peer)

    def _serve_tcp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = self.tcp.accept()
                self.clients.add(peer[0])
                with conn:
                    length = struct.unpack("!H", conn.recv(2))[0]
                    query = dns.message.from_wire(conn.recv(length))
                    rrsets = [self.soa()] + [dns.rrset.from_rdata_list(name, r.ttl, list(r))
                                             for name, node in self.zone.nodes.items() for r in node
                                             if r.rdtype != dns.rdatatype.SOA] + [self.soa()]
                    for start in range(0, len(rrsets), 10):
                        response = dns.message.make_response(query)
                        response.answer = rrsets[start:start + 10]
                        wire = response.to_wire()
                        conn.sendall(struct.pack("!H", len(wire)) + wire)
                        if self.cut:
                            break

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


@contextlib.contextmanager
def fed_by_a_fake_primary(soa_timers: str = "3600 900 604800") -> Iterator[tuple[dns.zone.Zone, CuttingPrimary,
                                                                                    Feeder]]:
    """The test zone at serial 1 (refresh, retry and expire as given) from a
    CuttingPrimary, and a feeder that has loaded it (its secondaries are
    addresses where nothing listens)."""
    head = f"$ORIGIN {ORIGIN}\n@ 300 SOA ns1 hostmaster 1 {soa_timers} 300\n@ NS ns1\nns1 A 127.0.0.1\n"
    zone = dns.zone.from_text(head + "\n".join(zone_lines()) + "\n", origin=ORIGIN, relativize=False)
    primary = CuttingPrimary(zone)
    try:
        with Feeder(ORIGIN, primary.addr, [(tsig_key(f"shard{k}"), [f"{HOST}:{free_port()}"])
                                           for k in range(SHARDS)]) as feeder:
            wait_until(lambda: feeder.serial(0) == 1, 15, message=feeder.log_tail())
            yield zone, primary, feeder
    finally:
        primary.close()


def test_a_transfer_that_breaks_keeps_the_last_serial_served_and_is_tried_again():
    with fed_by_a_fake_primary() as (zone, primary, feeder):
        whole = [r for m in feeder.transfer(1, "AXFR") for r in m.answer]
        with zone.writer() as txn:  # a new serial that never arrives whole
            txn.add(f"new.alpha.{ORIGIN}", 300, dns.rdata.from_text("IN", "A", "192.0.2.1"))
            txn.update_serial(name=APEX)
        primary.cut = True
        notify = dns.message.make_query(ORIGIN, "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        assert dns.message.from_wire(raw_udp(feeder.port, notify.to_wire())).rcode() == dns.rcode.NOERROR
        wait_until(lambda: feeder.metric("dnsrouter_feed_transfers_in_total", type="ixfr", result="failed")
                   + feeder.metric("dnsrouter_feed_transfers_in_total", type="axfr", result="failed") >= 3,
                   20, message=feeder.log_tail())  # tried again, after 1 s, 2 s ...
        assert feeder.serial(0) == 1 and feeder.serial(2) == 1
        assert [r for m in feeder.transfer(1, "AXFR") for r in m.answer] == whole
        assert "serial 1 kept" in feeder.log()
        primary.cut = False  # the primary mended: the next try brings the new serial, by itself
        wait_until(lambda: feeder.serial(0) == 2, 20, message=feeder.log_tail())
        assert any(r.name == dns.name.from_text(f"new.alpha.{ORIGIN}")
                   for m in feeder.transfer(0, "AXFR") for r in m.answer)


def test_shards_are_not_served_once_the_primary_is_gone_past_the_soa_expire():
    with fed_by_a_fake_primary("1 1 4") as (_, primary, feeder):  # refresh 1 s, expire 4 s
        feeder.transfer(2, "AXFR")
        assert feeder.metric("dnsrouter_feed_shard_serial", shard="2") == 1
        feeder.proc.send_signal(signal.SIGHUP)  # read at start only: said, and nothing stops
        wait_until(lambda: "SIGHUP" in feeder.log(), 5, message=feeder.log_tail())
        assert feeder.serial(1) == 1 and feeder.proc.poll() is None
        primary.close()
        wait_until(lambda: feeder.ask_soa(0).rcode() == dns.rcode.SERVFAIL, 15, message=feeder.log_tail())
        wait_until(lambda: "serial 1 kept" in feeder.log(), 15, message=feeder.log_tail())  # it keeps asking
        assert feeder.stop() == 0  # SIGTERM: a clean exit


def test_the_soa_refresh_brings_a_new_serial_without_notify():
    with fed_by_a_fake_primary("2 1 600") as (zone, _, feeder):  # refresh 2 s
        with zone.writer() as txn:
            txn.add(f"refreshed.kilo.{ORIGIN}", 300, dns.rdata.from_text("IN", "A", "192.0.2.7"))
            txn.update_serial(name=APEX)
        # Nobody sends a NOTIFY: the refresh timer finds the new serial.
        wait_until(lambda: feeder.serial(1) == 2, 10, message=feeder.log_tail())


def test_garbage_and_a_connection_flood_get_errors_or_nothing_and_the_shards_are_still_served():
    rng = random.Random(28)
    with fed_by_a_fake_primary() as (_, _, feeder):
        query = dns.message.make_query(ORIGIN, "SOA").to_wire()
        garbage = [b"", b"\x00", query[:11], query[:14], bytes(rng.getrandbits(8) for _ in range(300)),
                   query[:2] + b"\x80" + query[3:],  # a response: dropped
                   query[:4] + b"\x00\x05" + query[6:]]  # five questions announced, one there
        replies = {i: raw_udp(feeder.port, g, timeout=0.5) for i, g in enumerate(garbage)}
        assert replies[5] is None  # never an answer to an answer
        for i in (3, 6):
            assert dns.message.from_wire(replies[i], keyring=False).rcode() in (dns.rcode.FORMERR,
                                                                               dns.rcode.REFUSED)
        flood = []
        for _ in range(80):  # more connections than it serves at once, each silent
            conn = socket.create_connection((HOST, feeder.port), timeout=2)
            conn.sendall(b"\x00\x20" + b"\x01" * 10)  # a message that never arrives whole
            flood.append(conn)
        wait_until(lambda: feeder.metric("dnsrouter_feed_refused_total", reason="connections") >= 16, 10,
                   message=feeder.log_tail())
        for conn in flood:
            conn.close()
        assert feeder.serial(2) == 1  # UDP meanwhile, and TCP again once the flood is gone:
        wait_until(lambda: len(feeder.transfer(1, "AXFR")) >= 1, 10, message=feeder.log_tail())
        assert feeder.proc.poll() is None


def test_routes_go_to_etcd_once_each_secondary_serves_under_keys_of_this_feeder(tmp_path):
    zone = dns.zone.from_text(zone_text(ORIGIN, zone_lines()), origin=ORIGIN, relativize=False)
    primary = CuttingPrimary(zone)
    keys = [tsig_key(f"shard{k}") for k in range(SHARDS)]
    feed_port = free_port()
    silent = f"{HOST}:{free_port()}"  # configured, never serves: never routed
    try:
        with contextlib.ExitStack() as stack:
            etcd = stack.enter_context(EtcdServer())
            secondaries = [[stack.enter_context(KnotSecondary(ORIGIN, HOST, feed_port, tsig=keys[k]))
                            for _ in range(2 if k == 0 else 1)] for k in range(SHARDS)]
            backends = [[s.addr for s in group] + ([silent] if k == SHARDS - 1 else [])
                        for k, group in enumerate(secondaries)]
            feeder = stack.enter_context(Feeder(ORIGIN, primary.addr, list(zip(keys, backends)), port=feed_port,
                                                registry=f"etcd = {etcd.url}"))
            wait_until(lambda: len(read_prefix3(etcd.url, "/dnsrouter/")) == 4, 20, message=feeder.log_tail())
            routes = read_prefix3(etcd.url, "/dnsrouter/")
            prefix = next(iter(routes)).rsplit("-", 2)[0] + "-"
            assert re.fullmatch(r"feed-feed\.test-[0-9a-f]{8}-", prefix), prefix
            names = {"www.alpha.feed.test.": 0, "zulu.feed.test.": SHARDS - 1, ORIGIN: 0}
            for key, (value, _) in routes.items():
                route = parse_value(value)  # the router's own parser takes it
                k = int(key.split("-")[-2])
                assert key == f"{prefix}{k}-{route.backend}" and str(route.backend) in backends[k]
                assert str(route.backend) != silent
                matcher = compile_set([route.pattern])
                assert {name for name in names if matcher.Match(name) == [0]} == \
                    {name for name, shard in names.items() if shard == k}, key
            put3(etcd.url, f"/dnsrouter/{prefix}7-127.0.0.1:1", "127.0.0.1:1,^x$")  # ours, no such secondary now
            other = "feed-feed.test-00000000-0-127.0.0.1:2"  # another feeder of the zone: never touched
            put3(etcd.url, f"/dnsrouter/{other}", "127.0.0.1:2,^y$")
            before = revision(etcd.url)
            feeder.stop()
            feeder.start()
            wait_until(lambda: "routes: 4 of 5 secondaries serve the zone, 0 written, 1 removed"
                       in feeder.log_since_start(), 15, message=feeder.log_tail())
            assert read_prefix3(etcd.url, "/dnsrouter/") == {**routes, other: ("127.0.0.1:2,^y$", before)}
            assert revision(etcd.url) == before + 1  # the one removal
            assert feeder.metric("dnsrouter_feed_backend_serial", shard="1", backend=backends[1][0]) == 1
    finally:
        primary.close()


class ImpatientPrimary(KnotPrimary):
    """A Knot primary that drops a transfer when its reader leaves a message
    unread for 100 ms (``tcp-io-timeout``; 500 ms by default)."""

    def config(self) -> str:
        return super().config().replace("server:\n", "server:\n    tcp-io-timeout: 100\n", 1)


def test_a_primary_that_drops_slow_readers_gives_the_whole_zone_at_the_first_try():
    # Parsing and storing a transfer's messages takes longer than 100 ms at a time: read
    # straight from the socket, the transfer would be dropped again and again.
    lines = [f"h{i}.l{i % 997} A 192.0.2.{i % 250}" for i in range(20000)]
    keys = [tsig_key(f"shard{k}") for k in range(SHARDS)]
    with ImpatientPrimary(ORIGIN, zone_text(ORIGIN, lines), startup_timeout=60) as primary, \
            Feeder(ORIGIN, primary.addr, [(key, [f"{HOST}:{free_port()}"]) for key in keys]) as feeder:
        wait_until(lambda: feeder.metric("dnsrouter_feed_zone_serial") == primary.serial(), 120,
                   message=feeder.log_tail())
        assert feeder.metric("dnsrouter_feed_transfers_in_total", type="axfr", result="failed") == 0


def test_queries_transfers_and_notifies_leave_from_the_listen_address():
    # The primary's and the secondaries' ACLs name the feeder by the address it listens on.
    zone = dns.zone.from_text(zone_text(ORIGIN, zone_lines()), origin=ORIGIN, relativize=False)
    primary = CuttingPrimary(zone)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as secondary:
            secondary.bind((HOST, 0))
            secondary.settimeout(10)
            backend = f"{HOST}:{secondary.getsockname()[1]}"
            shards = [(tsig_key(f"shard{k}"), [backend if k == 1 else f"{HOST}:{free_port()}"]) for k in range(SHARDS)]
            with Feeder(ORIGIN, primary.addr, shards, host="127.0.0.3") as feeder:
                wait_until(lambda: feeder.serial(0) == 1, 15, message=feeder.log_tail())
                wire, peer = secondary.recvfrom(65535)
                notify = dns.message.from_wire(wire, keyring=False)
                assert notify.opcode() == dns.opcode.NOTIFY and peer[0] == "127.0.0.3"
                assert primary.clients == {"127.0.0.3"}
    finally:
        primary.close()
