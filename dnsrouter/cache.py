"""The packet cache's rules (issue 27): what is cached, under which key, for
how long, and what a client gets back; ``PacketCache``, what the Python
packet path uses, and the reference the compiled one (workers/_fastpath.pyx)
is tested against.

The router sits in front of authoritative servers, so a cached reply goes
out with the TTLs the backend gave (no aging, as dnsdist's ``dontAge``): the
entry simply stops being served when its lifetime is over. Everything here
works on the bytes, as the rest of the packet path does (see wire.py): a
lifetime is computed for every reply inserted, a random-subdomain flood's
included, so it must not cost a dnspython parse.

* ``key``: what in a query can change the reply. The name lower-cased (the
  reply carries the client's own spelling back, so that 0x20 resolvers
  accept it), type, class, RD, CD and AD, EDNS presence, version, flags (DO
  among them) and options in their order, except the COOKIE option
  (RFC 7873), which is the client's alone. Not the ID, and not the UDP size:
  a cached reply is served only if it fits.
* ``lifetime``: how long a backend reply may be served (RFC 2308 for the
  negative ones), or None.
* ``answer``: the cached reply for one client: its ID, its question bytes,
  its own client cookie, or None when it does not fit its UDP size.
* ``storable``: the reply as the cache keeps it, without COOKIE options.
* ``Cache``: the entries, bounded in number and bytes, evicted by CLOCK.
* ``PacketCache``: all of it for one worker, with the purges of every worker
  (dnsrouter/purges.py).
"""
from __future__ import annotations

import struct
import threading
import time
from array import array

from . import wire
from .ecs import NO_EDNS_PAYLOAD, TYPE_SIG, TYPE_TSIG
from .errors import WireError
from .purges import PurgeLog

OPTION_COOKIE = 10  # EDNS option code of DNS Cookies (RFC 7873, section 4)
CLIENT_COOKIE = 8  # bytes of a client cookie; a server cookie adds 8 to 32 (RFC 7873, section 4)

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_OPTION = struct.Struct("!HH")  # code, length
_OPT_FIXED = struct.Struct("!HHIH")  # type, class (the buffer size), ttl (extended rcode, version, flags), rdlength
_NOERROR, _NXDOMAIN = 0, 3
_TCP_PAYLOAD = 65535  # what a TCP client can take
MAX_KEY = 512  # a longer key (a query with many options) is not cached: the compiled path keeps keys in fixed room
_TTL_MAX = 0x7FFFFFFF  # RFC 2181 section 8: a TTL with the top bit set is taken as 0

# The key's flag byte: RD from the third header byte, AD and CD from the
# fourth. AD in a query asks for AD in the reply (RFC 6840 section 5.7).
_RD, _AD_CD = 0x01, 0x30


class _Edns:
    """The OPT record of a query, read once for ``key`` and ``answer``."""

    __slots__ = ("payload", "head", "options", "cookie")

    def __init__(self, payload: int, head: bytes, options: bytes, cookie: bytes | None) -> None:
        self.payload = payload  # what the client can take over UDP (at least 512)
        self.head = head  # extended rcode, version, flags: the OPT's "TTL" as sent
        self.options = options  # every option but COOKIE, as sent, in order
        self.cookie = cookie  # the client cookie (8 bytes), or None


_NO_EDNS = _Edns(NO_EDNS_PAYLOAD, b"", b"", None)


