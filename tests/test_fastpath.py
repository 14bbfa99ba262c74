"""The compiled UDP path (workers/_fastpath.pyx) against the Python path
itself: it takes exactly the queries the Python path forwards as they came,
keyed as the Python path keys them, and is optional to build."""
from __future__ import annotations

import ast
import functools
import inspect
import socket
import sys
import threading
from collections import defaultdict
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from dnsrouter import wire
from dnsrouter.errors import WireError
from dnsrouter.address import parse_address
from dnsrouter.config import defaults
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.routes import Matcher, Pool, Route
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from dnsrouter.workers.types import Counts
from dnsrouter.workers.upstream import Upstream, serve_together
from dnsrouter.workers import fastpath, mmsg, udp
from support.fake_backend import FakeBackend
from support.net import wait_until


@pytest.fixture(scope="module")
def compiled():
    module, why = fastpath.load()
    assert module is not None, f"the compiled path is not built: {why}"  # CI builds it: a failure, never a skip
    return module


class _Recorder(Forwarder):
    """The Python path itself, stopped where it would send: what it forwards
    (the entry's question, lower-cased as the reply is checked against it)
    and what it answers."""

    def __init__(self) -> None:
        super().__init__(defaults(forward_timeout=2.0), Stats())
        self.matcher = Matcher([Route("^", (parse_address("127.0.0.1:53"),))])  # every name has a route
        self.forwarded: list[bytes] = []
        self.answered: list[bytes] = []

    def _send(self, entry, counts, outbox=None) -> None:
        self.forwarded.append(entry.question)

    def send(self, data: bytes, addr: bytes | None, outbox=None) -> None:  # the client the answers go to
        self.answered.append(data)


@functools.cache
def _recorder() -> _Recorder:
    return _Recorder()


def python_path(packet: bytes) -> tuple[tuple[int, bytes] | None, str]:
    """What Forwarder.handle does with ``packet``: (end of the question,
    lower-cased question) when it forwards it as it came, else None; and
    what happened, in a few words."""
    forwarder = _recorder()
    forwarder.forwarded.clear()
    forwarder.answered.clear()
    counts: Counts = defaultdict(int)
    forwarder.handle(packet, b"peer", forwarder, counts)
    if forwarder.forwarded:
        question = forwarder.forwarded[0]
        return (12 + len(question), question), "forwarded"
    if forwarder.answered:
        return None, f"answered rcode {forwarder.answered[0][3] & 0xF}"
    return None, "dropped " + ",".join(str(label) for kind, label in counts if kind == "dropped")


labels = st.binary(min_size=1, max_size=63)


@st.composite
def valid_queries(draw) -> bytes:
    """A query dnspython makes: any name of up to 255 bytes, any type and class, EDNS or not."""
    parts = draw(st.lists(labels, max_size=6))
    try:
        name = dns.name.Name([*parts, b""])
    except dns.name.NameTooLong:
        assume(False)
    query = dns.message.make_query(name, draw(st.integers(1, 0xFFFF)), draw(st.sampled_from([1, 3, 255, 0x4141])),
                                   use_edns=draw(st.sampled_from([None, 0])))
    query.id = draw(st.integers(0, 0xFFFF))
    return query.to_wire()


def _set(packet: bytes, at: int, value: bytes) -> bytes:
    return packet[:at] + value + packet[at + len(value):]


def _qtype(packet: bytes, draw) -> bytes:
    try:
        end = wire.parse_question(packet)[3]
    except WireError:
        end = 0
    assume(end)  # a question to change the type of
    return _set(packet, end - 4, draw(st.sampled_from([b"\0\xfb", b"\0\xfc", b"\0\xff", b"\0\x41"])))


# Changes to a valid query, each near an edge the compiled checks guard.
MUTATIONS = {
    "flags": lambda p, draw: _set(p, 2, bytes([draw(st.integers(0, 255))])),  # QR, opcode, AA, TC, RD
    "qdcount": lambda p, draw: _set(p, 4, draw(st.sampled_from([b"\0\0", b"\0\2", b"\1\1", b"\1\0"]))),
    "truncated": lambda p, draw: p[:draw(st.integers(0, len(p) - 1))],
    "byte": lambda p, draw: _set(p, draw(st.integers(12, len(p) - 1)), bytes([draw(st.integers(0, 255))])),
    "first label": lambda p, draw: _set(p, 12, bytes([draw(st.sampled_from([63, 64, 0xC0, 0xFF]))])),
    "qtype": _qtype,  # AXFR, IXFR: the Python path answers them
    "upper case": lambda p, draw: p[:12] + p[12:].upper(),
    "tail": lambda p, draw: p + draw(st.binary(min_size=1, max_size=8)),
}


@settings(max_examples=3000, deadline=None)
@given(valid_queries(), st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2), st.data())
def test_classify_takes_exactly_what_the_python_path_forwards_as_it_came(compiled, packet, mutations, data):
    for mutation in mutations:
        assume(len(packet) > 12)
        packet = MUTATIONS[mutation](packet, data.draw)
        event(f"mutated: {mutation}")
    want, outcome = python_path(packet)
    event(outcome)
    assert compiled.classify(packet) == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("abcXYZ019-_\\. ", min_size=1, max_size=20), min_size=1, max_size=5),
       st.sampled_from(["A", "AAAA", "TXT", "ANY", "HTTPS", "DS"]))
def test_a_name_in_any_case_gets_the_lower_cased_key(compiled, parts, rdtype):
    try:
        name = dns.name.from_text(".".join(parts).strip(".") or "x")
    except dns.exception.DNSException:  # an empty or too long label or name: not a query dnspython makes
        name = None
    assume(name is not None)
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


@pytest.mark.system
def test_one_thread_relays_the_replies_of_each_upstream_socket_until_each_is_closed(compiled):
    """upstream.serve_together, the compiled reply loop of a family's sockets:
    a reply goes back with the client's ID (rewritten in the slot it came in),
    whichever socket it came on; a closed socket is closed by that thread and
    the others go on; the thread ends when the last one is closed."""
    forwarder = Forwarder(defaults(forward_timeout=2.0), Stats(), compiled)
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


@pytest.mark.system
def test_the_udp_thread_serves_the_upstreams_it_adopted_and_hands_them_on_when_its_socket_shuts(compiled):
    """On the compiled path the first udp thread serves the IPv4 upstream
    sockets too (Forwarder.start(adopted=True)). A shut-down listening socket
    ends the thread at once (the drain waits for it), and the replies to the
    queries still in flight are relayed all the same."""
    forwarder = Forwarder(defaults(forward_timeout=2.0), Stats(), compiled)
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


def test_the_stub_mypy_reads_names_what_the_module_has(compiled):
    """workers/_fastpath.pyi, which types every call into the module, and the
    built module agree: its functions' parameters, its classes' methods, its constants."""
    stub = ast.parse((Path(__file__).resolve().parent.parent / "workers/_fastpath.pyi").read_text())
    checked = 0
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            assert list(inspect.signature(getattr(compiled, node.name)).parameters) == \
                [a.arg for a in node.args.args], node.name
        elif isinstance(node, ast.ClassDef):
            methods = [item.name for item in node.body if isinstance(item, ast.FunctionDef)]
            assert all(hasattr(getattr(compiled, node.name), m) for m in methods), node.name
        elif isinstance(node, ast.AnnAssign):
            assert hasattr(compiled, node.target.id), node.target.id
        else:
            continue
        checked += 1
    assert checked >= 12
