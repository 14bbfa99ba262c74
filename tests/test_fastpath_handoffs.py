"""Which queries the compiled UDP path hands to the Python path, and why
(dnsrouter_fast_path_handoffs_total{reason}), against a real router: the
counters are otherwise the same either way, so only these tell that the
compiled loop, not Python, forwarded a routable query or made an answer of
its own. The tests that take ``packet_path`` run on both paths and show the
same answers and counts from each."""
from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import pytest

from support.fake_backend import FakeBackend
from support.metrics import Samples, samples, settled, value
from support.net import HOST, free_port, raw_udp, wait_until

pytestmark = pytest.mark.system  # a real router on the compiled path

HANDOFFS = "dnsrouter_fast_path_handoffs_total"
QUERIES = "dnsrouter_queries_total"


def compiled_router(router, tmp_path, backend: FakeBackend, ini: str = "") -> tuple[object, int]:
    """A router on the compiled path (its start checks that; with the
    ``packet_path`` fixture, on that path), routing .test. to ``backend``:
    (the router, its metrics port)."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(ini)
    mport = free_port("tcp")
    r = router(fast_path="auto", args=["--config", str(conf), "--metrics", f"{HOST}:{mport}"])
    r.route("a", rf"{backend.addr},\.test\.$")
    wait_until(lambda: dns.query.udp(dns.message.make_query("w.test.", "A"), HOST, port=r.port,
                                     timeout=1).rcode() == dns.rcode.NOERROR, 5, message="not routed")
    return r, mport


def after(mport: int, base: Samples, queries: int) -> dict[tuple, float]:
    """The deltas since ``base`` once ``queries`` more UDP queries are counted."""
    def counted():
        now = samples(mport)
        grown = value(now, QUERIES, transport="udp") - value(base, QUERIES, transport="udp")
        assert grown <= queries
        return grown == queries and now

    now = wait_until(counted, 5, interval=0.2, message="the queries were not counted")
    return {k: now[k] - base.get(k, 0) for k in now}


def handoffs(diff: dict[tuple, float]) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in diff.items() if name == HANDOFFS and v}


def rcode_of(reply: bytes | None) -> int:
    assert reply is not None, "no answer"
    return dns.message.from_wire(reply, question_only=True).rcode()


def header(flags: int, qdcount: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, 0, 0, 0)


# The router's own answers: (datagram, rcode). QUERY unless named.
OWN_ANSWERS = {
    "QDCOUNT 0": (header(0x0100, 0), dns.rcode.FORMERR),
    "QDCOUNT 2": (header(0x0100, 2) + b"\x01a\x00\x00\x01\x00\x01" * 2, dns.rcode.FORMERR),
    "compression loop": (header(0x0100) + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
    "truncated name": (header(0x0100) + b"\x07exam", dns.rcode.FORMERR),
    "AXFR": (dns.message.make_query("w.test.", "AXFR").to_wire(), dns.rcode.NOTIMP),
    "STATUS": (header(0x1100) + b"\x01a\x00\x00\x01\x00\x01", dns.rcode.NOTIMP),
    "no route": (dns.message.make_query("nowhere.other.", "A").to_wire(), dns.rcode.SERVFAIL),
    "NOTIFY from elsewhere": (header(0x2000) + b"\x04test\x00\x00\x06\x00\x01", dns.rcode.REFUSED),
}


def test_the_router_s_own_answers_and_drops_are_made_without_python_on_the_compiled_path(router, tmp_path,
                                                                                       packet_path):
    """FORMERR, NOTIMP, SERVFAIL, REFUSED and the drops: the same answers and
    counts on both paths, none of them handed over by the compiled one; a
    NOTIFY from [cache] notify_allow (the purge) is."""
    with FakeBackend("ok") as fake:
        r, mport = compiled_router(router, tmp_path, fake, "[cache]\nnotify_allow = 127.0.0.2\n")
        base = settled(mport)
        response = dns.message.make_response(dns.message.make_query("w.test.", "A")).to_wire()
        for payload in (b"", b"x" * 11, response):  # dropped: no answer, no query counted
            assert raw_udp(r.port, payload, timeout=0.3) is None
        for name, (payload, rcode) in OWN_ANSWERS.items():
            assert rcode_of(raw_udp(r.port, payload)) == rcode, name
        notify = dns.message.make_query("test.", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        reply = dns.message.from_wire(raw_udp(r.port, notify.to_wire(), source="127.0.0.2"))
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA  # purged
        diff = after(mport, base, len(OWN_ANSWERS) + 1)
        assert handoffs(diff) == ({"notify": 1} if packet_path == "compiled" else {})
        assert {reason: value(diff, "dnsrouter_dropped_total", reason=reason) for reason in ("short", "response")} \
            == {"short": 2, "response": 1}
        answered = {rcode: value(diff, "dnsrouter_responses_total", rcode=rcode)
                    for rcode in ("NOERROR", "FORMERR", "SERVFAIL", "NOTIMP", "REFUSED")}
        assert answered == {"NOERROR": 1, "FORMERR": 4, "SERVFAIL": 1, "NOTIMP": 2, "REFUSED": 1}


@pytest.mark.parametrize("deny_action", ["refuse", "drop"])
def test_an_acl_keeps_allowed_queries_on_the_fast_path_and_refuses_or_drops_the_others(router, tmp_path, packet_path,
                                                                                      deny_action):
    with FakeBackend("ok") as fake:
        r, mport = compiled_router(router, tmp_path, fake,
                                   f"[server]\nallow = 127.0.0.1 ::1\ndeny_action = {deny_action}\n")
        base = settled(mport)
        for i in range(10):
            assert dns.query.udp(dns.message.make_query(f"q{i}.test.", "A"), HOST, port=r.port,
                                 timeout=2).rcode() == dns.rcode.NOERROR
        denied = [raw_udp(r.port, dns.message.make_query(f"d{i}.test.", "A").to_wire(), source="127.0.0.2",
                          timeout=0.5 if deny_action == "drop" else 2) for i in range(3)]
        if deny_action == "drop":
            assert denied == [None] * 3
        else:
            assert [rcode_of(reply) for reply in denied] == [dns.rcode.REFUSED] * 3
        diff = after(mport, base, 13)
        assert handoffs(diff) == {}  # on the compiled path the ACL is matched in C; Python's has no hand-offs
        assert value(diff, "dnsrouter_dropped_total", reason="acl") == (3 if deny_action == "drop" else 0)
        assert value(diff, "dnsrouter_responses_total", rcode="REFUSED") == (3 if deny_action == "refuse" else 0)
        assert fake.count("udp") >= 10


def test_a_routable_query_is_never_handed_over(router, tmp_path):
    with FakeBackend("ok") as fake:
        r, mport = compiled_router(router, tmp_path, fake)
        base = settled(mport)
        for i in range(30):
            assert dns.query.udp(dns.message.make_query(f"q{i}.TEST.", "A"), HOST, port=r.port,
                                 timeout=2).rcode() == dns.rcode.NOERROR
        diff = after(mport, base, 30)
        assert handoffs(diff) == {}  # 30 forwarded, every one by the compiled loop
        assert fake.count("udp") >= 30


def test_the_query_log_hands_every_query_to_route_over_and_nothing_else(router, tmp_path):
    with FakeBackend("ok") as fake:
        r, mport = compiled_router(router, tmp_path, fake, "[log]\nqueries = yes\n")
        base = settled(mport)
        for i in range(10):
            assert dns.query.udp(dns.message.make_query(f"q{i}.test.", "A"), HOST, port=r.port,
                                 timeout=2).rcode() == dns.rcode.NOERROR
        assert rcode_of(raw_udp(r.port, header(0x0100, 0))) == dns.rcode.FORMERR  # not logged: decided in C
        assert handoffs(after(mport, base, 11)) == {"query_log": 10}