def _query_edns(query: bytes, end: int) -> _Edns | None:
    """The EDNS of a cacheable query whose question ends at ``end``; None for
    one that must not be cached.

    Cacheable: a plain query (QR clear, opcode QUERY) with one question,
    nothing in the answer and authority sections, and nothing in the
    additional section but one OPT record, which ends the message. A TSIG
    (or anything else there) signs or changes the reply for this client
    alone; a malformed cookie is the backend's to answer FORMERR.
    """
    if len(query) < 12 or query[2] & 0xF8 or query[4:10] != b"\x00\x01\x00\x00\x00\x00" or query[10]:
        return None  # QR, opcode, QDCOUNT 1, no answer or authority records, ARCOUNT < 256
    if query[11] == 0:
        return _NO_EDNS if end == len(query) else None
    if query[11] != 1 or end + 11 > len(query) or query[end] != 0:
        return None  # the one additional record must be an OPT owned by the root
    rtype, payload, ttl, rdlength = _OPT_FIXED.unpack_from(query, end + 1)
    pos = end + 11
    if rtype != wire.TYPE_OPT or pos + rdlength != len(query):
        return None
    options = []
    cookie = None
    while pos < len(query):
        if pos + 4 > len(query):
            return None
        code, length = _OPTION.unpack_from(query, pos)
        data_end = pos + 4 + length
        if data_end > len(query):
            return None
        if code == OPTION_COOKIE:
            if cookie is not None or not (length == CLIENT_COOKIE or 16 <= length <= 40):
                return None
            cookie = query[pos + 4:pos + 4 + CLIENT_COOKIE]
        else:
            options.append(query[pos:data_end])
        pos = data_end
    return _Edns(max(payload, NO_EDNS_PAYLOAD), _U32.pack(ttl), b"".join(options), cookie)


def key(query: bytes, end: int) -> bytes | None:
    """The cache key of a query whose question ends at ``end`` (as
    ``wire.check_query`` returns it), or None when it must not be cached.

    Two queries have the same key exactly when the backend is asked the same
    thing: the name lower-cased, type, class, RD, AD, CD, the EDNS presence,
    version and flags (DO and any the future defines), and its options but
    COOKIE, in order. The name comes first, as wire format, for ``purge``.
    """
    edns = _query_edns(query, end) if 17 <= end <= len(query) else None
    return None if edns is None else _key(query, end, edns)


def _key(query: bytes, end: int, edns: _Edns) -> bytes | None:
    """``key``, with the query's EDNS read already."""
    qtype = query[end - 4] << 8 | query[end - 3]
    if qtype == wire.TYPE_AXFR or qtype == wire.TYPE_IXFR:
        return None
    flags = bytes(((query[2] & _RD) << 7 | query[3] & _AD_CD,))
    result = query[12:end - 4].lower() + query[end - 4:end] + flags
    if edns is not _NO_EDNS:  # the marker byte keeps "no EDNS" apart from every EDNS key
        result += b"\x01" + edns.head + edns.options
    # Without EDNS too: an ``end`` that is no question's end may make a key
    # of any length, and the compiled path's room for one is MAX_KEY.
    return result if len(result) <= MAX_KEY else None


def lifetime(reply: bytes, max_ttl: float, max_negative_ttl: float) -> float | None:
    """How long a backend reply may be served, in seconds, or None when it
    must not be cached.

    Cached: a reply (QR set, opcode QUERY, one question) with rcode NOERROR
    or NXDOMAIN, extended rcode 0 (a BADVERS has 0 in the header), not
    truncated, without TSIG or SIG(0), that parses to its last byte. A
    positive one lives for the least TTL of its records (the OPT's "TTL" is
    flags), capped by ``max_ttl``. A negative one (NXDOMAIN, or NOERROR
    without answer records: NODATA) lives min(SOA TTL, SOA MINIMUM) of the
    SOA in its authority section (RFC 2308 section 5), capped by
    ``max_negative_ttl``; without an SOA (a referral, say) it is not cached.
    Any other record's lower TTL bounds a negative reply too: the CNAME in
    front of an NXDOMAIN expires with it. A lifetime of 0 is None.
    """
    try:
        return _lifetime(reply, max_ttl, max_negative_ttl)
    except (WireError, struct.error, IndexError):
        return None


