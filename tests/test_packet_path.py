"""The packet path end to end: the router subprocess in front of real Knot servers."""
from __future__ import annotations

import collections
import os
import random
import signal
import socket
import struct
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import psutil
import pytest

from support.fake_backend import FakeBackend
from support.net import HOST, free_port, raw_udp, routed, wait_until
from support.processes import gone

# Every test here runs against both UDP packet paths (conftest.PACKET_PATHS).
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("packet_path")]


def route_halves(r, knots):
    a, b = knots
    r.route("10-a", rf"{a.addr},\.a\.example\.com\.$")
    r.route("20-b", rf"{b.addr},\.b\.example\.com\.$")


def tcp_exchange_raw(port: int, queries: list[bytes], timeout: float = 3.0) -> list[bytes]:
    """Send several queries on one TCP connection at once; collect as many answers."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(b"".join(struct.pack("!H", len(q)) + q for q in queries))
        replies, buf = [], b""
        while len(replies) < len(queries):
            chunk = s.recv(65535)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + (buf[0] << 8 | buf[1]):
                n = buf[0] << 8 | buf[1]
                replies.append(buf[2:2 + n])
                buf = buf[2 + n:]
        return replies


def test_udp_answers_are_the_backends_bytes(router, knots, split_zone):
    r = router(workers=2)
    route_halves(r, knots)
    names = [n for zone in split_zone.zone_names for n in split_zone.names[zone][:150]]
    backend_of = {zone: k for zone, k in zip(split_zone.zone_names, knots)}
    wait_until(lambda: routed(r, names[0]) and routed(r, names[-1]), 5, message="routes not loaded")
    for name in names:
        zone = name.split(".", 1)[1]
        query = dns.message.make_query(name, "A", use_edns=0).to_wire()
        direct = raw_udp(backend_of[zone].port, query)
        via = raw_udp(r.port, query)
        assert via is not None, name
        assert via[:2] == query[:2]  # the client's ID came back
        assert via[2:] == direct[2:], name  # and otherwise the backend's very bytes
        assert dns.message.from_wire(via).answer[0][0].address == split_zone.addresses[name]


def test_tcp_answers_match_the_backend(router, knots, split_zone):
    r = router()
    route_halves(r, knots)
    names = [n for zone in split_zone.zone_names for n in split_zone.names[zone][:100]]
    wait_until(lambda: routed(r, names[0]) and routed(r, names[-1]), 5, message="routes not loaded")
    backend_of = {zone: k for zone, k in zip(split_zone.zone_names, knots)}
    for name in names:
        query = dns.message.make_query(name, "A")
        direct = dns.query.tcp(query, HOST, port=backend_of[name.split(".", 1)[1]].port, timeout=2)
        via = dns.query.tcp(query, HOST, port=r.port, timeout=2)
        assert via.id == query.id
        assert via.edns == -1  # the OPT the router added towards the backend is gone
        assert via.rcode() == direct.rcode() and via.flags == direct.flags
        assert via.answer == direct.answer and via.authority == direct.authority, name


def test_tcp_pipelined_queries_on_one_connection(router, knots, split_zone):
    r = router()
    route_halves(r, knots)
    names = split_zone.names[split_zone.zone_names[0]][:20] + split_zone.names[split_zone.zone_names[1]][:20]
    wait_until(lambda: routed(r, names[0]) and routed(r, names[-1]), 5, message="routes not loaded")
    queries = [dns.message.make_query(n, "A") for n in names]
    for i, query in enumerate(queries):
        query.id = 1000 + i  # distinct: random IDs collide in about 1 run of 80
    replies = [dns.message.from_wire(w) for w in tcp_exchange_raw(r.port, [q.to_wire() for q in queries])]
    assert len(replies) == len(queries)
    by_id = {m.id: m for m in replies}
    for q in queries:
        answer = by_id[q.id]
        assert answer.question == q.question
        assert answer.answer[0][0].address == split_zone.addresses[q.question[0].name.to_text()]


def test_tcp_messages_cut_anywhere_by_the_stream(router, knots, split_zone):
    # TCP is a stream: one read may end inside a length prefix or a message,
    # or hold several messages. Each query is answered when it is whole.
    r = router()
    route_halves(r, knots)
    names = split_zone.names[split_zone.zone_names[0]][:3]
    wait_until(lambda: routed(r, names[0]), 5, message="routes not loaded")
    frames = []
    for i, name in enumerate(names):
        query = dns.message.make_query(name, "A")
        query.id = 2000 + i
        wire = query.to_wire()
        frames.append(struct.pack("!H", len(wire)) + wire)
    stream = b"".join(frames)
    cuts = [len(frames[0]) + 1, len(frames[0]) + len(frames[1]) - 5]  # inside the 2nd prefix, the 2nd's tail
    with socket.create_connection((HOST, r.port), timeout=3) as s:
        replies, buf = {}, b""

        def read_answers():
            nonlocal buf
            buf += s.recv(65535)
            while len(buf) >= 2 and len(buf) >= 2 + (buf[0] << 8 | buf[1]):
                n = buf[0] << 8 | buf[1]
                reply = dns.message.from_wire(buf[2:2 + n])
                replies[reply.id] = reply
                buf = buf[2 + n:]

        s.sendall(stream[:cuts[0]])
        while 2000 not in replies:  # the 1st is answered while the 2nd is still in pieces
            read_answers()
        assert set(replies) == {2000}
        s.sendall(stream[cuts[0]:cuts[1]])
        s.sendall(stream[cuts[1]:])
        while len(replies) < 3:
            read_answers()
    for i, name in enumerate(names):
        assert replies[2000 + i].answer[0][0].address == split_zone.addresses[name]


def test_servfail_when_no_route_matches(router, knots):
    r = router()
    route_halves(r, knots)
    query = dns.message.make_query("www.example.org.", "A", use_edns=0)
    reply = dns.query.udp(query, HOST, port=r.port, timeout=2)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.id == query.id and reply.question == query.question
    assert reply.flags & dns.flags.RD and reply.edns == 0  # RD and OPT echoed
    plain = dns.query.udp(dns.message.make_query("www.example.org.", "A"), HOST, port=r.port, timeout=2)
    assert plain.edns == -1 and plain.rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("no_route", ["servfail", "refused"])
def test_forward_no_route_answers_a_name_no_route_matches_and_a_pool_all_down(router, tmp_path, no_route):
    """[forward] no_route: SERVFAIL (the default) or REFUSED, for a name no
    route matches and for one whose every backend is down (the same "no
    pool"), over UDP and TCP, the ID, question, RD and EDNS echoed."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(f"[forward]\nno_route = {no_route}\n[health]\ninterval = 0.2\ntimeout = 0.2\nfall = 1\n")
    r = router(args=["--config", str(conf)])
    r.route("dead", rf"{HOST}:{free_port('tcp')},\.dead\.example\.$")  # nothing listens: down at its first check
    want = dns.rcode.REFUSED if no_route == "refused" else dns.rcode.SERVFAIL
    wait_until(lambda: dns.query.udp(dns.message.make_query("x.dead.example.", "A"), HOST, port=r.port,
                                     timeout=2).rcode() == want, 10, message="the dead pool was not taken down")
    for name in ("www.example.org.", "x.dead.example."):
        query = dns.message.make_query(name, "A", use_edns=0)
        for reply in (dns.query.udp(query, HOST, port=r.port, timeout=2),
                      dns.query.tcp(query, HOST, port=r.port, timeout=2)):
            assert reply.rcode() == want, name
            assert reply.id == query.id and reply.question == query.question
            assert reply.flags & dns.flags.RD and not reply.flags & dns.flags.AA
        assert dns.query.udp(query, HOST, port=r.port, timeout=2).edns == 0  # OPT echoed
        plain = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=r.port, timeout=2)
        assert plain.edns == -1 and plain.rcode() == want


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
def test_zone_transfers_are_not_implemented(router, knots, split_zone, qtype):
    r = router()
    route_halves(r, knots)
    query = dns.message.make_query(split_zone.zone_names[0], qtype)
    for reply in (dns.query.udp(query, HOST, port=r.port, timeout=2),
                  dns.query.tcp(query, HOST, port=r.port, timeout=2)):
        assert reply.rcode() == dns.rcode.NOTIMP
        assert reply.id == query.id and reply.question == query.question


