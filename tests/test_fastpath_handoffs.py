"""Which queries the compiled UDP path hands to the Python path, and why
(dnsrouter_fast_path_handoffs_total{reason}), against a real router: the
counters are otherwise the same either way, so only these tell that the
compiled loop, not Python, forwarded a routable query."""
from __future__ import annotations

import time

import dns.message
import dns.query
import dns.rcode
import pytest

from support.fake_backend import FakeBackend
from support.metrics import Samples, samples, value
from support.net import HOST, free_port, raw_udp, wait_until

pytestmark = pytest.mark.system  # a real router on the compiled path

HANDOFFS = "dnsrouter_fast_path_handoffs_total"
QUERIES = "dnsrouter_queries_total"


def compiled_router(router, tmp_path, backend: FakeBackend, ini: str = "") -> tuple[object, int]:
    """A router on the compiled path (its start checks that), routing .test. to ``backend``:
    (the router, its metrics port)."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(ini)
    mport = free_port("tcp")
    r = router(fast_path="auto", args=["--config", str(conf), "--metrics", f"{HOST}:{mport}"])
    r.route("a", rf"{backend.addr},\.test\.$")
    wait_until(lambda: dns.query.udp(dns.message.make_query("w.test.", "A"), HOST, port=r.port,
                                     timeout=1).rcode() == dns.rcode.NOERROR, 5, message="not routed")
    return r, mport


def settled(mport: int) -> Samples:
    """/metrics once the workers' reports (about once a second) stop changing the query count."""
    seen: list[tuple[float, Samples]] = []

    def still():
        seen.append((time.monotonic(), samples(mport)))
        older = [s for t, s in seen if t < seen[-1][0] - 1.5]
        return bool(older) and value(older[-1], QUERIES, transport="udp") == \
            value(seen[-1][1], QUERIES, transport="udp") and seen[-1][1]

    return wait_until(still, 10, interval=0.3, message="the counters never settled")


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


def test_a_routable_query_is_never_handed_over_and_a_formerr_or_unrouted_one_is(router, tmp_path):
    with FakeBackend("ok") as fake:
        r, mport = compiled_router(router, tmp_path, fake)
        base = settled(mport)
        for i in range(30):
            assert dns.query.udp(dns.message.make_query(f"q{i}.TEST.", "A"), HOST, port=r.port,
                                 timeout=2).rcode() == dns.rcode.NOERROR
        diff = after(mport, base, 30)
        assert handoffs(diff) == {}  # 30 forwarded, every one by the compiled loop
        assert fake.count("udp") >= 30

        no_question = b"\x12\x34\x01\x00" + bytes(8)  # QDCOUNT 0: FORMERR, from Python
        assert dns.message.from_wire(raw_udp(r.port, no_question), question_only=True).rcode() == dns.rcode.FORMERR
        assert dns.query.udp(dns.message.make_query("nowhere.other.", "A"), HOST, port=r.port,
                             timeout=2).rcode() == dns.rcode.SERVFAIL
        diff = after(mport, base, 32)
        assert handoffs(diff) == {"not_simple": 1, "no_route": 1}
        assert value(diff, "dnsrouter_responses_total", rcode="FORMERR") == 1


def test_an_acl_hands_every_query_over(router, tmp_path):
    with FakeBackend("ok") as fake:
        r, mport = compiled_router(router, tmp_path, fake, "[server]\nallow = 127.0.0.0/8\n")
        base = settled(mport)
        for i in range(10):
            assert dns.query.udp(dns.message.make_query(f"q{i}.test.", "A"), HOST, port=r.port,
                                 timeout=2).rcode() == dns.rcode.NOERROR
        assert handoffs(after(mport, base, 10)) == {"acl": 10}