def _lifetime(reply: bytes, max_ttl: float, max_negative_ttl: float) -> float | None:
    size = len(reply)
    if size < 12 or reply[2] & 0xFA != 0x80:  # QR set; opcode QUERY; TC clear (AA and RD may be either)
        return None
    rcode = reply[3] & 0xF
    if rcode != _NOERROR and rcode != _NXDOMAIN:
        return None
    _, _, qd, an, ns, ar = wire.HEADER.unpack_from(reply)
    if qd != 1:
        return None
    pos = wire.parse_question(reply)[3]
    least = soa = _TTL_MAX
    has_soa = has_opt = False
    authority, additional = an, an + ns
    rr_fixed = wire.RR_FIXED
    for index in range(an + ns + ar):
        owner = pos
        pos = wire.skip_name(reply, pos)
        rtype, _, ttl, rdlength = rr_fixed.unpack_from(reply, pos)
        start = pos + 10
        pos = start + rdlength
        if pos > size:
            return None
        if rtype == wire.TYPE_OPT:
            if index < additional or has_opt or reply[owner] != 0 or ttl >> 24:
                return None  # misplaced, second, not the root's, or an extended rcode
            has_opt = True
            continue
        if rtype == TYPE_TSIG or (rtype == TYPE_SIG and index >= additional):
            return None  # signed for one client
        if ttl > _TTL_MAX:
            ttl = 0
        if ttl < least:
            least = ttl
        if rtype == wire.TYPE_SOA and authority <= index < additional:
            # MNAME, RNAME, then SERIAL, REFRESH, RETRY, EXPIRE, MINIMUM.
            if wire.skip_name(reply, wire.skip_name(reply, start)) + 20 != pos:
                return None
            soa = min(soa, ttl, _U32.unpack_from(reply, pos - 4)[0])
            has_soa = True
    if pos != size:
        return None
    if rcode == _NXDOMAIN or an == 0:
        if not has_soa:
            return None
        value = min(least, soa, max_negative_ttl)
    else:
        value = min(least, max_ttl)
    return float(value) if value > 0 else None


def answer(cached: bytes, query: bytes, end: int, tcp: bool = False) -> bytes | None:
    """The cached reply for this client, or None when it must not have it.

    The query's ID; the question's bytes as the client spelled them (0x20:
    the key is the same, so only the case differs, and every compression
    pointer still points where it did); in the OPT record, every COOKIE
    option taken out (it holds another client's cookie and a server cookie
    meant for it) and, if the backend answered with one (it does cookies)
    and the client sent one, the client's own client cookie put back, last:
    a backend without cookies never sends one, so neither does its cache.
    ``cached`` is a backend's reply or what ``storable`` made of one. None when the result is longer than the client's
    UDP size (its EDNS buffer, at least 512; 512 without EDNS; 65535 over
    ``tcp``), when the
    query is not cacheable, or when ``cached`` is not a reply to this
    question.
    """
    edns = _query_edns(query, end)
    return None if edns is None else _answer(cached, query, end, tcp, edns)


def _answer(cached: bytes, query: bytes, end: int, tcp: bool, edns: _Edns) -> bytes | None:
    """``answer``, with the query's EDNS read already."""
    try:
        qend = wire.parse_question(cached)[3]
        if qend != end or cached[12:end].lower() != query[12:end].lower():
            return None
        opt = wire.find_opt(cached, qend)
        if opt is not None and cached[opt[0]] != 0:
            return None  # an OPT not owned by the root: lifetime() does not cache one
    except (WireError, struct.error, IndexError):
        return None
    body = cached[end:]
    if opt is not None and opt[1] - opt[0] > 11:
        stripped = _without_cookies(cached, opt[0] + 11, opt[1])
        if stripped is None:
            return None
        options, had_cookie = stripped
        if had_cookie and edns.cookie is not None:
            options += _OPTION.pack(OPTION_COOKIE, CLIENT_COOKIE) + edns.cookie
            if len(options) > 0xFFFF:
                return None  # no OPT can hold it (and no message either)
        start, stop = opt[0] - end, opt[1] - end
        body = body[:start + 9] + _U16.pack(len(options)) + options + body[stop:]
    result = query[:2] + cached[2:12] + query[12:end] + body
    if len(result) > (_TCP_PAYLOAD if tcp else edns.payload):
        return None
    return result


