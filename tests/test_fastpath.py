"""The compiled UDP path (workers/_fastpath.pyx) against the Python path
itself: it takes exactly the queries the Python path forwards as they came,
keyed as the Python path keys them, and is optional to build."""
from __future__ import annotations

import ast
import functools
import inspect
import ipaddress
import socket
import struct
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
from dnsrouter import acl
from dnsrouter.workers import fastpath, mmsg, udp
from support.fake_backend import FakeBackend
from support.mutations import mutate, mutations
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


# -- the router's own answers, decided in C (_fastpath.decide: _Queries.take's code) --------------

ALLOW = "10.0.0.0/8 192.0.2.1 ::1 2001:db8::/33 ::ffff:198.51.100.0/120"
NOTIFY_ALLOW = {"nobody": "", "loopback": "127.0.0.0/8 ::1", "ten": "10.1.0.0/16"}
PEERS = {  # raw peer addresses as recvmmsg writes them: IPv4 socket, IPv6 socket (IPv4 clients mapped)
    name: mmsg.raw_address(parse_address(address)) for name, address in {
        "127.0.0.1": "127.0.0.1:5353", "10.1.2.3": "10.1.2.3:53", "192.0.2.1": "192.0.2.1:1",
        "192.0.2.2": "192.0.2.2:1", "::1": "[::1]:5353", "2001:db8::5": "[2001:db8::5]:53",
        "2001:db8:8000::1": "[2001:db8:8000::1]:53", "::ffff:10.1.2.3": "[::ffff:10.1.2.3]:53",
        "::ffff:198.51.100.7": "[::ffff:198.51.100.7]:53"}.items()}


def _networks(text: str) -> tuple:
    return tuple(ipaddress.ip_network(n) for n in text.split())


class _Reference(Forwarder):
    """The Python path with a policy: what it forwards (the question), answers
    (the bytes) and drops, and what it counts."""

    def __init__(self, allow: str, deny_action: str, notify_allow: str, no_route: str, routed: bool) -> None:
        super().__init__(defaults(forward_timeout=2.0, server_allow=_networks(allow), server_deny_action=deny_action,
                                  cache_notify_allow=_networks(notify_allow), forward_no_route=no_route), Stats())
        self.matcher = Matcher([Route("^", (parse_address("127.0.0.1:53"),))] if routed else [])
        self.forwarded: list[bytes] = []
        self.answered: list[bytes] = []

    def _send(self, entry, counts, outbox=None) -> None:
        self.forwarded.append(entry.question)

    def send(self, data: bytes, addr: bytes | None, outbox=None) -> None:
        self.answered.append(data)

    def host(self, addr: bytes | None) -> str:
        assert addr is not None
        return mmsg.host(addr)


@functools.cache
def _reference(*policy) -> _Reference:
    return _Reference(*policy)


@functools.cache
def _compiled_networks(compiled, text: str):
    return compiled.Networks(_networks(text))


def _python_decides(packet: bytes, peer: bytes, policy: tuple) -> tuple[tuple[str, object], dict]:
    forwarder = _reference(*policy)
    forwarder.forwarded.clear()
    forwarder.answered.clear()
    counts: Counts = defaultdict(int)
    forwarder.handle(packet, peer, forwarder, counts)
    assert len(forwarder.forwarded) + len(forwarder.answered) <= 1
    if forwarder.forwarded:
        question = forwarder.forwarded[0]
        outcome: tuple[str, object] = ("forward", (12 + len(question), question))
    elif forwarder.answered:
        outcome = ("answer", forwarder.answered[0])
    else:
        (reason,) = [label for kind, label in counts if kind == "dropped"]
        outcome = ("drop", reason)
    return outcome, {k: v for k, v in counts.items() if v}


def _compiled_decides(compiled, packet: bytes, peer: bytes, policy: tuple) -> tuple[tuple[str, object], dict]:
    allow, deny_action, notify_allow, no_route, routed = policy
    counters = compiled.Counters()
    outcome = compiled.decide(packet, peer, _compiled_networks(compiled, allow) if allow else None,
                              deny_action == "drop", _compiled_networks(compiled, notify_allow),
                              wire.REFUSED if no_route == "refused" else wire.SERVFAIL, routed, counters)
    return outcome, counters.snapshot()


def _header(flags: int, qdcount: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, 0, 0, 0)


def _compression_loop(draw) -> bytes:
    """A question name that points (at itself, at a pointer, into the header)."""
    target = draw(st.sampled_from([12, 14, 0, 4]))
    return _header(0x0100) + draw(st.sampled_from([b"", b"\x01a"])) + bytes([0xC0, target]) + b"\0\1\0\1"


