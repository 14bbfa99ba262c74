"""The compiled packet cache (workers/_fastpath.pyx) against its reference,
dnsrouter/cache.py: the same keys, lifetimes, stored forms and answers, byte
for byte, on the messages test_cache draws and on mutated ones; the same
results, entries, bytes, evictions and counters for any sequence of lookups,
inserts and purges; and the compiled loop answering a hit itself."""
from __future__ import annotations

import ctypes
import functools
import socket
import time

import dns.edns
import dns.message
import dns.name
import dns.rrset
import pytest
from hypothesis import event, given, settings, strategies as st

from dnsrouter import cache, purges
from dnsrouter.address import parse_address
from dnsrouter.config import defaults
from dnsrouter.routes import Matcher, Route
from dnsrouter.workers import fastpath
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from support.compiled_loop import serving
from support.fake_backend import FakeBackend
from test_cache import FAST, _client, _cookies, _end, _mutate, _mutations, _rrset, _wire, queries, replies


def _compiled():
    module, why = fastpath.load()
    assert module is not None, f"the compiled path is not built: {why}"  # CI builds it: a failure, never a skip
    return module


@pytest.fixture(scope="module")
def compiled():
    return _compiled()


def _ends(packet: bytes, shift: int) -> int:
    """Where the question ends, moved by ``shift``; a packet without one gets a drawn end."""
    try:
        return _end(packet) + shift
    except Exception:
        return 17 + shift


# -- the rules ------------------------------------------------------------------------


@FAST
@given(queries(), _mutations, st.sampled_from([0] * 6 + [-1, 1, -20, 11]))
def test_the_key_is_the_references(compiled, query, mutations, shift):
    packet, kinds = _mutate(_wire(query), mutations)
    end = _ends(packet, shift)
    want = cache.key(packet, end)
    event(f"cacheable: {want is not None}" + (f", mutated: {'+'.join(kinds)}" if kinds else ""))
    assert compiled.cache_key(packet, end) == want


def test_a_key_past_its_room_is_refused_with_or_without_edns(compiled):
    long = b"\x3f" + b"a" * 63
    question = long * 9 + b"\x00\x00\x01\x00\x01"  # no question: key() takes the end it is given
    plain = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question
    assert len(plain) - 11 > cache.MAX_KEY
    assert cache.key(plain, len(plain)) is None and compiled.cache_key(plain, len(plain)) is None
    fits = plain[:12] + long * 3 + b"\x00\x00\x01\x00\x01"
    assert cache.key(fits, len(fits)) == compiled.cache_key(fits, len(fits)) is not None


@FAST
@given(replies(), _mutations, st.sampled_from([3600, 60, 0, 0.5]), st.sampled_from([300, 5, 0]))
def test_the_lifetime_is_the_references(compiled, reply, mutations, max_ttl, max_negative_ttl):
    packet, kinds = _mutate(_wire(reply), mutations)
    want = cache.lifetime(packet, max_ttl, max_negative_ttl)
    event(f"cached: {want is not None}" + (f", mutated: {'+'.join(kinds)}" if kinds else ""))
    assert compiled.cache_lifetime(packet, max_ttl, max_negative_ttl) == want


@FAST
@given(replies(), _mutations)
def test_the_stored_form_is_the_references(compiled, reply, mutations):
    packet, kinds = _mutate(_wire(reply), mutations)
    want = cache.storable(packet)
    event("does not parse" if want is None else "as it came" if want == packet else "cookies taken out")
    assert compiled.cache_storable(packet) == want


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_the_answer_is_the_references(compiled, data):
    """A backend's reply (cacheable or not), stored, answered to another
    client (its ID, spelling, cookie, buffer size, UDP or TCP), either of
    them mutated now and then."""
    backend_query = data.draw(queries())
    reply = _wire(data.draw(replies(backend_query)))
    stored = cache.storable(reply)
    if stored is None or data.draw(st.integers(0, 4)) == 0:
        stored, _ = _mutate(reply, data.draw(_mutations))
    client = _client(backend_query, data.draw(st.integers(0, 0xFFFF)), data.draw(st.lists(st.booleans())),
                     data.draw(_cookies), data.draw(st.sampled_from([512, 1232, 4096, 100])))
    if data.draw(st.integers(0, 4)) == 0:
        client, _ = _mutate(client, data.draw(_mutations))
    end = _ends(client, data.draw(st.sampled_from([0] * 8 + [-1, 1])))
    tcp = data.draw(st.booleans())
    want = cache.answer(stored, client, end, tcp)
    if want is not None:
        event("answered")
    elif cache.key(client, end) is None:
        event("not cacheable")
    elif cache.answer(stored, client, end, True) is not None:
        event("does not fit")
    else:
        event("not a reply to it")
    assert compiled.cache_answer(stored, client, end, tcp) == want


