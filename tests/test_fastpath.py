"""The compiled UDP path (workers/_fastpath.pyx) against the Python reference:
it takes exactly the queries the Python path would forward as they are, keyed
as the Python path keys them, and is optional to build."""
from __future__ import annotations

import socket
import struct
import sys
import threading

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsrouter import wire
from dnsrouter.errors import WireError
from dnsrouter.address import parse_address
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.routes import Matcher, Pool, Route
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from dnsrouter.workers.upstream import Upstream, serve_together
from dnsrouter.workers import fastpath, mmsg, udp
from support.fake_backend import FakeBackend
from support.net import wait_until


@pytest.fixture(scope="module")
def compiled():
    module, why = fastpath.load()
    assert module is not None, f"the compiled path is not built: {why}"  # CI builds it: a failure, never a skip
    return module


def reference(packet: bytes):
    """What the Python path decides for the same bytes: (end of the question,
    lower-cased question) for a query it forwards as it came, else None."""
    if len(packet) < 12 or packet[2] & 0xF8 or struct.unpack_from("!H", packet, 4)[0] != 1:
        return None  # a response, an opcode other than QUERY, QDCOUNT other than 1
    try:
        qname, qtype, _, end = wire.parse_question(packet)
    except WireError:
        return None
    if qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return None
    return end, packet[12:end - 4].lower() + packet[end - 4:end]  # forwarder: the name lower-cased, not the type


labels = st.binary(min_size=1, max_size=70)  # past 63: what a label may not be
names = st.lists(labels, max_size=8).map(lambda ls: b"".join(bytes([len(x) & 0xFF]) + x for x in ls) + b"\0")


@st.composite
def queries(draw) -> bytes:
    """Header fields and a question near the edges the checks guard."""
    header = struct.pack("!HBBHHHH", draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 255)),
                         draw(st.integers(0, 255)), draw(st.sampled_from([0, 1, 1, 1, 2, 0x100, 0x101])),
                         *draw(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2))))
    qtype = draw(st.sampled_from([1, 28, 65, 97, 251, 252, 255, 0x4142, 0xFFFF]))
    tail = struct.pack("!HH", qtype, draw(st.sampled_from([1, 3, 255, 0x4141])))
    packet = header + draw(names) + tail + draw(st.binary(max_size=20))
    return packet[:draw(st.integers(0, len(packet)))] if draw(st.booleans()) else packet


@settings(max_examples=3000, deadline=None)
@given(st.one_of(queries(), st.binary(max_size=300)))
def test_classify_takes_what_the_python_path_forwards_as_it_came(compiled, packet):
    assert compiled.classify(packet) == reference(packet)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("abcXYZ019-_\\. ", min_size=1, max_size=20), min_size=1, max_size=5),
       st.sampled_from(["A", "AAAA", "TXT", "ANY", "HTTPS", "DS"]))
def test_a_name_in_any_case_gets_the_lower_cased_key(compiled, parts, rdtype):
    try:
        name = dns.name.from_text(".".join(parts).strip(".") or "x")
    except dns.exception.DNSException:  # an empty or too long label or name: not a query dnspython makes
        return
    packet = dns.message.make_query(name, rdtype, use_edns=0).to_wire()
    end, key = compiled.classify(packet)
    assert end == len(packet) - 11  # the EDNS OPT record (11 bytes) follows the question
    assert key[:-4] == name.to_wire().lower() and key[-4:] == packet[end - 4:end]


def test_the_longest_name_is_taken_and_one_byte_more_is_not(compiled):
    def query(name: bytes) -> bytes:
        return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"
    longest = b"\x3f" + b"a" * 63 + b"\x3f" + b"B" * 63 + b"\x3f" + b"c" * 63 + b"\x3d" + b"D" * 61 + b"\x00"
    assert len(longest) == 255
    assert compiled.classify(query(longest)) == (12 + 255 + 4, longest.lower() + b"\x00\x01\x00\x01")
    assert compiled.classify(query(b"\x01X\x00")[:-4] + b"\x00\x41\x00\x43")[1] == b"\x01x\x00\x00\x41\x00\x43"
    too_long = b"\x3f" + b"a" * 63 + b"\x3f" + b"B" * 63 + b"\x3f" + b"c" * 63 + b"\x3e" + b"D" * 62 + b"\x00"
    assert len(too_long) == 256 and compiled.classify(query(too_long)) is None
    assert compiled.classify(query(b"\xc0\x0c")) is None  # a pointer in a question: there is nothing to point to


# Patterns that overlap, anchored and not, over names of the alphabet below.
route_patterns = st.sampled_from([r"^a", r"b\.$", r"\.c\.", r"^[ab]+\.", r"x", r"^\\", r".", r"^\.$", r"A"])
wire_labels = st.binary(min_size=1, max_size=5).map(lambda b: bytes(b"ab.x\\\"(c@$ \x00\xff"[c % 13] for c in b))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(route_patterns, st.booleans()), max_size=6),
       st.lists(st.tuples(st.lists(wire_labels, max_size=4), st.sampled_from([1, 28])), min_size=1, max_size=8))