# What ``storable`` leaves where the backend's COOKIE options were: a COOKIE
# of no bytes (never valid on the wire, so never a real one), last in the
# OPT: the backend does cookies, and ``answer`` gives the client its own.
COOKIE_MARK = _OPTION.pack(OPTION_COOKIE, 0)


def storable(reply: bytes) -> bytes | None:
    """The reply as the cache keeps it: its OPT without the backend's COOKIE
    options (a server cookie is for the client it was made for), with
    ``COOKIE_MARK`` last instead if it had any. None if it does not parse.
    ``answer`` gives the same for it as for the reply."""
    try:
        opt = wire.find_opt(reply)
    except (WireError, struct.error, IndexError):
        return None
    if opt is None or opt[1] - opt[0] == 11:
        return reply
    stripped = _without_cookies(reply, opt[0] + 11, opt[1])
    if stripped is None:
        return None
    options, had_cookie = stripped
    if not had_cookie:
        return reply
    options += COOKIE_MARK
    return reply[:opt[0] + 9] + _U16.pack(len(options)) + options + reply[opt[1]:]


def _without_cookies(packet: bytes, pos: int, end: int) -> tuple[bytes, bool] | None:
    """The options between ``pos`` and ``end`` but COOKIE, and whether there
    was a COOKIE; None if they do not parse."""
    kept = []
    had_cookie = False
    while pos < end:
        if pos + 4 > end:
            return None
        code, length = _OPTION.unpack_from(packet, pos)
        stop = pos + 4 + length
        if stop > end:
            return None
        if code != OPTION_COOKIE:
            kept.append(packet[pos:stop])
        else:
            had_cookie = True
        pos = stop
    return b"".join(kept), had_cookie


def key_name(cache_key: bytes) -> bytes:
    """The name (wire format, lower-cased) a key begins with."""
    pos = 0
    while cache_key[pos]:
        pos += cache_key[pos] + 1
    return cache_key[:pos + 1]


def _at_or_below(name: bytes, zone: bytes) -> bool:
    """Whether the wire name ``name`` is ``zone`` or below it, label by label."""
    pos = 0
    cut = len(name) - len(zone)
    while pos < cut:
        pos += name[pos] + 1
    return pos == cut and name[pos:] == zone


# Bytes an entry costs beyond its key and reply: the dict slot and the
# slot's places in the parallel arrays (measured by test_cache's
# test_bytes_per_entry with tracemalloc, and checked there to stay close).
ENTRY_OVERHEAD = 160