@pytest.mark.parametrize("opcode, rcode", [(dns.opcode.IQUERY, dns.rcode.NOTIMP), (dns.opcode.STATUS, dns.rcode.NOTIMP),
                                           (dns.opcode.NOTIFY, dns.rcode.REFUSED)],  # no [cache] notify_allow
                         ids=["IQUERY", "STATUS", "NOTIFY"])
def test_other_opcodes_are_not_implemented(router, opcode, rcode):
    r = router()
    query = dns.message.make_query("x.example.com.", "A")
    query.set_opcode(opcode)
    reply = dns.query.udp(query, HOST, port=r.port, timeout=2)
    assert reply.rcode() == rcode and reply.opcode() == opcode


FORMERR_CASES = {
    "no question": struct.pack("!HHHHHH", 0x1234, 0x0100, 0, 0, 0, 0),
    "two questions": struct.pack("!HHHHHH", 0x1234, 0x0100, 2, 0, 0, 0)
    + (b"\x01a\x00\x00\x01\x00\x01" * 2),
    "compression pointer": struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",
    "truncated name": struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07exam",
    "no type and class": struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x01a\x00\x00",
}


@pytest.mark.parametrize("case", FORMERR_CASES)
def test_malformed_questions_get_formerr(router, case):
    r = router()
    reply = raw_udp(r.port, FORMERR_CASES[case])
    assert reply is not None, "no answer"
    message = dns.message.from_wire(reply)
    assert message.rcode() == dns.rcode.FORMERR
    assert message.id == 0x1234 and message.flags & dns.flags.QR and message.flags & dns.flags.RD


