"""Split a zone into shards, DNSSEC included (``dnsrouterctl shard``).

A shard answers for a range, in DNSSEC canonical order, of the labels
directly below the apex: a whole subtree (empty non-terminals, the names
below them, a delegation with its NS, DS and glue) stays together, so every
answer and every proof of non-existence for a name comes from one server,
and one regexp per shard routes each possible name there
(``label_ranges``). Every shard also holds what any query may need:

- the apex's records (SOA, NS, DNSKEY, NSEC3PARAM, CDS/CDNSKEY, and their
  NSEC and RRSIGs); queries for the apex itself go to shard 0;
- a wildcard directly below the apex, which answers for names of every range;
- NSEC zones: the NSEC that covers the first names of the shard's range
  (the span entering it from below), and the NSEC that proves no wildcard
  at the apex exists (names whose closest encloser is the apex can fall in
  any range); the rest of the chain follows the names;
- NSEC3 zones: the whole chain, since hashes do not follow the names;
- the addresses of in-zone name server targets, so that every shard loads in
  servers that check them (BIND) and refers with glue.

Shards are balanced by the bytes of their records.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.rdataset
import dns.rdatatype
import dns.zone

from . import label_ranges

_APEX_FIRST = (dns.rdatatype.SOA, dns.rdatatype.NS)
_ADDRESSES = (dns.rdatatype.A, dns.rdatatype.AAAA)


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


class ShardError(Exception):
    """The zone or the request cannot be sharded (a message for the operator)."""


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
    return sum(len(r.to_text(name)) + 1 for r in rdatasets)


def _is_nsec3(rdataset: dns.rdataset.Rdataset) -> bool:
    return dns.rdatatype.NSEC3 in (rdataset.rdtype, rdataset.covers)


def _with_signatures(rdatasets: list[dns.rdataset.Rdataset], types: tuple[int, ...]) -> list[dns.rdataset.Rdataset]:
    return [r for r in rdatasets if r.rdtype in types or (r.rdtype == dns.rdatatype.RRSIG and r.covers in types)]


def _boundaries(sizes: list[int], shards: int) -> list[int]:
    """Where each shard after the first starts, in a list of subtree sizes:
    as near as the subtrees allow to an equal share of bytes."""
    total = sum(sizes)
    before = [0]
    for size in sizes:
        before.append(before[-1] + size)
    starts: list[int] = []
    for k in range(1, shards):
        lowest = (starts[-1] if starts else 0) + 1
        highest = len(sizes) - (shards - k)
        target = total * k / shards
        starts.append(min(range(lowest, highest + 1), key=lambda i: abs(before[i] - target)))
    return starts


def split(zone: dns.zone.Zone, shards: int) -> Split:
    """Split ``zone`` (with absolute names) into ``shards`` shards."""
    origin = zone.origin
    assert origin is not None
    if shards < 1:
        raise ShardError("--shards must be at least 1")
    common: dict[dns.name.Name, list[dns.rdataset.Rdataset]] = {}
    subtrees: dict[bytes, dict[dns.name.Name, list[dns.rdataset.Rdataset]]] = {}
    nsec_owners: list[dns.name.Name] = []
    nsec3_bytes = 0
    wildcard = dns.name.Name((b"*",) + origin.labels)
    for name, node in zone.nodes.items():
        rdatasets = list(node.rdatasets)
        if any(r.rdtype == dns.rdatatype.NSEC for r in rdatasets):
            nsec_owners.append(name)
        chain = [r for r in rdatasets if _is_nsec3(r)]
        if chain:
            nsec3_bytes += _size(name, chain)
            common.setdefault(name, []).extend(chain)
            rdatasets = [r for r in rdatasets if not _is_nsec3(r)]
            if not rdatasets:
                continue
        if name == origin or name == wildcard:
            common.setdefault(name, []).extend(rdatasets)
            continue
        label = name.relativize(origin).labels[-1].lower()
        subtrees.setdefault(label, {})[name] = rdatasets
    labels = sorted(subtrees)  # lower-cased single labels: bytes order is canonical order
    if shards > max(len(labels), 1):
        raise ShardError(f"{origin}: {len(labels)} names directly below the apex (with what is below them): "
                         f"at most {max(len(labels), 1)} shards")
    starts = [0] + _boundaries([sum(_size(n, r) for n, r in subtrees[label].items()) for label in labels], shards)
    # Each bound is the shortest label after the last of the shard before and
    # not after the first of its own: any such label splits them the same.
    lows: list[bytes | None] = [None] + [_shortest(labels[i - 1], labels[i]) for i in starts[1:]]
    result = []
    for k in range(shards):
        high = lows[k + 1] if k + 1 < shards else None
        shard = Shard(k, lows[k], high, label_ranges.pattern(origin, lows[k], high, apex=k == 0))
        for name, rdatasets in common.items():
            shard.add(name, rdatasets)
        for label in labels[starts[k]:starts[k + 1] if k + 1 < shards else None]:
            for name, rdatasets in subtrees[label].items():
                shard.add(name, rdatasets)
        result.append(shard)
    nsec_owners.sort()
    _add_nsec_proofs(zone, result, nsec_owners, wildcard)
    _add_server_addresses(zone, result)
    signed = "NSEC3" if nsec3_bytes else "NSEC" if nsec_owners else "unsigned"
    return Split(origin, result, signed, nsec3_bytes)


def _shortest(before: bytes, first: bytes) -> bytes:
    """The shortest prefix of ``first`` that sorts after ``before``."""
    return next(first[:i] for i in range(1, len(first) + 1) if first[:i] > before)


def _covering(owners: list[dns.name.Name], name: dns.name.Name) -> dns.name.Name | None:
    """The NSEC owner whose span holds ``name`` (the last owner not after it)."""
    at = bisect.bisect_right(owners, name)
    return owners[at - 1] if at else None


def _add_nsec_proofs(zone: dns.zone.Zone, shards: list[Shard], owners: list[dns.name.Name],
                     wildcard: dns.name.Name) -> None:
    if not owners:
        return
    assert zone.origin is not None

    def nsec_of(owner: dns.name.Name) -> list[dns.rdataset.Rdataset]:
        return _with_signatures(list(zone.nodes[owner].rdatasets), (dns.rdatatype.NSEC,))

    # No wildcard at the apex: the NSEC covering "*.<apex>" proves it, for
    # names of every range whose closest encloser is the apex.
    no_wildcard = None if wildcard in zone.nodes else _covering(owners, wildcard)
    for shard in shards:
        if no_wildcard is not None:
            shard.add(no_wildcard, nsec_of(no_wildcard))
        if shard.low is not None:
            # The first name in canonical order of the range is "<low>.<apex>";
            # the NSEC before it spans into the range from below.
            entering = _covering(owners, dns.name.Name((shard.low,) + zone.origin.labels))
            if entering is not None:
                shard.add(entering, nsec_of(entering))


def _add_server_addresses(zone: dns.zone.Zone, shards: list[Shard]) -> None:
    assert zone.origin is not None
    for shard in shards:
        targets = {rdata.target for rdatasets in list(shard.records.values()) for r in rdatasets
                   if r.rdtype == dns.rdatatype.NS for rdata in r}
        for target in sorted(targets):
            node = zone.nodes.get(target)
            if node is not None and target not in shard.records:
                addresses = _with_signatures(list(node.rdatasets), _ADDRESSES)
                if addresses:
                    shard.add(target, addresses)


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
