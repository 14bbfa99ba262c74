"""dnsrouterctl shard's split and regexps, as properties over random zones and names.

Every possible query name in the zone (any octets, any case, any depth, the
apex) must match exactly one shard's regexp, matched as the router matches
(lower-cased wire name, in presentation format, through the router's RE2
set), and the shard it matches must hold the name when it exists; a name
outside the zone matches none. The servers themselves are in test_shard.py.
"""
from __future__ import annotations

import dns.name
import dns.rdataset
import dns.rdatatype
import dns.zone
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsrouter import wire
from dnsrouter.routes import compile_set
from dnsrouter.supervisor.tools import label_ranges, shard

# Octets the escapes and the bounds care about, often; any octet, sometimes.
OCTETS = st.one_of(st.sampled_from(b"aAbBzZ09-*.\\\"()@$;\x00\x20\x7f\xff"), st.integers(0, 255))
LABELS = st.binary(min_size=1, max_size=63).map(bytes) | st.lists(OCTETS, min_size=1, max_size=8).map(bytes)
ORIGINS = st.sampled_from(["shard.test.", "Ex\\.ample.", "a.b.c.d.", "."])


def zone_of(origin: dns.name.Name, names: list[dns.name.Name]) -> dns.zone.Zone:
    zone = dns.zone.Zone(origin, relativize=False)
    zone.replace_rdataset(origin, dns.rdataset.from_text("IN", "SOA", 300, f"ns.{origin} h.{origin} 1 2 3 4 5"
                                                         if origin != dns.name.root else "ns. h. 1 2 3 4 5"))
    for name in names:
        zone.replace_rdataset(name, dns.rdataset.from_text("IN", "TXT", 300, '"x"'))
    return zone


def below(origin: dns.name.Name, labels: list[bytes]) -> dns.name.Name | None:
    try:
        return dns.name.Name(tuple(labels) + origin.labels)
    except dns.name.NameTooLong:
        return None


def mixed_case(name: dns.name.Name, data) -> dns.name.Name:
    def flip(c: int) -> int:
        return c ^ 0x20 if 0x61 <= c | 0x20 <= 0x7A and data.draw(st.booleans()) else c

    return dns.name.Name(tuple(bytes(flip(c) for c in label) for label in name.labels))


def matching(patterns, name: dns.name.Name) -> list[int]:
    text = wire.name_to_text(name.to_wire().lower())  # what the router matches
    return sorted(patterns.Match(text) or ())


@settings(max_examples=150, deadline=None)
@given(origin_text=ORIGINS, zone_labels=st.lists(st.lists(LABELS, min_size=1, max_size=3), min_size=1, max_size=25),
       shards=st.integers(1, 6), queries=st.lists(st.lists(LABELS, min_size=0, max_size=4), max_size=30),
       data=st.data())
def test_every_name_matches_exactly_one_shard_and_that_shard_holds_it(origin_text, zone_labels, shards, queries, data):
    origin = dns.name.from_text(origin_text)
    names = [n for n in (below(origin, labels) for labels in zone_labels) if n is not None]
    zone = zone_of(origin, names)
    # the wildcard's records go to every shard: "*" is no subtree of its own to split at
    first_labels = {n.relativize(origin).labels[-1].lower() for n in names} - {b"*"}
    shards = min(shards, len(first_labels) or 1)
    result = shard.split(zone, shards)
    patterns = compile_set(s.pattern for s in result.shards)
    asked = [n for n in (below(origin, labels) for labels in queries) if n is not None]
    # Existing names too, in random case: the router lower-cases, so must the split.
    asked += [mixed_case(n, data) for n in names[:5]]
    asked.append(origin)
    for name in asked:
        hits = matching(patterns, name)
        assert len(hits) == 1, f"{name!r} matched shards {hits}"
        if name == origin:
            assert hits == [0]
        existing = [n for n in names if n == name]  # dns.name equality ignores case, as DNS does
        if existing:
            assert existing[0] in result.shards[hits[0]].records, f"shard {hits[0]} lacks {name}"


@settings(max_examples=60, deadline=None)
@given(zone_labels=st.lists(LABELS, min_size=1, max_size=20), shards=st.integers(1, 4),
       outside=st.lists(LABELS, min_size=1, max_size=3))
def test_a_name_outside_the_zone_matches_no_shard(zone_labels, shards, outside):
    origin = dns.name.from_text("shard.test.")
    names = [dns.name.Name((label,) + origin.labels) for label in zone_labels]
    subtrees = {n.labels[0].lower() for n in names} - {b"*"}  # the wildcard goes to every shard
    result = shard.split(zone_of(origin, names), min(shards, len(subtrees) or 1))
    patterns = compile_set(s.pattern for s in result.shards)
    for suffix in ("test.", "xshard.test.", "shard.test.com.", "shard\\.test.", "."):
        name = dns.name.Name(tuple(outside)).concatenate(dns.name.from_text(suffix)) \
            if len(b"".join(outside)) + 20 < 255 else dns.name.from_text(suffix)
        if name.is_subdomain(origin):
            continue
        assert matching(patterns, name) == [], f"{name} matched"


def test_bounds_are_the_shortest_labels_that_split_and_shards_balance_by_bytes():
    origin = dns.name.from_text("shard.test.")
    names = [dns.name.from_text(f"{label}.shard.test.") for label in ("alpha", "alpine", "beta", "bravo")]
    zone = zone_of(origin, names)
    big = dns.name.from_text("charlie.shard.test.")
    zone.replace_rdataset(big, dns.rdataset.from_text("IN", "TXT", 300, *[f'"{"x" * 200}"'] * 10))
    result = shard.split(zone, 2)
    # charlie alone outweighs the other four: it gets a shard of its own, from "c".
    assert [(s.low, s.high) for s in result.shards] == [(None, b"c"), (b"c", None)]
    assert big in result.shards[1].records and big not in result.shards[0].records


def test_octet_classes_cover_each_lower_cased_octet_once():
    import re2

    for octet in range(256):
        text = dns.name.Name((bytes([octet]), b"")).to_text()[:-1]
        hits = [lo for lo in range(0, 256, 17) if (p := label_ranges.octets(lo, lo + 16)) and
                re2.fullmatch(p, text)]
        if bytes([octet]).lower() == bytes([octet]):
            assert hits == [octet - octet % 17], (octet, text, hits)
        else:
            assert hits == [], (octet, text)  # upper case never reaches the matcher