class Cache:
    """Cached replies by key, bounded by ``size`` entries and ``max_bytes``.

    Eviction is CLOCK (second chance): every entry has a slot in a ring and
    a reference bit, which a hit sets; to make room, the hand sweeps the
    ring, clears the bits it finds set and evicts the first entry whose bit
    was already clear (or that has expired). LRU would evict much the same
    entries, but it relinks its list on every hit, and hits are what the
    cache is for; CLOCK's hit is one byte stored, and its state is flat
    arrays of slots that the compiled path can hold the same way. A
    random-subdomain flood's entries, never hit, go first.

    The bytes counted are the keys', the replies' and ``ENTRY_OVERHEAD``
    per entry (``overhead``: the compiled cache's, for the tests that hold
    it to this one). Not thread-safe, and without locks by design: each worker
    thread has its own Cache.
    """

    def __init__(self, size: int, max_bytes: int, overhead: int = ENTRY_OVERHEAD) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.overhead = overhead
        self._slots: dict[bytes, int] = {}
        # Per slot, parallel: the key (None: free), the reply, when it
        # expires, and the reference bit. They grow to ``size`` as needed.
        self._keys: list[bytes | None] = []
        self._replies: list[bytes] = []
        self._expires = array("d")
        self._referenced = bytearray()
        self._free: list[int] = []
        self._hand = 0
        self.bytes = 0
        self.expired = 0  # entries found expired by get
        self.evictions = 0  # entries evicted to make room
        self.purges: dict[str, int] = {}  # purge operations by cause
        self.purged: dict[str, int] = {}  # entries purged, by cause

    @property
    def entries(self) -> int:
        return len(self._slots)

    def get(self, cache_key: bytes, now: float) -> bytes | None:
        """The reply cached under ``cache_key`` if it is still alive at ``now``."""
        slot = self._slots.get(cache_key)
        if slot is not None:
            if now < self._expires[slot]:
                self._referenced[slot] = 1
                return self._replies[slot]
            self._remove(slot)
            self.expired += 1
        return None

    def put(self, cache_key: bytes, reply: bytes, now: float, lifetime: float) -> bool:
        """Cache ``reply`` under ``cache_key`` until ``now + lifetime``, in
        place of what was there; False when it cannot fit at all."""
        cost = len(cache_key) + len(reply) + self.overhead
        old = self._slots.get(cache_key)
        if old is not None:
            self._remove(old)
        if self.size <= 0 or cost > self.max_bytes:
            return False
        while len(self._slots) >= self.size or self.bytes + cost > self.max_bytes:
            self._evict(now)
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = cache_key
            self._replies[slot] = reply
            self._expires[slot] = now + lifetime
            self._referenced[slot] = 0
        else:
            slot = len(self._keys)
            self._keys.append(cache_key)
            self._replies.append(reply)
            self._expires.append(now + lifetime)
            self._referenced.append(0)
        self._slots[cache_key] = slot
        self.bytes += cost
        return True

    def purge(self, name: bytes, subtree: bool, cause: str = "purge") -> int:
        """Remove the entries for ``name`` (wire format, lower-cased), or at
        or below it with ``subtree``; how many went. A scan of every entry:
        purges are rare (a NOTIFY, an operator), hits are not."""
        removed = 0
        for cache_key, slot in list(self._slots.items()):
            owner = key_name(cache_key)
            if owner == name or (subtree and _at_or_below(owner, name)):
                self._remove(slot)
                removed += 1
        self._count_purge(cause, removed)
        return removed

    def purge_all(self, cause: str = "routes") -> int:
        """Remove every entry (a route change); how many went."""
        removed = len(self._slots)
        self._slots.clear()
        self._keys.clear()
        self._replies.clear()
        self._expires = array("d")
        self._referenced.clear()
        self._free.clear()
        self._hand = 0
        self.bytes = 0
        self._count_purge(cause, removed)
        return removed

    def _count_purge(self, cause: str, removed: int) -> None:
        self.purges[cause] = self.purges.get(cause, 0) + 1
        self.purged[cause] = self.purged.get(cause, 0) + removed

    def _remove(self, slot: int) -> None:
        cache_key = self._keys[slot]
        assert cache_key is not None
        del self._slots[cache_key]
        self.bytes -= len(cache_key) + len(self._replies[slot]) + self.overhead
        self._keys[slot] = None
        self._replies[slot] = b""
        self._free.append(slot)

    def _evict(self, now: float) -> None:
        """Evict one entry: the first at or after the hand that has expired
        or whose reference bit is clear; bits set on the way are cleared."""
        keys, referenced, expires = self._keys, self._referenced, self._expires
        count = len(keys)
        while True:
            slot = self._hand
            self._hand = (slot + 1) % count
            if keys[slot] is None:
                continue
            if referenced[slot] and now < expires[slot]:
                referenced[slot] = 0
                continue
            self._remove(slot)
            self.evictions += 1
            return