@st.composite
def junk_and_queries(draw) -> tuple[str, bytes]:
    """(what kind, a datagram): queries mutated near every edge the decision
    guards, and junk: random bytes, bit flips, compression loops,
    truncation, QR set, QDCOUNT 0 and 2, AXFR, NOTIFY."""
    kind = draw(st.sampled_from(["valid", "mutated", "random", "bit flips", "compression loop", "truncated",
                                 "QR set", "QDCOUNT 0", "QDCOUNT 2", "AXFR", "IXFR", "NOTIFY", "opcode"]))
    packet = draw(valid_queries())
    if kind == "mutated":
        for mutation in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=2)):
            if len(packet) > 12:
                packet = MUTATIONS[mutation](packet, draw)
        packet, _ = mutate(packet, draw(mutations([0, 1, 63, 64, 0xC0, 0xFF, 41, 252])))
    elif kind == "random":
        packet = draw(st.binary(max_size=80))
    elif kind == "bit flips":
        flips = draw(st.lists(st.tuples(st.integers(0, len(packet) - 1), st.integers(0, 7)), min_size=1, max_size=4))
        data = bytearray(packet)
        for at, bit in flips:
            data[at] ^= 1 << bit
        packet = bytes(data)
    elif kind == "compression loop":
        packet = _compression_loop(draw)
    elif kind == "truncated":
        packet = packet[:draw(st.integers(0, len(packet) - 1))]
    elif kind == "QR set":
        packet = _set(packet, 2, bytes([packet[2] | 0x80]))
    elif kind in ("QDCOUNT 0", "QDCOUNT 2"):
        packet = _set(packet, 4, b"\0\0" if kind == "QDCOUNT 0" else b"\0\2")
    elif kind in ("AXFR", "IXFR"):
        end = wire.parse_question(packet)[3]
        packet = _set(packet, end - 4, b"\0\xfc" if kind == "AXFR" else b"\0\xfb")
    elif kind == "NOTIFY":
        packet = _set(packet, 2, bytes([0x20 | (packet[2] & 0x87)]))
        packet = _set(packet, 4, draw(st.sampled_from([b"\0\1", b"\0\1", b"\0\0", b"\0\2"])))
    elif kind == "opcode":
        packet = _set(packet, 2, bytes([draw(st.sampled_from([1, 2, 3, 5, 6, 15])) << 3 | (packet[2] & 0x87)]))
    return kind, packet


policies = st.tuples(st.sampled_from(["", ALLOW]), st.sampled_from(["refuse", "drop"]),
                     st.sampled_from(sorted(NOTIFY_ALLOW.values())), st.sampled_from(["servfail", "refused"]),
                     st.booleans())


@settings(max_examples=4000, deadline=None)
@given(junk_and_queries(), st.sampled_from(sorted(PEERS)), policies)
def test_the_compiled_decision_is_the_python_path_s_answer_bytes_and_counts(compiled, case, peer_name, policy):
    """_fastpath.decide runs _Queries.take's C (_decide, _own_answer, the
    counting) on one datagram: the same drop, the same answer byte for byte,
    the same counts as Forwarder.handle, for every [server] allow /
    deny_action / notify_allow / no_route; only an allowed NOTIFY (the
    purge) goes to Python."""
    kind, packet = case
    peer = PEERS[peer_name]
    event(f"datagram: {kind}")
    want, want_counts = _python_decides(packet, peer, policy)
    got, got_counts = _compiled_decides(compiled, packet, peer, policy)
    if got == ("python", "notify"):
        event("handed over: an allowed NOTIFY")
        answer = want[1]
        assert want[0] == "answer" and isinstance(answer, bytes)
        assert answer[2] & 0x7C == 0x24 and answer[3] & 0xF == 0  # NOTIFY, AA, NOERROR: the purge ran
        assert got_counts == {("fast_path_handoffs", "notify"): 1}
        return
    if want[0] == "answer":
        answer = want[1]
        assert isinstance(answer, bytes)
        outcome = f"answer rcode {answer[3] & 0xF}" + (" with OPT" if answer[11] else "")
    else:
        outcome = f"{want[0]} {want[1] if want[0] == 'drop' else ''}".strip()
    event(f"both: {outcome}" + (" (ACL)" if policy[0] else ""))
    assert got == want
    assert got_counts == want_counts


