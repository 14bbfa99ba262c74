"""/metrics, /routes and /healthz of a running router."""
from __future__ import annotations

import json
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from support.fake_backend import FakeBackend
from support.metrics import http_get, samples, settled, value
from support.net import HOST, free_port, wait_until

# Every test here runs against both UDP packet paths (conftest.PACKET_PATHS).
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("packet_path")]


def test_counters_match_the_traffic_sent(router, packet_path):
    mport = free_port("tcp")
    with FakeBackend("ok") as fake:
        r = router(workers=2, args=["--metrics", f"{HOST}:{mport}"])
        r.route("a", rf"{fake.addr},\.test\.$")
        r.route("bad", "no comma here")
        wait_until(lambda: dns.query.udp(dns.message.make_query("w.test.", "A"), HOST, port=r.port,
                                         timeout=1).rcode() == dns.rcode.NOERROR, 3, message="not routed")

        # Workers report once a second: wait until the warm-up queries are all counted.
        base = settled(mport)

        # The router's latency of a forwarded query lies within the client's round trip.
        round_trips = 0.0

        def forwarded(exchange, name: str) -> None:
            nonlocal round_trips
            sent = time.monotonic()
            assert exchange(dns.message.make_query(name, "A"), HOST, port=r.port,
                            timeout=2).rcode() == dns.rcode.NOERROR
            round_trips += time.monotonic() - sent

        for i in range(50):
            forwarded(dns.query.udp, f"q{i}.test.")
        for i in range(20):
            assert dns.query.udp(dns.message.make_query(f"q{i}.other.", "A"), HOST, port=r.port,
                                 timeout=2).rcode() == dns.rcode.SERVFAIL
        for i in range(10):
            forwarded(dns.query.tcp, f"t{i}.test.")

        def grown():
            now = samples(mport)
            return now if value(now, "dnsrouter_queries_total", transport="udp") - \
                value(base, "dnsrouter_queries_total", transport="udp") >= 70 and \
                value(now, "dnsrouter_queries_total", transport="tcp") - \
                value(base, "dnsrouter_queries_total", transport="tcp") >= 10 else None

        now = wait_until(grown, 5, interval=0.2, message="counters never caught up")
        diff = {k: now[k] - base.get(k, 0) for k in now}

        def d(name, **labels):
            return value(diff, name, **labels)

        assert d("dnsrouter_queries_total", transport="udp") == 70
        assert d("dnsrouter_queries_total", transport="tcp") == 10
        assert d("dnsrouter_responses_total", rcode="NOERROR") == 60
        assert d("dnsrouter_responses_total", rcode="SERVFAIL") == 20
        # An early retry (a reply later than the backend's retry time: a loaded machine) is one more backend query.
        assert d("dnsrouter_backend_queries_total", backend=fake.addr) == \
            60 + d("dnsrouter_backend_retries_total", backend=fake.addr)
        # Both tries' replies are timed; the second one's is counted late.
        assert d("dnsrouter_backend_latency_seconds_count") == \
            60 + d("dnsrouter_backend_late_replies_total", backend=fake.addr)
        # Seconds, kept in C on the compiled path: a unit or a sum gone wrong leaves these bounds.
        assert 0 < d("dnsrouter_backend_latency_seconds_sum") <= round_trips
        assert d("dnsrouter_backend_latency_seconds_bucket", le="+Inf") == 60
        assert value(now, "dnsrouter_backend_up", backend=fake.addr) == 1
        assert value(now, "dnsrouter_registry_invalid_values") == 1
        assert value(now, "dnsrouter_snapshot_version") >= 2
        assert value(now, "dnsrouter_worker_rss_bytes", worker="0") > 1e6
        compiled = 1 if packet_path == "compiled" else 0  # the same counts either way, and the gauge says which
        assert [value(now, "dnsrouter_fast_path", worker=w) for w in ("0", "1")] == [compiled, compiled]


def test_routes_and_healthz(router):
    mport = free_port("tcp")
    with FakeBackend("ok") as one, FakeBackend("drop") as two:
        r = router(args=["--metrics", f"{HOST}:{mport}"])
        r.route("1", rf"{one.addr},\.one\.$")
        r.route("2", rf"{two.addr},\.two\.$")
        r.route("3", rf"{one.addr},\.two\.$")
        r.route("4", "127.0.0.1:0,x")

        def table():
            status, body = http_get(f"http://{HOST}:{mport}/routes")
            routes = json.loads(body)
            return routes if len(routes["routes"]) == 2 and "not checked yet" not in body.decode() else None

        routes = wait_until(table, 5, message="/routes never showed the table")
        assert [x["pattern"] for x in routes["routes"]] == [r"\.one\.$", r"\.two\.$"]
        assert [[(b["address"], b["up"]) for b in x["backends"]] for x in routes["routes"]] == \
            [[(one.addr, True)], [(two.addr, False), (one.addr, True)]]
        assert "port" in routes["invalid"]["4"]
        status, body = http_get(f"http://{HOST}:{mport}/healthz")
        assert status == 200 and body.startswith(b"ok")