class PacketCache:
    """The packet cache of one worker, shared by its threads: ``lookup``
    for a query, ``insert`` for a backend's reply to one, and the purges
    (``purge_all`` for a route change; NOTIFY and ``dnsrouterctl purge``
    through the shared ``purges`` log, which every lookup and insert reads
    first). The reference for the compiled ``_fastpath.PacketCache``, which
    has the same methods and gives the same answers (test_cache_compiled).

    A reply is cached only if its query was sent after the last purge: a
    reply that was on its way while the zone was purged may be the old zone's.
    """

    def __init__(self, size: int, max_bytes: int, max_ttl: float, max_negative_ttl: float,
                 purges: PurgeLog | None = None, overhead: int = ENTRY_OVERHEAD) -> None:
        self._cache = Cache(size, max_bytes, overhead)
        self._lock = threading.Lock()  # the worker's threads share it; the compiled one has the GIL
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._purges = purges
        self._seen = purges.seq if purges is not None else 0
        self.purged_at = float("-inf")  # replies to queries sent before this are not cached
        self.hits = 0
        self.misses = 0  # a reply that does not fit the client counts here too

    def lookup(self, query: bytes, end: int, tcp: bool, now: float) -> bytes | None:
        """The cached answer to ``query`` (its question ends at ``end``), or
        None: forward it. A query that cannot be cached counts as nothing."""
        edns = _query_edns(query, end) if 17 <= end <= len(query) else None  # read once, for key and answer
        if edns is None:
            return None
        cache_key = _key(query, end, edns)
        if cache_key is None:
            return None
        with self._lock:
            self._sync()
            cached = self._cache.get(cache_key, now)
            result = None if cached is None else _answer(cached, query, end, tcp, edns)
            if result is None:
                self.misses += 1
            else:
                self.hits += 1
            return result

    def insert(self, query: bytes, end: int, reply: bytes, now: float, sent: float) -> bool:
        """Cache ``reply``, a backend's answer to ``query`` sent at ``sent``,
        if it may be; whether it was."""
        cache_key = key(query, end)
        if cache_key is None:
            return False
        life = lifetime(reply, self.max_ttl, self.max_negative_ttl)
        if life is None:
            return False
        stored = storable(reply)
        if stored is None:
            return False
        with self._lock:
            self._sync()
            if sent < self.purged_at:
                return False
            return self._cache.put(cache_key, stored, now, life)

    def purge_all(self, cause: str) -> int:
        """Forget everything (a route change, in this worker only); how many went."""
        with self._lock:
            self.purged_at = time.monotonic()
            return self._cache.purge_all(cause)

    def _sync(self) -> None:
        """Apply the purges written since the last look (the lock held)."""
        purges = self._purges
        if purges is None or purges.seq == self._seen:
            return
        self._seen, new = purges.since(self._seen)
        if new is None:
            self.purged_at = time.monotonic()
            self._cache.purge_all("behind")
            return
        for purge in new:
            self.purged_at = max(self.purged_at, purge.at)
            self._cache.purge(purge.name, purge.subtree, purge.cause)

    def snapshot(self) -> dict[tuple[str, object], float]:
        """Totals since the start, keyed as counts are (Stats.add)."""
        cache = self._cache
        out: dict[tuple[str, object], float] = {
            ("cache_lookups", "hit"): self.hits, ("cache_lookups", "miss"): self.misses,
            ("cache_evictions", "room"): cache.evictions, ("cache_evictions", "expired"): cache.expired}
        for cause, n in cache.purges.items():
            out["cache_purges", cause] = n
        for cause, n in cache.purged.items():
            out["cache_purged", cause] = n
        return {k: v for k, v in out.items() if v}

    # Last: in the class body the name ``bytes`` is this property from here on.
    @property
    def entries(self) -> int:
        return self._cache.entries

    @property
    def bytes(self) -> int:
        return self._cache.bytes