def test_a_question_not_cached_gets_the_pool_the_python_matcher_picks(compiled, table, queried):
    """On a miss (random subdomains) the compiled path makes the text and
    reads the RE2 set itself: the same pool, in the same order of
    registration, usable backends only; asked again, the cached question."""
    up, down = parse_address("127.0.0.1:53"), parse_address("127.0.0.1:54")
    routes = [Route(pattern, (up if usable else down,)) for pattern, usable in dict(table).items()]
    python, fast = Matcher(routes, down=[down]), Matcher(routes, down=[down])
    cache, held = compiled.RouteCache(), {}
    for labels, qtype in queried + queried:  # twice: the second time from the cache
        name = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
        question = name + qtype.to_bytes(2, "big") + b"\0\1"
        want = python.lookup_wire(name, wire.name_to_text)
        got_question, got = cache.lookup(fast, question)
        assert got_question == question
        assert (fast.pools.index(got) if got else None) == (python.pools.index(want) if want else None)
        assert held.setdefault(question, got_question) is got_question  # one object per question: a hit
    for bad in (b"\x05ab\0\0\1\0\1", b"\x01a\0\0\1\0", b"\0\1\0\1", b"\x01a\x01b\0\1\0\1"):
        with pytest.raises(ValueError):  # a label longer than the name, no type and class: never read past it
            cache.lookup(fast, bad)


def test_the_route_cache_holds_one_matcher_and_stays_right_past_its_room(compiled):
    """A new table (or new health) empties the cache, and a flood of names
    more than it holds replaces entries without a wrong pool."""
    a, b = parse_address("127.0.0.1:53"), parse_address("127.0.0.1:54")
    routes = [Route(r"\.one\.$", (a,)), Route(r"^x", (b,))]
    up, one_down = Matcher(routes), Matcher(routes, down=[a])
    cache = compiled.RouteCache()
    question = b"\x01x\x03one\0\0\1\0\1"
    first, pool = cache.lookup(up, question)
    assert pool is up.pools[0] and cache.lookup(up, question)[0] is first
    again, pool = cache.lookup(one_down, question)
    assert pool is one_down.pools[1] and again is not first  # looked up anew in the new table
    for i in range(100_000):  # six times the room
        label = b"%s%d" % (b"y" if i % 2 else b"x", i)
        question = bytes([len(label)]) + label + b"\x03one\0\0\1\0\1"
        _, pool = cache.lookup(one_down, question)
        assert pool is (None if i % 2 else one_down.pools[1])  # .one. is down: x.. goes to ^x, y.. nowhere


def test_an_outbox_past_its_room_sends_on_its_own(compiled):
    receiver, sender = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    with receiver, sender:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(2)
        sender.bind(("127.0.0.1", 0))
        raw = mmsg.raw_address(parse_address("127.0.0.1:%d" % receiver.getsockname()[1]))
        outbox = compiled.Outbox()
        payloads = [b"%d" % i for i in range(600)]  # more than its 256 slots, twice over
        for p in payloads:
            outbox.add(sender.fileno(), p, raw)
        outbox.flush()
        assert [receiver.recv(100) for _ in payloads] == payloads
        with pytest.raises(ValueError):
            outbox.add(sender.fileno(), b"x", bytes(29))  # longer than any socket address


def test_one_thread_relays_the_replies_of_each_upstream_socket_until_each_is_closed(compiled):
    """upstream.serve_together, the compiled reply loop of a family's sockets:
    a reply goes back with the client's ID (rewritten in the slot it came in),
    whichever socket it came on; a closed socket is closed by that thread and
    the others go on; the thread ends when the last one is closed."""
    forwarder = Forwarder(2.0, Stats(), fast=compiled)
    upstreams = [Upstream(socket.AF_INET, forwarder, forwarder.stats.for_thread(), fast=compiled,
                          counters=forwarder.stats.add(compiled.Counters(len(LATENCY_BUCKETS))))
                 for _ in range(3)]
    thread = threading.Thread(target=serve_together, args=(upstreams,), daemon=True)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(2)

    class Client:  # where the loop sends the relayed reply from
        fd = client.fileno()

    raw = mmsg.raw_address(parse_address("127.0.0.1:%d" % client.getsockname()[1]))
    with FakeBackend("ok") as backend, client:
        address = parse_address(backend.addr)
        pool = Pool(Route(r"\.test\.$", (address,)), (address,))

        def ask(names: list[str], through: list[Upstream]) -> set:
            asked = set()
            for name, upstream in zip(names, through):
                query = dns.message.make_query(name, "A")
                data = query.to_wire()
                assert upstream.send(compiled.Pending(Client(), raw, data, data[12:], pool, address, False, False))
                asked.add((query.id, query.question[0].name))
            replies = [dns.message.from_wire(client.recv(512)) for _ in names]
            return asked ^ {(r.id, r.question[0].name) for r in replies}  # nothing but what was asked

        thread.start()
        try:
            assert ask([f"q{i}.test." for i in range(6)], upstreams * 2) == set()
            upstreams[0].close()
            wait_until(lambda: upstreams[0].sock.fileno() == -1, 2, message="the closed socket stayed open")
            assert ask(["after1.test.", "after2.test."], upstreams[1:]) == set()
        finally:
            for upstream in upstreams:
                upstream.close()
            thread.join(2)
        assert not thread.is_alive()
        assert [u.sock.fileno() for u in upstreams] == [-1] * 3
        assert forwarder.stats.delta()["responses", 0] == 8


