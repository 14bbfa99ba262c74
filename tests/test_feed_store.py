"""dnsrouter-feed's store, without servers: the zone on disk against the shard tool.

The store applies transfers through dnspython's transaction interface (what
``dns.xfr.Inbound`` drives); here the same calls come from random zones and
random changes, and every shard it serves must be exactly what
``dnsrouterctl shard`` makes of the same zone with the same map: by AXFR, and
by the old shard plus the IXFR from the old serial.
"""
from __future__ import annotations

import random
import sqlite3
import struct
import tempfile

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dnsrouter.supervisor.tools import shard
from dnsrouter.supervisor.tools.feed.store import StateError, Store
from dnsrouter.supervisor.tools.shardmap import ShardError, canonical_key

ORIGIN = dns.name.from_text("feed.test.")
IN = dns.rdataclass.IN

# (owner, type, covers) -> Rdataset: a zone's whole content, easy to change and compare.
State = dict[tuple[dns.name.Name, int, int], dns.rdataset.Rdataset]
# A record as compared: (owner in canonical wire form, type, TTL, rdata in wire form).
Rec = tuple[bytes, int, int, bytes]


def rdataset(rdtype: str, ttl: int, *texts: str) -> dns.rdataset.Rdataset:
    return dns.rdataset.from_rdata_list(ttl, [dns.rdata.from_text(IN, rdtype, text, origin=ORIGIN, relativize=False)
                                              for text in texts])


def random_state(rng: random.Random, serial: int, nsec: bool) -> State:
    labels = sorted({"".join(rng.choice("abcz0-") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(4, 30))})
    state: State = {}

    def put(name: dns.name.Name, rds: dns.rdataset.Rdataset) -> None:
        state[(name, rds.rdtype, rds.covers)] = rds

    put(ORIGIN, rdataset("SOA", 300, f"ns1 hostmaster {serial} 3600 600 86400 300"))
    put(ORIGIN, rdataset("NS", 300, "ns1", "ns.elsewhere.example."))
    put(dns.name.from_text("ns1", ORIGIN), rdataset("A", 300, "192.0.2.53"))
    for label in labels:
        name = dns.name.from_text(label, ORIGIN)
        kind = rng.random()
        if kind < 0.15:  # a delegation, with its name server in another label of the zone
            put(name, rdataset("NS", 300, f"ns1.{rng.choice(labels)}"))
            put(name, rdataset("DS", 300, f"1234 13 2 {rng.getrandbits(256):064x}"))
        else:
            put(name, rdataset("A", rng.choice([300, 600]), *{f"192.0.2.{rng.randint(1, 250)}"
                                                            for _ in range(rng.randint(1, 3))}))
        if rng.random() < 0.3:
            below = dns.name.from_text(f"ns1.{label}", ORIGIN)
            put(below, rdataset("A", 300, f"198.51.100.{rng.randint(1, 250)}"))
            put(below, rdataset("TXT", 300, f'"{rng.random()}"'))
    if rng.random() < 0.3:
        put(dns.name.from_text("*", ORIGIN), rdataset("TXT", 300, '"wildcard"'))
    if nsec:
        add_nsec_chain(state)
    return state


def add_nsec_chain(state: State) -> None:
    """An NSEC chain (and signatures with made-up bytes) over the state's owners."""
    for key in [k for k in state if dns.rdatatype.NSEC in (k[1], k[2])]:
        del state[key]
    owners = sorted({name for name, _, _ in state})
    for owner, following in zip(owners, owners[1:] + owners[:1]):
        types = sorted({dns.rdatatype.to_text(t) for n, t, _ in state if n == owner} | {"NSEC", "RRSIG"})
        state[(owner, dns.rdatatype.NSEC, 0)] = rdataset("NSEC", 300, f"{following} {' '.join(types)}")
        state[(owner, dns.rdatatype.RRSIG, dns.rdatatype.NSEC)] = rdataset(
            "RRSIG", 300, f"NSEC 13 {len(owner) - 1} 300 20300101000000 20200101000000 1234 feed.test. "
                          f"{owner.to_text()[:8].encode().hex() or '00'}AA==")


def as_zone(state: State) -> dns.zone.Zone:
    zone = dns.zone.Zone(ORIGIN, relativize=False)
    for (name, _, _), rds in state.items():
        zone.find_node(name, create=True).replace_rdataset(rds)
    return zone


def transfer(store: Store, before: State | None, after: State) -> None:
    """``after`` into the store as a transfer would: every record (AXFR) or the difference (IXFR)."""
    with store.writer(before is None) as txn:
        for key, rds in after.items():
            if before is None:
                for rdata in rds:  # a record at a time, each an RRset, as dns.xfr.Inbound adds an AXFR's
                    txn.add(key[0], dns.rrset.from_rdata_list(key[0], rds.ttl, [rdata]))
            elif before.get(key) != rds or before[key].ttl != rds.ttl:
                txn.replace(key[0], rds)
        for key in set(before or ()) - set(after):
            txn.delete(key[0], key[1], key[2])