def test_each_own_answer_and_drop_is_reached_with_its_policy(compiled):
    """The cases by name, each with the verdict it must get (and the Python path's)."""
    query = dns.message.make_query("www.example.com.", "A", use_edns=0)
    plain = query.to_wire()
    notify = _set(plain, 2, b"\x20")  # opcode NOTIFY, RD clear
    cases = {
        "short": (plain[:11], "127.0.0.1", ("", "refuse", "", "servfail", True), ("drop", "short")),
        "QR set": (_set(plain, 2, b"\x81"), "127.0.0.1", ("", "refuse", "", "servfail", True), ("drop", "response")),
        "ACL drop": (plain, "127.0.0.1", (ALLOW, "drop", "", "servfail", True), ("drop", "acl")),
        "ACL refuse": (plain, "192.0.2.2", (ALLOW, "refuse", "", "servfail", True), wire.REFUSED),
        "ACL allows ::1": (plain, "::1", (ALLOW, "refuse", "", "servfail", True), "forward"),
        "ACL allows a mapped IPv4 by an IPv6 network": (plain, "::ffff:198.51.100.7",
                                                        (ALLOW, "drop", "", "servfail", True), "forward"),
        "ACL: a mapped IPv4 is no IPv4": (plain, "::ffff:10.1.2.3", (ALLOW, "drop", "", "servfail", True),
                                          ("drop", "acl")),
        "QDCOUNT 0": (_set(plain, 4, b"\0\0"), "127.0.0.1", ("", "refuse", "", "servfail", True), wire.FORMERR),
        "QDCOUNT 2": (_set(plain, 4, b"\0\2"), "127.0.0.1", ("", "refuse", "", "servfail", True), wire.FORMERR),
        "compression loop": (_header(0x0100) + b"\xc0\x0c\0\1\0\1", "127.0.0.1", ("", "refuse", "", "servfail", True),
                             wire.FORMERR),
        "AXFR": (dns.message.make_query("example.com.", "AXFR").to_wire(), "127.0.0.1",
                 ("", "refuse", "", "servfail", True), wire.NOTIMP),
        "STATUS": (_set(plain, 2, b"\x10"), "127.0.0.1", ("", "refuse", "", "servfail", True), wire.NOTIMP),
        "NOTIFY from nobody's list": (notify, "127.0.0.1", ("", "refuse", "", "servfail", True), wire.REFUSED),
        "NOTIFY from elsewhere": (notify, "10.1.2.3", ("", "refuse", "127.0.0.0/8 ::1", "servfail", True),
                                  wire.REFUSED),
        "NOTIFY, QDCOUNT 2": (_set(notify, 4, b"\0\2"), "127.0.0.1", ("", "refuse", "127.0.0.0/8 ::1", "servfail", True),
                              wire.FORMERR),
        "NOTIFY allowed": (notify, "::1", ("", "refuse", "127.0.0.0/8 ::1", "servfail", True), ("python", "notify")),
        "no route": (plain, "127.0.0.1", ("", "refuse", "", "servfail", False), wire.SERVFAIL),
        "no route, refused": (plain, "127.0.0.1", ("", "refuse", "", "refused", False), wire.REFUSED),
    }
    for name, (packet, peer, policy, verdict) in cases.items():
        got, counts = _compiled_decides(compiled, packet, PEERS[peer], policy)
        want, want_counts = _python_decides(packet, PEERS[peer], policy)
        if isinstance(verdict, int):
            assert got[0] == "answer" and got[1][3] & 0xF == verdict, name
            assert dns.message.from_wire(got[1], question_only=True).rcode() == verdict, name
        elif verdict == "forward":
            assert got[0] == "forward", name
        else:
            assert got == verdict, name
        if got[0] != "python":
            assert (got, counts) == (want, want_counts), name


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just(4), st.binary(min_size=4, max_size=4), st.integers(0, 32)),
    st.tuples(st.just(6), st.binary(min_size=16, max_size=16), st.integers(0, 128))), max_size=4),
    st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)), st.data())
def test_networks_matches_as_the_python_acl_does(compiled, nets, address, data):
    """Networks (the compiled matcher the ACL, notify_allow and the rate
    limiter's exemptions use) against acl.make's test of mmsg.host."""
    networks = tuple(ipaddress.ip_network((ipaddress.ip_address(raw), prefix), strict=False)
                     for _, raw, prefix in nets)
    if networks and data.draw(st.booleans()):  # an address inside one of them, at its edge
        net = data.draw(st.sampled_from(networks))
        inside = net.network_address if data.draw(st.booleans()) else net.broadcast_address
        address = inside.packed
    ip = ipaddress.ip_address(address)
    raw = mmsg.raw_address(parse_address(f"[{ip}]:53" if ip.version == 6 else f"{ip}:53"))
    allowed = acl.make(networks)
    want = allowed is not None and allowed(mmsg.host(raw))
    event(f"IPv{ip.version}, {'in' if want else 'not in'} the networks")
    assert (raw in compiled.Networks(networks)) == want
