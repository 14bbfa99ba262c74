"""Which shard holds which records: the one set of rules behind
``dnsrouterctl shard`` (a zone file, once) and ``dnsrouter-feed`` (a zone
that changes, on disk).

A shard answers for a range, in DNSSEC canonical order, of the labels
directly below the apex: a whole subtree (empty non-terminals, the names
below them, a delegation with its NS, DS and glue) stays together, so every
answer and every proof of non-existence for a name comes from one server,
and one regexp per shard routes each possible name there
(``label_ranges``). Every shard also holds what any query may need:

- the apex's records (SOA, NS, DNSKEY, NSEC3PARAM, CDS/CDNSKEY, and their
  NSEC and RRSIGs), and a wildcard directly below the apex, which answers
  for names of every range (``is_common``);
- NSEC3 zones: the whole chain, since hashes do not follow the names;
- NSEC zones: the NSEC that covers the first name of the shard's range
  (the span entering it from below), and the NSEC that proves no wildcard
  at the apex exists (names whose closest encloser is the apex can fall in
  any range); the rest of the chain follows the names (``nsec_proofs``);
- the addresses of in-zone name server targets held by another shard, so
  that every shard loads in servers that check them (BIND) and refers with
  glue (``needs_addresses``).
"""
from __future__ import annotations

import bisect
from typing import Callable, Iterable, Iterator, Sequence

import dns.name
import dns.rdatatype

from . import label_ranges

ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
NSEC_TYPES = (dns.rdatatype.NSEC,)


class ShardError(Exception):
    """The zone or the request cannot be sharded (a message for the operator)."""


def canonical_key(name: dns.name.Name) -> bytes:
    """Bytes that sort as ``name`` does in DNSSEC canonical order (RFC 4034, 6.1).

    Labels from the root down, lower-cased, each ended by an octet 0; octets
    0 and 1 inside a label are written 1 1 and 1 2, so an ending always sorts
    before any octet and a label sorts before the labels it is a prefix of.
    """
    out = bytearray()
    for label in reversed(name.labels[:-1] if name.is_absolute() else name.labels):
        out += label.lower().replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
        out.append(0)
    return bytes(out)


def with_signatures(rdtype: int, covers: int, types: Sequence[int]) -> bool:
    """Whether an RRset of ``rdtype`` (covering ``covers``) is one of ``types`` or signs one."""
    return rdtype in types or (rdtype == dns.rdatatype.RRSIG and covers in types)


def record_bytes(owner: int, rdatas: Sequence[int]) -> int:
    """Bytes of an RRset in wire format, uncompressed: what shards are balanced by.
    ``owner``: the owner name's length; ``rdatas``: each record's data's."""
    return sum(owner + 10 + rdata for rdata in rdatas)


def is_common(origin: dns.name.Name, name: dns.name.Name, rdtype: int, covers: int) -> bool:
    """Whether every shard holds this RRset: the apex's, a wildcard right below
    the apex, and the NSEC3 chain."""
    return (name == origin or (len(name) == len(origin) + 1 and name.labels[0] == b"*")
            or with_signatures(rdtype, covers, (dns.rdatatype.NSEC3,)))


def top_label(origin: dns.name.Name, name: dns.name.Name) -> bytes:
    """The lower-cased label of ``name`` directly below ``origin`` (a name below it)."""
    return name.labels[len(name) - len(origin) - 1].lower()


class ShardMap:
    """Shards 0..N-1 of ``origin``: shard k holds the names whose label below
    the apex is in [lows[k], lows[k+1]) (lows[0] is None: from the start)."""

    def __init__(self, origin: dns.name.Name, lows: Sequence[bytes]) -> None:
        """``lows``: the first label of each shard after the first, increasing."""
        if list(lows) != sorted(set(lows)):
            raise ShardError("shard bounds must increase")
        self.origin = origin
        self.lows: tuple[bytes, ...] = tuple(lows)
        self.count = len(lows) + 1

    def home(self, name: dns.name.Name) -> int | None:
        """The shard whose range holds ``name`` (None for the apex: every shard)."""
        if name == self.origin:
            return None
        return bisect.bisect_right(self.lows, top_label(self.origin, name))

    def holds(self, shard: int, name: dns.name.Name, rdtype: int, covers: int) -> bool:
        """Whether ``shard`` holds the RRset by the rules of names (not the
        NSEC proofs and addresses it holds besides, which depend on the zone)."""
        return is_common(self.origin, name, rdtype, covers) or self.home(name) == shard

    def first_name(self, shard: int) -> dns.name.Name | None:
        """``<low>.<apex>``: the first name in canonical order of the range (None for shard 0)."""
        return dns.name.Name((self.lows[shard - 1],) + self.origin.labels) if shard else None

    def key_range(self, shard: int) -> tuple[bytes, bytes | None]:
        """[low, high) of the canonical keys of the names the shard's range holds."""
        low = self.first_name(shard)
        high = self.first_name(shard + 1) if shard + 1 < self.count else None
        return (canonical_key(low) if low else canonical_key(self.origin) + b"\x00",
                canonical_key(high) if high else None)

    def pattern(self, shard: int) -> str:
        """The RE2 pattern that routes exactly the names of the shard (the apex to shard 0)."""
        low = self.lows[shard - 1] if shard else None
        high = self.lows[shard] if shard + 1 < self.count else None
        return label_ranges.pattern(self.origin, low, high, apex=shard == 0)


