"""Split a zone file into shards, DNSSEC included (``dnsrouterctl shard``).

What each shard holds is ``shardmap``'s rules, the same that
``dnsrouter-feed`` follows for a zone that changes; shards are balanced by
the bytes (wire format) of their records.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Sequence

import dns.exception
import dns.name
import dns.rdataset
import dns.rdatatype
import dns.zone

from .shardmap import (ADDRESS_TYPES, NSEC_TYPES, ShardError, ShardMap, balance, is_common, needs_addresses,
                       nsec_proofs, record_bytes, top_label, with_signatures)

__all__ = ["ShardError", "Shard", "Split", "load", "split", "write"]

_APEX_FIRST = (dns.rdatatype.SOA, dns.rdatatype.NS)


class _Portable(dns.name.IDNACodec):
    """Names written so that every server's zone parser takes them: letters,
    digits, "-", "_" and "*" as they are, every other octet as a decimal
    escape (Knot DNS refuses a bare ":" that dnspython writes as it is).
    A name style's codec is where dnspython lets us choose a label's text."""

    def decode(self, label: bytes) -> str:
        return "".join(chr(c) if c in _AS_IS else f"\\{c:03d}" for c in label)

    def encode(self, label: str) -> bytes:
        raise NotImplementedError("only for writing")


_AS_IS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")
_STYLE = dns.rdataset.RdatasetStyle(idna_codec=_Portable())


@dataclass
class Shard:
    index: int
    low: bytes | None  # its first label below the apex (None: from the start)
    high: bytes | None  # the next shard's first (None: to the end)
    pattern: str
    records: dict[dns.name.Name, list[dns.rdataset.Rdataset]] = field(default_factory=dict)

    def add(self, name: dns.name.Name, rdatasets: list[dns.rdataset.Rdataset]) -> None:
        held = self.records.setdefault(name, [])
        for rdataset in rdatasets:
            if not any(r.rdtype == rdataset.rdtype and r.covers == rdataset.covers for r in held):
                held.append(rdataset)

    def text(self) -> str:
        """The shard as a zone file: absolute names, the apex first with its SOA."""
        lines: list[str] = []
        for name in sorted(self.records):
            rdatasets = sorted(self.records[name], key=lambda r: _APEX_FIRST.index(r.rdtype)
                               if r.rdtype in _APEX_FIRST else len(_APEX_FIRST))
            lines.extend(r.to_text(name, style=_STYLE) for r in rdatasets)
        return "\n".join(lines) + "\n"


@dataclass
class Split:
    origin: dns.name.Name
    shards: list[Shard]
    signed: str  # "NSEC", "NSEC3" or "unsigned"
    nsec3_bytes: int  # of the NSEC3 chain every shard holds


def load(path: str, origin: str) -> dns.zone.Zone:
    """The zone file at ``path``, with absolute names (ShardError if it does not parse)."""
    try:
        return dns.zone.from_file(path, origin=origin, relativize=False)
    except OSError as e:
        raise ShardError(f"{path}: {e.strerror or e}") from None
    except (dns.exception.DNSException, ValueError) as e:
        raise ShardError(f"{path}: not a zone file for {origin}: {e}") from None


def _size(name: dns.name.Name, rdatasets: list[dns.rdataset.Rdataset]) -> int:
    """Bytes of the records in wire format, uncompressed, as ``dnsrouter-feed`` counts them."""
    return sum(record_bytes(len(name.to_digestable()), [len(rdata.to_wire()) for rdata in r]) for r in rdatasets)


def _only(rdatasets: list[dns.rdataset.Rdataset], types: tuple[int, ...]) -> list[dns.rdataset.Rdataset]:
    return [r for r in rdatasets if with_signatures(r.rdtype, r.covers, types)]


def split(zone: dns.zone.Zone, shards: int, lows: Sequence[bytes] | None = None) -> Split:
    """Split ``zone`` (with absolute names) into ``shards`` shards: balanced
    by bytes, or at ``lows`` (the first label of each shard after the first:
    a map made earlier, which ``dnsrouter-feed`` keeps)."""
    origin = zone.origin
    assert origin is not None
    common: dict[dns.name.Name, list[dns.rdataset.Rdataset]] = {}
    subtrees: dict[bytes, dict[dns.name.Name, list[dns.rdataset.Rdataset]]] = {}
    nsec_owners: list[dns.name.Name] = []
    nsec3_bytes = 0
    for name, node in zone.nodes.items():
        rdatasets = list(node.rdatasets)
        if any(r.rdtype == dns.rdatatype.NSEC for r in rdatasets):
            nsec_owners.append(name)
        shared = [r for r in rdatasets if is_common(origin, name, r.rdtype, r.covers)]
        if shared:
            common.setdefault(name, []).extend(shared)
            if name != origin:
                nsec3_bytes += _size(name, [r for r in shared if with_signatures(r.rdtype, r.covers, (
                    dns.rdatatype.NSEC3,))])
        own = [r for r in rdatasets if not is_common(origin, name, r.rdtype, r.covers)]
        if own:
            subtrees.setdefault(top_label(origin, name), {})[name] = own
    labels = sorted(subtrees)  # lower-cased single labels: bytes order is canonical order
    sizes = [sum(_size(n, r) for n, r in subtrees[label].items()) for label in labels]
    shard_map = ShardMap(origin, balance(zip(labels, sizes), len(labels), sum(sizes), shards)
                         if lows is None else lows)
    result = []
    for k in range(shards):
        high = shard_map.lows[k] if k + 1 < shards else None
        shard = Shard(k, shard_map.lows[k - 1] if k else None, high, shard_map.pattern(k))
        for name, rdatasets in common.items():
            shard.add(name, rdatasets)
        result.append(shard)
    for label in labels:
        home = result[bisect.bisect_right(shard_map.lows, label)]
        for name, rdatasets in subtrees[label].items():
            home.add(name, rdatasets)
    nsec_owners.sort()

    def covering(name: dns.name.Name) -> dns.name.Name | None:
        at = bisect.bisect_right(nsec_owners, name)
        return nsec_owners[at - 1] if at else None

    for k, owners in nsec_proofs(shard_map, covering, lambda name: name in zone.nodes).items():
        for owner in owners:
            result[k].add(owner, _only(list(zone.nodes[owner].rdatasets), NSEC_TYPES))
    for shard in result:
        targets = {rdata.target for rdatasets in list(shard.records.values()) for r in rdatasets
                   if r.rdtype == dns.rdatatype.NS for rdata in r}
        for target in sorted(targets):
            held = zone.nodes.get(target)
            if held is not None and needs_addresses(shard_map, shard.index, target):
                addresses = _only(list(held.rdatasets), ADDRESS_TYPES)
                if addresses:
                    shard.add(target, addresses)
    signed = "NSEC3" if nsec3_bytes else "NSEC" if nsec_owners else "unsigned"
    return Split(origin, result, signed, nsec3_bytes)


def write(result: Split, directory: str) -> list[tuple[str, int, int]]:
    """Write ``<directory>/<k>.zone`` for each shard; (path, bytes, names) of each."""
    try:
        os.makedirs(directory, exist_ok=True)
        taken = sorted(os.listdir(directory))
    except OSError as e:
        raise ShardError(f"{directory}: {e.strerror or e}") from None
    if taken:  # a new set goes beside the old one, never over it (resharding rolls out gradually)
        raise ShardError(f"{directory} is not empty ({', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}): "
                         f"give a new directory for the shards")
    written = []
    for shard in result.shards:
        path = os.path.join(directory, f"{shard.index}.zone")
        data = shard.text().encode("ascii")
        try:
            with open(path, "xb") as f:
                f.write(data)
        except OSError as e:
            raise ShardError(f"{path}: {e.strerror or e}") from None
        written.append((path, len(data), len(shard.records)))
    return written