_headers = st.sampled_from([b"\x00\x01\x81\x80\x00\x01\x00\x01\x00\x01\x00\x01",  # a reply, a record in each section
                            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01",  # a query with one additional
                            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00", b""])


@FAST
@given(_headers, st.binary(max_size=80), _headers, st.binary(max_size=80), st.integers(0, 100), st.booleans())
def test_random_bytes_get_what_the_reference_gives(compiled, head, tail, query_head, query_tail, end, tcp):
    """Bytes no server would send, read as a reply and as a query: every
    length the compiled rules read is checked (scripts/asan.sh runs this
    against the ASan build)."""
    packet, query = head + tail, query_head + query_tail
    assert compiled.cache_key(query, end) == cache.key(query, end)
    assert compiled.cache_lifetime(packet, 3600, 300) == cache.lifetime(packet, 3600, 300)
    assert compiled.cache_storable(packet) == cache.storable(packet)
    assert compiled.cache_answer(packet, query, end, tcp) == cache.answer(packet, query, end, tcp)


# -- PacketCache: the same results for the same operations -------------------------------

_NAMES = ["example.com.", "www.example.com.", "a.b.example.com.", "WWW.Example.COM.", "other.org.", "x.other.org."]
_ZONES = [dns.name.from_text(n).canonicalize().to_wire() for n in ("example.com.", "www.example.com.",
                                                                      "other.org.", "b.example.com.", ".")]


@functools.cache
def _pair(name: str, rdtype: str, edns: bool, size: int, ttl: int) -> tuple[bytes, bytes]:
    """A query and a backend's reply to it: ``size`` TXT bytes more or less, an SOA for a negative one."""
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    reply = dns.message.make_response(query)
    if size:
        text = " ".join(f'"{"x" * 100}"' for _ in range(size // 100)) or '"x"'
        reply.answer.append(dns.rrset.from_text(query.question[0].name, ttl, "IN", "TXT", text))
    else:
        reply.authority.append(_rrset(dns.name.from_text("example.com."), ttl, "SOA"))
    return _wire(query), _wire(reply)


# Few keys, so that lookups find what was inserted: the first names are
# drawn most (www.example.com. twice, in two spellings).
_KEYS = [(name, rdtype, edns) for name in _NAMES for rdtype in ("A", "TXT") for edns in (False, True)]
_key_indexes = st.one_of(st.integers(0, 3), st.integers(12, 13), st.integers(0, len(_KEYS) - 1))
_lookups = st.tuples(st.just("lookup"), _key_indexes, st.integers(0, 0xFFFF), st.booleans(),
                     st.sampled_from([512, 4096]))
_inserts = st.tuples(st.just("insert"), _key_indexes, st.sampled_from([0, 50, 300, 700]),
                     st.sampled_from([1, 1, 5, 100]), st.integers(0, 3).map(lambda n: n == 0))  # sent before purges?
_by_kind = {
    "lookup": _lookups, "insert": _inserts,
    "advance": st.tuples(st.just("advance"), st.sampled_from([0.5, 3, 20])),
    "purge": st.tuples(st.just("purge"), st.integers(0, len(_ZONES) - 1), st.booleans(),
                       st.sampled_from(["notify", "ctl"])),
    "purge_all": st.tuples(st.just("purge_all"), st.just("routes")),
    "overflow": st.tuples(st.just("overflow")),
}
# Weighted: mostly lookups and inserts, a purge now and then.
_operations = st.lists(st.sampled_from(["lookup"] * 6 + ["insert"] * 5 + ["advance"] * 2 + ["purge"] * 2
                                       + ["purge_all", "overflow"]).flatmap(_by_kind.__getitem__),
                       min_size=5, max_size=60)


def _ask(packet: bytes, qid: int, swap: bool, payload: int) -> bytes:
    """The query as another client asks it: its ID, its spelling, its buffer size."""
    message = dns.message.from_wire(packet)
    message.id = qid
    if swap:
        message.question[0].name = dns.name.from_text(message.question[0].name.to_text().swapcase())
    if message.edns >= 0:
        message.use_edns(0, message.ednsflags, payload, options=message.options)
    return _wire(message)


def _state(store) -> tuple:
    return store.entries, store.bytes, store.hits, store.misses, store.snapshot()


@FAST
@given(st.integers(0, 6), st.integers(300, 3000), _operations)
def test_the_compiled_cache_does_what_the_reference_does(compiled, size, max_bytes, operations):
    log = purges.PurgeLog()
    overhead = compiled.CACHE_ENTRY_OVERHEAD
    reference = cache.PacketCache(size, max_bytes, 60, 10, log, overhead=overhead)
    fast = compiled.PacketCache(size, max_bytes, 60, 10, log)
    # Far ahead of the clock the purges are stamped with: an insert sent at
    # ``now`` is after every purge, one sent 20,000 s before is before them.
    now = time.monotonic() + 10_000
    hits = refused = 0
    for operation in operations:
        kind = operation[0]
        if kind == "lookup":
            _, index, qid, swap, payload = operation
            query = _ask(_pair(*_KEYS[index], 0, 1)[0], qid, swap, payload)
            got = fast.lookup(query, _end(query), payload > 512, now)
            assert got == reference.lookup(query, _end(query), payload > 512, now)
            hits += got is not None
        elif kind == "insert":
            _, index, length, ttl, early = operation
            query, reply = _pair(*_KEYS[index], length, ttl)
            sent = now - 20_000 if early else now
            done = reference.insert(query, _end(query), reply, now, sent)
            assert fast.insert(query, _end(query), reply, now, sent) == done
            refused += early and not done and reference.purged_at > sent
        elif kind == "advance":
            now += operation[1]
        elif kind == "purge_all":
            assert fast.purge_all(operation[1]) == reference.purge_all(operation[1])
        elif kind == "purge":
            log.append(_ZONES[operation[1]], operation[2], operation[3])
        else:  # more than the log holds: the next look purges everything
            for _ in range(purges.CAPACITY + 1):
                log.append(b"\x03zzz\x00", False, "ctl")
        assert _state(fast) == _state(reference)
        assert fast.entries <= max(size, 0) and fast.bytes <= max_bytes
    snapshot = fast.snapshot()
    event(f"hits: {min(hits, 3)}")
    event(f"evictions: {min(snapshot.get(('cache_evictions', 'room'), 0), 3)}")
    event(f"expired: {min(snapshot.get(('cache_evictions', 'expired'), 0), 1)}")
    event(f"behind: {('cache_purges', 'behind') in snapshot}, notify: {('cache_purges', 'notify') in snapshot}")
    event(f"refused as older than a purge: {min(refused, 1)}")


def test_a_purge_frees_slots_in_the_order_the_entries_went_in(compiled):
    """The reference's purge walks its dict, in the order of the inserts,
    so its free list, and then which slot a new entry takes and which one
    the CLOCK hand evicts first, follow that order, not the slots'."""
    log = purges.PurgeLog()
    reference = cache.PacketCache(3, 1 << 20, 60, 10, log, overhead=compiled.CACHE_ENTRY_OVERHEAD)
    fast = compiled.PacketCache(3, 1 << 20, 60, 10, log)
    now = time.monotonic() + 10_000
    pairs = {name: _pair(name, "A", False, 50, 30) for name in ("a.z.example.", "b.z.example.", "c.other.",
                                                                 "d.other.", "e.other.", "f.other.")}

    def both(method: str, name: str) -> None:
        query, reply = pairs[name]
        args = (query, _end(query), reply, now, now) if method == "insert" else (query, _end(query), False, now)
        assert getattr(fast, method)(*args) == getattr(reference, method)(*args)

    for name in ("a.z.example.", "b.z.example.", "c.other.", "a.z.example."):  # a again: last in, first slot
        both("insert", name)
    log.append(dns.name.from_text("z.example.").to_wire(), True, "notify")
    for name in ("d.other.", "e.other.", "f.other."):  # f evicts whichever of d and e took the first slot
        both("insert", name)
    for name in ("d.other.", "e.other."):
        both("lookup", name)
    assert _state(fast) == _state(reference) and reference.snapshot()[("cache_evictions", "room")] == 1


class _Meanwhile(purges.PurgeLog):
    """A purge log whose next ``since`` first runs ``meanwhile``: what
    another thread may do while this one waits for the log's lock (the GIL
    let go)."""

    meanwhile = None

    def since(self, seen: int):
        work, self.meanwhile = self.meanwhile, None
        if work is not None:
            work()
        return super().since(seen)


def test_a_purge_applied_by_another_thread_meanwhile_is_not_applied_twice(compiled):
    """While one thread waits in ``since``, another applies the purge, puts
    the entry back and a second purge comes: the first thread applies the
    second purge only, and the entry put back stays."""
    log = _Meanwhile()
    store = compiled.PacketCache(10, 1 << 20, 60, 10, log)
    www, other = _pair("www.example.com.", "A", True, 50, 30), _pair("other.org.", "A", True, 50, 30)
    now = time.monotonic() + 10_000
    for query, reply in (www, other):
        assert store.insert(query, _end(query), reply, now, now)

    def other_thread() -> None:
        assert store.lookup(www[0], _end(www[0]), False, now) is None  # the first purge, applied here
        assert store.insert(www[0], _end(www[0]), www[1], now, now)
        log.append(dns.name.from_text("other.org.").to_wire(), False, "ctl")

    log.append(dns.name.from_text("www.example.com.").to_wire(), False, "notify")
    log.meanwhile = other_thread
    assert store.lookup(other[0], _end(other[0]), False, now) is None  # the second purge, applied here
    assert store.lookup(www[0], _end(www[0]), False, now) is not None  # not purged again
    snapshot = store.snapshot()
    assert (snapshot[("cache_purged", "notify")], snapshot[("cache_purged", "ctl")]) == (1, 1)
    assert store.entries == 1


def test_an_entry_costs_what_is_counted(compiled):
    """CACHE_ENTRY_OVERHEAD against malloc's own count of the bytes in use
    (mallinfo2: glibc's arenas and its mmap'd blocks), for 20,000 typical
    entries: a 22-byte name with EDNS, a 120-byte reply. Under ASan
    (scripts/asan.sh), whose malloc glibc does not see, its own count of
    the bytes asked for, without malloc's own 16 per block."""
    libc = ctypes.CDLL(None)
    sanitizer = getattr(libc, "__sanitizer_get_current_allocated_bytes", None)

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    libc.mallinfo2.restype = Mallinfo2
    if sanitizer is not None:
        sanitizer.restype = ctypes.c_size_t

    def in_use() -> int:
        if sanitizer is not None:
            return sanitizer()
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    count = 20000
    store = compiled.PacketCache(1 << 20, 1 << 30, 3600, 300)
    template, reply = _pair("host000000.example.com.", "A", True, 50, 300)
    queries_ = [template.replace(b"host000000", b"host%06d" % n) for n in range(count)]
    replies_ = [reply.replace(b"host000000", b"host%06d" % n) for n in range(count)]
    end = _end(queries_[0])
    key = cache.key(queries_[0], end)
    stored = cache.storable(replies_[0])
    assert key is not None and stored is not None and compiled.cache_lifetime(replies_[0], 3600, 300)
    before = in_use()
    for n in range(count):
        store.insert(queries_[n], end, replies_[n], 0, 0)
    measured = (in_use() - before) / count
    assert store.entries == count
    payload = len(key) + len(stored)
    counted = store.bytes / count
    print(f"\nbytes per entry: {measured:.0f} measured ({payload} key and reply, "
          f"{measured - payload:.0f} beyond, {compiled.CACHE_ENTRY_OVERHEAD} counted beyond)")
    assert counted == payload + compiled.CACHE_ENTRY_OVERHEAD
    assert abs(measured - counted) / counted < (0.1 if sanitizer is None else 0.2)


# -- the compiled loop ------------------------------------------------------------------


@pytest.mark.system  # a fake backend answers the forwarded query
def test_the_compiled_loop_answers_a_hit_itself(compiled):
    """A query forwarded and answered is cached by the reply loop
    (Replies.take); asked again, with another ID and another spelling, the
    compiled loop answers it from the slot it came in, the backend silent."""
    forwarder = Forwarder(defaults(forward_timeout=1.0, cache_size=100), Stats(), fast=compiled)
    store = forwarder.cache
    assert isinstance(store, compiled.PacketCache)
    with FakeBackend("ok") as backend, serving(forwarder) as listening, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        forwarder.matcher = Matcher([Route(r"\.test\.$", (parse_address(backend.addr),))])
        client.settimeout(3)
        first = dns.message.make_query("www.cached.test.", "A", use_edns=0,
                                       options=[dns.edns.GenericOption(cache.OPTION_COOKIE, b"AAAAAAAA")])
        client.sendto(first.to_wire(), listening.getsockname())
        answered = client.recv(65535)
        assert dns.message.from_wire(answered).answer and store.entries == 1  # inserted as it was relayed
        backend.mode = "drop"
        again = dns.message.make_query("WwW.cAcHeD.TEST.", "A", use_edns=0,
                                       options=[dns.edns.GenericOption(cache.OPTION_COOKIE, b"BBBBBBBB")])
        again.id = (first.id + 1) & 0xFFFF
        packet = again.to_wire()
        client.sendto(packet, listening.getsockname())
        hit = client.recv(65535)
        end = _end(packet)
        assert hit[:2] == packet[:2] and hit[12:end] == packet[12:end]  # its ID, its spelling
        assert hit[2:12] == answered[2:12]
        stored = cache.storable(answered)
        assert stored is not None and hit == cache.answer(stored, packet, end)
        assert backend.count("udp") == 1
        assert (store.hits, store.misses) == (1, 1)
        delta = forwarder.stats.delta()
        assert delta["queries", "udp"] == 2 and delta["responses", 0] == 2
        assert delta["cache_lookups", "hit"] == delta["cache_lookups", "miss"] == 1
        assert not [k for k in delta if k[0] == "fast_path_handoffs"]