def balance(labels: Iterable[tuple[bytes, int]], count: int, total: int, shards: int) -> list[bytes]:
    """The first label of each shard after the first, for shards as near as
    the subtrees allow to an equal share of ``total`` bytes.

    ``labels``: the ``count`` labels below the apex in canonical order, each
    with the bytes of its subtree; read once, so a zone on disk streams
    through (a million labels need not be in memory).
    """
    if shards < 1:
        raise ShardError("the number of shards must be at least 1")
    if shards > max(count, 1):
        raise ShardError(f"{count} names directly below the apex (with what is below them): "
                         f"at most {max(count, 1)} shards")
    lows: list[bytes] = []
    start = 0  # the index where the last shard chosen starts
    before = 0  # bytes of the subtrees before index i
    before_previous = 0  # ... before index i-1
    labels_before = [b"", b""]  # labels i-2 and i-1
    for i, (label, size) in enumerate(_counted(labels, count)):
        # Shard k may start at i when that leaves a label for each shard
        # before and after it; it starts where the bytes before are nearest
        # its share (the first of two as near): at i or i-1, once i reaches
        # the share, or at the last index it may.
        while len(lows) + 1 < shards:
            k = len(lows) + 1
            target = total * k / shards
            if i < start + 1 or (before < target and i < count - (shards - k)):
                break
            if i - 1 >= start + 1 and abs(before_previous - target) <= abs(before - target):
                lows.append(_shortest(labels_before[0], labels_before[1]))
                start = i - 1
            else:
                lows.append(_shortest(labels_before[1], label))
                start = i
        labels_before = [labels_before[1], label]
        before_previous, before = before, before + size
    return lows


def _counted(labels: Iterable[tuple[bytes, int]], count: int) -> Iterator[tuple[bytes, int]]:
    seen = 0
    for item in labels:
        seen += 1
        yield item
    if seen != count:
        raise ShardError(f"{seen} labels below the apex, not {count}")


def _shortest(before: bytes, first: bytes) -> bytes:
    """The shortest prefix of ``first`` that sorts after ``before``: any such
    label splits the two the same, and a short one keeps the pattern short."""
    return next(first[:i] for i in range(1, len(first) + 1) if first[:i] > before)


def nsec_proofs(shards: ShardMap, covering: Callable[[dns.name.Name], dns.name.Name | None],
                exists: Callable[[dns.name.Name], bool]) -> dict[int, set[dns.name.Name]]:
    """For each shard, the NSEC owners (besides its own names) whose NSEC it holds.

    ``covering(name)``: the last NSEC owner not after ``name`` (None if none);
    ``exists(name)``: whether the zone has records at ``name``.
    """
    proofs: dict[int, set[dns.name.Name]] = {k: set() for k in range(shards.count)}
    wildcard = dns.name.Name((b"*",) + shards.origin.labels)
    # No wildcard at the apex: the NSEC covering "*.<apex>" proves it, for
    # names of every range whose closest encloser is the apex.
    no_wildcard = None if exists(wildcard) else covering(wildcard)
    for k in range(shards.count):
        if no_wildcard is not None:
            proofs[k].add(no_wildcard)
        first = shards.first_name(k)
        if first is not None:  # the NSEC before the range's first name spans into it from below
            entering = covering(first)
            if entering is not None:
                proofs[k].add(entering)
    return proofs


def needs_addresses(shards: ShardMap, shard: int, target: dns.name.Name) -> bool:
    """Whether ``shard``, holding an NS record that names ``target``, must hold
    ``target``'s addresses although its range does not."""
    return target.is_subdomain(shards.origin) and shards.home(target) not in (shard, None)
