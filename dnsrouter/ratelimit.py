"""Rate limits every worker shares: per-network query limits and response
rate limiting (issue 28). The reference; the compiled path's twins are in
workers/_fastpath.pyx (``QueryLimit``, ``ResponseLimit``).

A limit must hold for the router, not per worker: the kernel spreads one
network's datagrams over the workers' sockets by source port, so a limit
kept per worker would let a network with many ports through N times, and
one kept at 1/N per worker would cut a client with one port to 1/N. So the
accounts live in one table in memory the supervisor maps before it spawns
the workers (a memfd they inherit, as the purge log is), and every worker
charges the same account.

Each account is the generic cell rate algorithm (GCRA, RFC 2697's token
bucket in one number): the theoretical arrival time ``tat``, in nanoseconds
of CLOCK_MONOTONIC, which every process of the host shares. A charge at
``now`` of an account with rate r (``interval`` = 1/r) and ``burst`` b is
allowed when ``max(tat, now) + interval - now <= b * interval``; then ``tat``
moves on by one interval. An account whose ``tat`` is past is exactly a new
one, so forgetting it loses nothing: that is what bounds the memory. The
table has a fixed number of slots (``[limits] table_size``), in buckets of
four; a new account takes a slot of its bucket that is empty or past, else
the one closest to being past (it loses what it was owed: the least).

The query limit charges allowed queries only: a network asking 5,000 a
second at a limit of 2,000 gets 2,000 answered. Response rate limiting
charges limited responses too, up to ``window`` seconds ahead, as BIND's
RRL debits its balance down to -window x rate: a network that keeps asking
above the rate stays limited until it has slowed down for the window.

Slots are 16 bytes: the account's 64-bit key hash (0: empty) and its
``tat``. The compiled path updates them with compare-and-swap, this one
under the ``shared.SharedMap``'s lock; both hash keys with ``hash64`` and
the table's seed, drawn when it is made, so that nobody outside can aim
names at one bucket.
"""
from __future__ import annotations

import ipaddress
import os
import struct
import time
from typing import Any, Callable, Sequence

from . import acl, wire
from .errors import WireError
from .settings import IPNetwork
from .shared import SharedMap

WAYS = 4  # slots per bucket: one 64-byte cache line
_SLOT = struct.Struct("=Qq")  # key hash, tat (ns)
_HEAD = struct.Struct("=QQ")  # seed, buckets
# Where the buckets start: a cache line in, so that each bucket is one line (two workers
# charging one account move one line between their CPUs, not two).
HEAD = 64
_MASK = (1 << 64) - 1
_M1, _M2, _M3 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

# What an RRL account is for: the third byte of its key.
RESPONSES, NXDOMAINS, ERRORS = 0, 1, 2
KINDS = ("responses", "nxdomains", "errors")
ACTIONS = ("dropped", "slipped")


def hash64(seed: int, data: bytes) -> int:
    """A 64-bit hash of ``data`` under ``seed``, never 0 (0 marks an empty
    slot). 8 bytes at a time, little-endian, zero-padded: the compiled
    ``_hash64`` computes the same."""
    h = (seed ^ (len(data) * _M1)) & _MASK
    for at in range(0, len(data), 8):
        h = ((h ^ int.from_bytes(data[at:at + 8], "little")) * _M2) & _MASK
        h ^= h >> 31
    h = (h * _M3) & _MASK
    h ^= h >> 32
    return h or 1


def network(addr: bytes, ipv4_prefix: int, ipv6_prefix: int) -> bytes | None:
    """A client's network from its raw ``struct sockaddr``: 4 or 6, then the
    address with the bits past the prefix cleared (IPv6 prefixes are at most
    64 bits, so 8 bytes). None for another family."""
    family = int.from_bytes(addr[:2], "little")
    if family == 2 and len(addr) >= 8:
        bits = int.from_bytes(addr[4:8], "big") & (_MASK << (32 - ipv4_prefix)) & 0xFFFFFFFF
        return b"\x04" + bits.to_bytes(4, "big")
    if family == 10 and len(addr) >= 24:
        bits = int.from_bytes(addr[8:16], "big") & (_MASK << (64 - ipv6_prefix)) & _MASK
        return b"\x06" + bits.to_bytes(8, "big")
    return None