def parse(record: bytes) -> Rec:
    name, used = dns.name.from_wire(record, 0)
    rdtype, _, ttl, length = struct.unpack_from("!HHIH", record, used)
    assert len(record) == used + 10 + length
    return name.canonicalize().to_wire(), rdtype, ttl, record[used + 10:]


def recs(name: dns.name.Name, rds: dns.rdataset.Rdataset) -> set[Rec]:
    return {(name.canonicalize().to_wire(), rds.rdtype, rds.ttl, rdata.to_wire()) for rdata in rds}


def split(state: State, shards: int, lows: tuple[bytes, ...]) -> list[set[Rec]]:
    return [{r for name, held in s.records.items() for rds in held for r in recs(name, rds)}
            for s in shard.split(as_zone(state), shards, lows).shards]


def served(store: Store, k: int) -> set[Rec]:
    out = [parse(r) for r in store.axfr(k)]
    assert out[0] == out[-1] and out[0][1] == dns.rdatatype.SOA  # the SOA first and last
    return set(out)


def apply_ixfr(held: set[Rec], stream: list[bytes]) -> set[Rec]:
    """RFC 1995's format applied to a shard: SOA, then (old SOA, deletions, new SOA, additions)..., SOA."""
    records = [parse(r) for r in stream]
    assert records[0] == records[-1] and records[0][1] == dns.rdatatype.SOA
    held = set(held)
    deleting = None
    for record in records[1:-1]:
        if record[1] == dns.rdatatype.SOA:
            deleting = not deleting
        if deleting:
            assert record in held, f"IXFR deletes a record the shard does not hold: {record}"
            held.discard(record)
        else:
            assert record not in held or record[1] == dns.rdatatype.SOA, f"IXFR adds a held record: {record}"
            held.add(record)
    return held


def change(rng: random.Random, state: State, serial: int, nsec: bool) -> State:
    """Names added and deleted, records changed, a delegation added, a TTL changed: a new serial."""
    new = {k: v for k, v in state.items() if k[1] != dns.rdatatype.SOA}
    owners = sorted({n for n, _, _ in new if n != ORIGIN})
    for name in rng.sample(owners, min(len(owners), rng.randint(0, 3))):
        for key in [k for k in new if k[0] == name]:
            del new[key]
    for _ in range(rng.randint(0, 4)):
        label = "".join(rng.choice("abcz0-") for _ in range(rng.randint(1, 4)))
        new[(dns.name.from_text(label, ORIGIN), dns.rdatatype.TXT, 0)] = rdataset("TXT", 300, f'"{serial}"')
    if rng.random() < 0.3:
        label = "".join(rng.choice("abcz") for _ in range(3))
        new[(dns.name.from_text(label, ORIGIN), dns.rdatatype.NS, 0)] = rdataset("NS", 300, "ns1")
    a_records = [k for k in new if k[1] == dns.rdatatype.A]
    if a_records:
        key = rng.choice(a_records)
        new[key] = rdataset("A", rng.choice([300, 900]), f"203.0.113.{rng.randint(1, 250)}")
    new[(ORIGIN, dns.rdatatype.SOA, 0)] = rdataset("SOA", 300, f"ns1 hostmaster {serial} 3600 600 86400 300")
    if nsec:
        add_nsec_chain(new)
    return new


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), shards=st.integers(1, 4), nsec=st.booleans(), rounds=st.integers(1, 3))
def test_every_shard_is_the_shard_tools_by_axfr_and_by_ixfr_after_each_change(seed, shards, nsec, rounds):
    rng = random.Random(seed)
    state = random_state(rng, 100, nsec)
    labels = {n.labels[len(n) - len(ORIGIN) - 1].lower() for n, _, _ in state if n != ORIGIN}
    shards = min(shards, len(labels))
    event(f"{shards} shards, {'NSEC' if nsec else 'unsigned'}")
    with tempfile.TemporaryDirectory() as directory:
        store = Store(directory, ORIGIN, shards)
        transfer(store, None, state)
        assert store.serial() == 100
        shard_map = store.shard_map()
        assert shard_map is not None
        # The map made from the bytes on disk is the one the shard tool makes in memory.
        assert tuple(s.low for s in shard.split(as_zone(state), shards).shards[1:]) == shard_map.lows
        held = split(state, shards, shard_map.lows)
        assert [served(store, k) for k in range(shards)] == held
        history = [(100, held)]
        for serial in range(101, 101 + rounds):
            before = state
            state = change(rng, state, serial, nsec)
            transfer(store, before, state)
            assert store.serial() == serial and store.shard_map().lows == shard_map.lows
            want = split(state, shards, shard_map.lows)
            assert [served(store, k) for k in range(shards)] == want
            # From every serial the journal holds: each shard's IXFR brings it to the new one.
            for old_serial, old in history:
                for k in range(shards):
                    stream = store.ixfr(k, old_serial)
                    assert stream is not None
                    assert apply_ixfr(old[k], list(stream)) == want[k], (old_serial, serial, k)
            event("a change moved records in or out of a shard other than by their names"
                  if any(want[k] - held[k] - split_names(want[k] - held[k], shard_map, k) for k in range(shards))
                  else "changes by names only")
            history.append((serial, want))
            held = want