def test_the_udp_thread_serves_the_upstreams_it_adopted_and_hands_them_on_when_its_socket_shuts(compiled):
    """On the compiled path the first udp thread serves the IPv4 upstream
    sockets too (Forwarder.start(adopted=True)). A shut-down listening socket
    ends the thread at once (the drain waits for it), and the replies to the
    queries still in flight are relayed all the same."""
    forwarder = Forwarder(2.0, Stats(), fast=compiled)
    forwarder.start(adopted=True)
    listening = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listening.bind(("127.0.0.1", 0))
    stopping = threading.Event()
    with FakeBackend("delay", delay=1.0) as backend, listening, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        address = parse_address(backend.addr)
        forwarder.matcher = Matcher([Route(r"\.test\.$", (address,))])
        thread = threading.Thread(target=udp.serve, args=(listening, forwarder, forwarder.stats.for_thread(), stopping),
                                  daemon=True)
        thread.start()
        upstreams = forwarder.upstreams[socket.AF_INET]
        try:
            assert forwarder.adopt() == []  # the thread took them
            query = dns.message.make_query("slow.test.", "A")
            client.sendto(query.to_wire(), listening.getsockname())
            wait_until(lambda: backend.count("udp") == 1, 2, message="the query was not forwarded")
            stopping.set()
            with pytest.raises(OSError):  # ENOTCONN for a UDP socket, which is shut down all the same
                listening.shutdown(socket.SHUT_RD)
            thread.join(0.8)  # before the backend answers
            assert not thread.is_alive()
            client.settimeout(2)
            reply = dns.message.from_wire(client.recv(512))  # relayed by the thread they were handed to
            assert (reply.id, reply.question[0].name) == (query.id, query.question[0].name)
        finally:
            for upstream in upstreams:
                upstream.close()
            wait_until(lambda: all(u.sock.fileno() == -1 for u in upstreams), 2,
                       message="the upstream sockets were not closed")


def test_the_reporter_sums_counters_kept_elsewhere_with_the_threads_counts(compiled):
    class Reader:  # what a compiled Counters gives: totals since the start
        totals = {("queries", "udp"): 5.0}

        def snapshot(self):
            return dict(self.totals)

    stats = Stats()
    stats.for_thread()["queries", "udp"] += 2
    reader = Reader()
    assert stats.add(reader) is reader
    assert stats.add(compiled.Counters(len(LATENCY_BUCKETS))).snapshot() == {}  # nothing counted yet
    assert stats.delta() == {("queries", "udp"): 7}
    reader.totals = {("queries", "udp"): 8.0, ("responses", 0): 1.0}
    assert stats.delta() == {("queries", "udp"): 3, ("responses", 0): 1}
    with pytest.raises(ValueError):
        compiled.Counters(40)  # more latency buckets than it has room for


def test_the_compiled_pending_entry_has_every_field_of_the_python_one(compiled):
    from dnsrouter.workers.upstream import Pending

    args = (object(), b"peer", b"query", b"question", object(), parse_address("127.0.0.1:53"), True, False)
    python, fast = Pending(*args), compiled.Pending(*args)
    assert {f: getattr(fast, f) for f in Pending.__slots__} == {f: getattr(python, f) for f in Pending.__slots__}
    fast.variants, fast.retry_uid, fast.sent = {}, 7, 1.5  # what the Python path sets on the entries it makes
    assert (fast.variants, fast.retry_uid, fast.sent) == ({}, 7, 1.5)


def test_without_the_build_the_python_path_runs_and_says_why(monkeypatch):
    assert fastpath.load("off") == (None, "off: [server] fast_path = off")
    monkeypatch.setitem(sys.modules, "dnsrouter.workers._fastpath", None)  # what a failed import looks like
    module, why = fastpath.load("auto")
    assert module is None and why.startswith("off: not built (") and "_fastpath" in why