class RateTable:
    """The accounts of one kind of limit. Picklable for multiprocessing's
    spawn (it rides in WorkerSpec)."""

    def __init__(self, slots: int, fd: int | None = None, seed: int | None = None) -> None:
        """A new table of at least ``slots`` slots (``seed``: random, but
        for tests), or (``fd``) the table another process made."""
        if fd is None:
            buckets = 1 << max(0, (max(slots, WAYS) // WAYS - 1).bit_length())
            self._shared = SharedMap("dnsrouter-rates", HEAD + buckets * WAYS * _SLOT.size)
            seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
            _HEAD.pack_into(self._shared.map, 0, seed, buckets)
        else:
            self._shared = SharedMap("dnsrouter-rates", fd=fd)
        self.seed, self.buckets = _HEAD.unpack_from(self._shared.map, 0)
        self.size = self._shared.size
        self._map, self._memory = self._shared.map, self._shared.memory
        self._locked = self._shared.locked
        self.address = self._shared.address  # for the compiled twins

    def __reduce__(self) -> tuple[Any, ...]:
        return _attach, (self._shared.inherited(),)

    @property
    def slots(self) -> int:
        return self.buckets * WAYS

    def charge(self, key: bytes, now: int, interval: int, burst: int, window: int = 0) -> bool:
        """Whether the account ``key`` may have one more at ``now`` (ns).
        ``window`` 0: only what is allowed is charged; else every charge is,
        up to ``window`` ns ahead of now."""
        h = hash64(self.seed, key)
        first = HEAD + (h & (self.buckets - 1)) * WAYS * _SLOT.size
        memory = self._map
        if not window:
            # A refusal changes nothing, and tat only grows: decided without the
            # lock (two system calls), which a flood of refused queries would pay each.
            at, tat = self._find(memory, first, h)
            if max(tat, now) + interval - now > burst * interval:
                return False
        with self._locked():
            at, tat = self._find(memory, first, h)
            tat = max(tat, now)
            allowed = tat + interval - now <= burst * interval
            if allowed or window:
                tat = min(tat + interval, now + window) if window else tat + interval
                _SLOT.pack_into(memory, at, h, tat)
            return allowed

    @staticmethod
    def _find(memory: Any, first: int, h: int) -> tuple[int, int]:
        """The slot of account ``h`` in its bucket and its ``tat``; a new
        account takes the slot whose ``tat`` is the least (an empty one's is
        0, a settled one's behind any live one's), with ``tat`` 0: new."""
        victim, least = -1, 0
        for way in range(WAYS):
            at = first + way * _SLOT.size
            key, tat = _SLOT.unpack_from(memory, at)
            if key == h:
                return at, tat
            if victim < 0 or tat < least:
                victim, least = at, tat
        return victim, 0

    def refuses(self, key: bytes, now: int, interval: int, burst: int) -> tuple[int, int] | None:
        """Where account ``key`` is (its slot, its key hash) if a charge at
        ``now`` would be refused (window 0): what ``QueryLimit`` remembers
        of a flooding sender, to decide its next ones from the slot alone."""
        h = hash64(self.seed, key)
        first = HEAD + (h & (self.buckets - 1)) * WAYS * _SLOT.size
        at, tat = self._find(self._map, first, h)
        return (at, h) if tat and max(tat, now) + interval - now > burst * interval else None

    def refused(self, at: int, h: int, now: int, interval: int, burst: int) -> bool:
        """Whether the account at slot ``at`` is still ``h``'s and refuses a
        charge at ``now``: ``charge``'s decision for a refusal, exactly (tat
        only grows while the slot is the account's), without the key."""
        key, tat = _SLOT.unpack_from(self._map, at)
        return key == h and max(tat, now) + interval - now > burst * interval

    def tracked(self, now: int | None = None) -> int:
        """Accounts that matter now: those whose ``tat`` is still ahead."""
        now = time.monotonic_ns() if now is None else now
        view = memoryview(self._map)[HEAD:self.size].cast("q")
        return sum(1 for tat in view[1::2] if tat > now)


def _attach(fd: Any) -> RateTable:
    return RateTable(0, fd.detach())


def exempt_test(networks: Sequence[IPNetwork]) -> Callable[[bytes], bool] | None:
    """``exempt`` as a test of a raw client address (None: nobody is):
    ``acl.make``'s, of the packed host (an IPv4-mapped IPv6 address is
    IPv6), which the compiled ``Networks`` gives too."""
    test = acl.make(networks, ipaddress.ip_address)
    if test is None:
        return None
    return lambda addr: test(addr[8:24] if int.from_bytes(addr[:2], "little") == 10 and len(addr) >= 24
                             else addr[4:8])


class QueryLimit:
    """``[limits]``: queries a second per client network, over UDP."""

    def __init__(self, table: RateTable, qps: int, burst: int, ipv4_prefix: int, ipv6_prefix: int,
                 exempt: Sequence[IPNetwork]) -> None:
        self.table = table
        self.interval = 1_000_000_000 // qps
        self.burst = burst or qps
        self.prefixes = ipv4_prefix, ipv6_prefix
        self.exempt = exempt_test(exempt)
        # The Python path's shortcut for a flood: raw address -> (slot, key hash) of the
        # account that refused it (RateTable.refused decides its next queries exactly).
        self._flooding: dict[bytes, tuple[int, int]] = {}

    def allow(self, addr: bytes, now: int) -> bool:
        """Whether a query from raw address ``addr`` at ``now`` (ns) goes on."""
        known = self._flooding.get(addr)
        if known is not None and self.table.refused(*known, now, self.interval, self.burst):
            return False  # a sender over its limit again: its slot read, no network, hash or lock
        net = network(addr, *self.prefixes)
        if net is None or (self.exempt is not None and self.exempt(addr)):
            return True
        if self.table.charge(net, now, self.interval, self.burst):
            return True
        where = self.table.refuses(net, now, self.interval, self.burst)
        if where is not None:
            if len(self._flooding) >= 65536:
                self._flooding.clear()  # bounded: a spoofed flood has millions of sources
            self._flooding[addr] = where
        return False


class ResponseLimit:
    """``[rrl]``: BIND's response rate limiting, over UDP. An account is a
    client network and what it is answered: a name and type for answers
    (NOERROR, NODATA too), the zone (the owner of the reply's SOA, else the
    name) for NXDOMAIN, all errors together. A limited response is dropped,
    or every ``slip``-th one (counted per worker) goes out as a truncated
    reply with no records, which a real client takes as a cue to ask over
    TCP, and a spoofed victim gets no more bytes than the query had."""

    def __init__(self, table: RateTable, rates: tuple[int, int, int], slip: int, window: int, ipv4_prefix: int,
                 ipv6_prefix: int, exempt: Sequence[IPNetwork]) -> None:
        self.table = table
        self.intervals = tuple(1_000_000_000 // rate if rate else 0 for rate in rates)  # 0: not limited
        self.rates = rates
        self.slip = slip
        self.window = window * 1_000_000_000
        self.prefixes = ipv4_prefix, ipv6_prefix
        self.exempt = exempt_test(exempt)
        self.limited = 0  # limited responses in this worker, for the slip

    def check(self, reply: bytes, addr: bytes, now: int) -> tuple[bytes | None, int]:
        """What goes to ``addr`` for ``reply`` at ``now`` (ns): the reply,
        its truncated form or None, and the account kind it was limited
        under (-1: not limited)."""
        net = network(addr, *self.prefixes)
        if net is None or len(reply) < 12 or (self.exempt is not None and self.exempt(addr)):
            return reply, -1
        kind, detail = account(reply)
        interval = self.intervals[kind]
        if not interval or self.table.charge(net + bytes((kind,)) + detail, now, interval, self.rates[kind],
                                             self.window):
            return reply, -1
        self.limited += 1
        if self.slip and self.limited % self.slip == 0:
            return truncated(reply), kind
        return None, kind


def account(reply: bytes) -> tuple[int, bytes]:
    """What an RRL account of ``reply`` is for: its kind and the name (and
    type and class) that tells accounts of the kind apart."""
    rcode = reply[3] & 0xF
    if rcode not in (0, 3):
        return ERRORS, b""
    try:
        qname, qtype, qclass, end = wire.parse_question(reply)
    except WireError:
        return ERRORS, b""
    if reply[4] or reply[5] != 1:
        return ERRORS, b""
    if rcode == 0:
        return RESPONSES, qname.lower() + struct.pack("!HH", qtype, qclass)
    return NXDOMAINS, (soa_owner(reply, end) or qname).lower()


def soa_owner(reply: bytes, end: int) -> bytes | None:
    """The owner of the first SOA in the authority section (the zone), in
    wire format without compression; None if there is none or it does not
    parse."""
    try:
        an, ns = reply[6] << 8 | reply[7], reply[8] << 8 | reply[9]
        pos = end
        for index in range(an + ns):
            owner = pos
            pos = wire.skip_name(reply, pos)
            if pos + 10 > len(reply):
                return None
            rtype, _, _, rdlength = wire.RR_FIXED.unpack_from(reply, pos)
            if index >= an and rtype == wire.TYPE_SOA:
                return read_name(reply, owner)
            pos += 10 + rdlength
    except (WireError, IndexError):
        return None
    return None


def read_name(packet: bytes, pos: int) -> bytes | None:
    """The name at ``pos``, compression pointers followed (at most 127 of
    them, so a loop ends), in wire format; None if it does not parse."""
    out = bytearray()
    for _ in range(128):
        if pos >= len(packet):
            return None
        length = packet[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(packet):
                return None
            pos = (length & 0x3F) << 8 | packet[pos + 1]
            continue
        if length > 63:
            return None
        if length == 0:
            out.append(0)
            return bytes(out) if len(out) <= 255 else None
        if pos + 1 + length > len(packet):
            return None
        out += packet[pos:pos + 1 + length]
        pos += 1 + length
    return None


def truncated(reply: bytes) -> bytes:
    """The slip: the reply's header with TC set and no records, and its
    question if it has one that parses."""
    try:
        _, _, _, end = wire.parse_question(reply)
        question = reply[12:end] if reply[4] == 0 and reply[5] == 1 else b""
    except WireError:
        question = b""
    return reply[:2] + bytes((reply[2] | 0x02, reply[3], 0, 1 if question else 0)) + b"\x00" * 6 + question