def test_garbage_is_dropped_and_the_router_keeps_answering(router, knots, split_zone):
    r = router(workers=2)
    route_halves(r, knots)
    name = split_zone.names[split_zone.zone_names[0]][0]
    wait_until(lambda: routed(r, name), 5, message="routes not loaded")
    pids = r.worker_pids()
    rng = random.Random(7)
    response = dns.message.make_response(dns.message.make_query(name, "A")).to_wire()
    junk = [b"", b"\x00", b"x" * 11, response] + [rng.randbytes(rng.randrange(12, 600)) for _ in range(300)]
    # Each socket ends with a query the backend answers: the router's own
    # answers to what came before it are sent at once, so they arrive first.
    marker = dns.message.make_query(name, "A")
    marker.id = next(i for i in range(1 << 16) if i.to_bytes(2, "big") not in {p[:2] for p in junk})
    marker_id = marker.to_wire()[:2]

    def replies_before_marker(payloads: list[bytes]) -> list[bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            for payload in payloads + [marker.to_wire()]:
                s.sendto(payload, (HOST, r.port))
            replies = []
            while (reply := s.recv(65535))[:2] != marker_id:
                replies.append(reply)
            return replies

    # Short packets and responses get no answer at all.
    assert replies_before_marker([b"", b"\x00", b"x" * 11, response]) == []
    # Other garbage gets at most one answer of the router's own per query
    # (FORMERR and the like), which echoes its ID.
    answered = replies_before_marker(junk)
    asked = collections.Counter(p[:2] for p in junk if len(p) >= 12 and not p[2] & 0x80)
    assert all(len(a) >= 12 and a[2] & 0x80 for a in answered), answered
    assert collections.Counter(a[:2] for a in answered) <= asked, answered
    assert all(routed(r, n) for n in split_zone.names[split_zone.zone_names[0]][:20])
    assert r.worker_pids() == pids  # no worker died on the way
    with socket.create_connection((HOST, r.port), timeout=2) as s:  # garbage over TCP too
        s.sendall(b"\x00\x05hello\x00\x02zz")
    assert routed(r, name) and r.worker_pids() == pids


def test_big_answer_whole_over_tcp_and_truncated_over_udp(router, knots, split_zone):
    r = router()
    route_halves(r, knots)
    zone = split_zone.zone_names[0]
    big = split_zone.big_txt[zone]
    wait_until(lambda: routed(r, big), 5, message="routes not loaded")
    udp = dns.query.udp(dns.message.make_query(big, "TXT", use_edns=False), HOST, port=r.port,
                        timeout=2, ignore_trailing=True)
    assert udp.flags & dns.flags.TC
    tcp = dns.query.tcp(dns.message.make_query(big, "TXT"), HOST, port=r.port, timeout=3)
    assert not tcp.flags & dns.flags.TC
    strings = sorted(b"".join(rd.strings).decode() for rd in tcp.answer[0])
    assert strings == sorted(split_zone.big_txt_strings[zone])
    assert len(tcp.to_wire()) > 1232


def test_both_backends_of_a_pool_get_traffic(router):
    with FakeBackend("ok") as one, FakeBackend("ok") as two:
        r = router()
        r.route("pool-1", rf"{one.addr},\.pool\.test\.$")
        r.route("pool-2", rf"{two.addr},\.pool\.test\.$")
        wait_until(lambda: routed(r, "a.pool.test."), 5, message="routes not loaded")
        for i in range(40):
            assert routed(r, f"q{i}.pool.test.")
        assert one.count("udp") >= 15 and two.count("udp") >= 15


def test_overlapping_regexps_pick_the_first_registered(router, knots, split_zone):
    zone = split_zone.zone_names[0]
    name = split_zone.names[zone][0]
    with FakeBackend("ok") as fake:
        r = router()
        # One route at a time: the registry may read the directory between two writes,
        # and the catch-all alone would take the name to the fake backend.
        r.route("1-knot", rf"{knots[0].addr},\.a\.example\.com\.$")
        wait_until(lambda: routed(r, name), 5, message="the Knot route not loaded")
        r.route("2-fake", rf"{fake.addr},example\.com\.$")
        wait_until(lambda: routed(r, "other.example.com."), 5, message="the catch-all not loaded")
        asked = fake.count("udp")  # (its TCP traffic is the health check)
        reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=r.port, timeout=2)
        assert reply.answer[0][0].address == split_zone.addresses[name]  # Knot's data
        assert fake.count("udp") == asked
        # Registered before the Knot route, the catch-all wins.
        r.route("0-fake", rf"{fake.addr},example\.com\.$")
        wait_until(lambda: fake.count("udp") > asked or not routed(r, name), 3, message="order not applied")
        reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=r.port, timeout=2)
        assert reply.answer[0][0].address == "192.0.2.1"