def split_names(added: set[Rec], shard_map, k: int) -> set[Rec]:
    """The records of ``added`` that shard ``k`` holds by the rules of names alone."""
    return {r for r in added
            if shard_map.holds(k, dns.name.from_wire(r[0], 0)[0], r[1],
                               dns.rdata.from_wire(IN, r[1], r[3], 0, len(r[3])).covers()
                               if r[1] == dns.rdatatype.RRSIG else 0)}


def test_canonical_keys_sort_as_dnssec_canonical_order():
    rng = random.Random(7)
    octets = [0, 1, 2, ord("a"), ord("A"), ord("z"), ord("-"), 255]
    names = {dns.name.Name(tuple(bytes(rng.choice(octets) for _ in range(rng.randint(1, 3)))
                                 for _ in range(rng.randint(0, 3))) + ORIGIN.labels) for _ in range(2000)}
    assert sorted(names, key=canonical_key) == sorted(names)  # dnspython's Name order is canonical order
    assert len({canonical_key(n) for n in names}) == len({n.canonicalize() for n in names})


def test_the_journal_answers_ixfr_only_as_far_back_as_it_reaches():
    rng = random.Random(3)
    state = random_state(rng, 1, nsec=True)
    with tempfile.TemporaryDirectory() as directory:
        store = Store(directory, ORIGIN, 2, journal_serials=2)
        transfer(store, None, state)
        for serial in (2, 3, 4):
            before, state = state, change(rng, state, serial, True)
            transfer(store, before, state)
        assert store.ixfr(0, 1) is None  # pruned: the secondary gets an AXFR
        kept = [list(store.ixfr(k, serial) or []) for k in (0, 1) for serial in (2, 3)]  # the last two
        assert all(stream and parse(stream[0])[1] == dns.rdatatype.SOA for stream in kept)
        current = list(store.ixfr(0, 4) or [])
        assert [parse(r)[1] for r in current] == [dns.rdatatype.SOA]  # up to date: the SOA alone
        assert store.ixfr(0, 99) is None  # a serial it never had


def test_a_transfer_that_fails_midway_leaves_the_last_serial_and_its_records():
    rng = random.Random(5)
    state = random_state(rng, 10, nsec=True)
    with tempfile.TemporaryDirectory() as directory:
        store = Store(directory, ORIGIN, 2)
        transfer(store, None, state)
        held = [served(store, k) for k in range(2)]
        new = change(rng, state, 11, True)
        with pytest.raises(RuntimeError):
            with store.writer(False) as txn:
                for key, rds in new.items():
                    txn.replace(key[0], rds)
                raise RuntimeError("the stream broke")
        with pytest.raises(RuntimeError):  # an AXFR too
            with store.writer(True) as txn:
                txn.replace(ORIGIN, new[(ORIGIN, dns.rdatatype.SOA, 0)])
                raise RuntimeError("the stream broke")
        assert store.serial() == 10 and [served(store, k) for k in range(2)] == held
        assert store.ixfr(0, 10) is not None


def test_the_state_refuses_another_zone_or_number_of_shards():
    state = random_state(random.Random(1), 1, nsec=False)
    with tempfile.TemporaryDirectory() as directory:
        transfer(Store(directory, ORIGIN, 2), None, state)
        with pytest.raises(StateError, match="made for 2 shards, the configuration has 3"):
            Store(directory, ORIGIN, 3)
        with pytest.raises(StateError, match="holds the zone feed.test."):
            Store(directory, dns.name.from_text("other.test."), 2)
        Store(directory, ORIGIN, 2)  # the same again: fine


def test_more_shards_than_labels_is_refused_and_nothing_is_stored():
    with tempfile.TemporaryDirectory() as directory:
        store = Store(directory, ORIGIN, 5)
        state = {k: v for k, v in random_state(random.Random(2), 1, nsec=False).items()}
        state = {k: v for k, v in state.items() if k[0] in (ORIGIN, dns.name.from_text("ns1", ORIGIN))}
        with pytest.raises(ShardError, match="at most 1 shards"):
            transfer(store, None, state)
        assert store.serial() is None and store.shard_map() is None
        assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM rrsets").fetchone() == (0,)