def test_route_file_added_and_removed_takes_effect_within_a_second(router, knots, split_zone):
    r = router()
    name = split_zone.names[split_zone.zone_names[0]][0]
    assert routed(r, name, dns.rcode.SERVFAIL)
    started = time.monotonic()
    r.route("a", rf"{knots[0].addr},\.a\.example\.com\.$")
    wait_until(lambda: routed(r, name), 1.0, interval=0.02, message="added route not used")
    added = time.monotonic() - started
    started = time.monotonic()
    r.unroute("a")
    wait_until(lambda: routed(r, name, dns.rcode.SERVFAIL), 1.0, interval=0.02, message="removed route still used")
    assert added < 1.0 and time.monotonic() - started < 1.0


def test_unparseable_route_file_is_skipped_with_one_log_line(router, knots, split_zone):
    r = router()
    name = split_zone.names[split_zone.zone_names[0]][0]
    r.route("bad", "not a value")
    r.route("good", rf"{knots[0].addr},\.a\.example\.com\.$")
    wait_until(lambda: routed(r, name), 2, message="good route not used beside a bad one")
    r.route("zzz", "127.0.0.1:53,(")  # also a later change: bad is not logged again
    wait_until(lambda: "zzz skipped" in r.log(), 2, message="bad regexp not logged")
    log = r.log()
    assert log.count("registry key bad skipped: no comma between ip:port and regexp") == 1
    assert "regexp does not compile under RE2" in log


def test_killed_worker_is_replaced_on_the_same_sockets(router, knots, split_zone):
    r = router(workers=2)
    route_halves(r, knots)
    names = split_zone.names[split_zone.zone_names[0]][:50]
    wait_until(lambda: routed(r, names[0]), 5, message="routes not loaded")
    before = r.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    started = time.monotonic()
    wait_until(lambda: len(r.worker_pids()) == 2 and r.worker_pids() != before, 3,
               message="worker not replaced")
    assert time.monotonic() - started < 1.5
    wait_until(lambda: all(routed(r, n) for n in names), 3, message="queries fail after the restart")
    assert all(routed(r, n) for n in names)


def test_workers_leave_when_the_supervisor_is_killed(router):
    r = router(workers=2)
    workers = r.workers_procs()
    assert len(workers) == 2
    r.proc.kill()
    r.proc.wait()
    wait_until(lambda: gone(workers), 2, message="workers outlived the supervisor")


def test_sigterm_stops_cleanly(router):
    r = router(workers=2)
    workers = r.workers_procs()
    r.signal(signal.SIGTERM)
    assert r.proc.wait(10) == 0
    wait_until(lambda: gone(workers), 2, message="workers left after SIGTERM")


def test_process_titles(router):
    r = router(workers=2)
    assert "dnsrouter: supervisor" in " ".join(psutil.Process(r.proc.pid).cmdline())
    titles = sorted(" ".join(p.cmdline()).strip() for p in r.workers_procs())
    assert titles == ["dnsrouter: worker 0", "dnsrouter: worker 1"]
