"""[limits] and [rrl] through a real router, on both packet paths: what a
client network gets over its limits, that other networks and TCP are
untouched, and what /metrics says (the flood scenarios are test_floods)."""
from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.query
import pytest

from support import metrics
from support.fake_backend import FakeBackend
from support.net import HOST, free_port, routed, wait_until

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("packet_path")]


def _burst(port: int, queries: list[bytes], source: str, timeout: float = 1.0) -> list[bytes]:
    """Send every query from one socket at ``source`` at once; the replies
    that come back within ``timeout`` of the last one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    try:
        for query in queries:
            sock.sendto(query, (HOST, port))
        replies = []
        while True:
            try:
                replies.append(sock.recv(65535))
            except socket.timeout:
                return replies
    finally:
        sock.close()


def _query(name: str, qid: int) -> bytes:
    query = dns.message.make_query(name, "A")
    query.id = qid
    return query.to_wire()


def test_client_qps_drops_over_the_limit_for_that_network_only(router):
    """client_qps 100 (burst: 100): 400 queries at once from 127.0.3.1 get
    about 100 answers, the rest dropped and counted; a client of another
    network is answered in full meanwhile, and over TCP nothing is limited."""
    metrics_port = free_port()
    with FakeBackend() as backend:
        r = router(args=["--client-qps", "100", "--metrics", f"{HOST}:{metrics_port}"])
        r.route("all", f"{backend.addr},.*")
        wait_until(lambda: routed(r, "ready.example."), timeout=10)
        flood = _burst(r.port, [_query(f"q{n}.example.", n) for n in range(400)], "127.0.3.1")
        assert 90 <= len(flood) <= 130, len(flood)  # the burst, and what the rate refills meanwhile
        other = _burst(r.port, [_query(f"o{n}.example.", n) for n in range(50)], "127.0.4.1")
        assert len(other) == 50
        tcp = [dns.query.tcp(dns.message.make_query(f"t{n}.example.", "A"), HOST, port=r.port, timeout=3)
               for n in range(20)]
        assert all(reply.answer for reply in tcp)
        wait_until(lambda: metrics.first(metrics_port, "dnsrouter_dropped_total") is not None, timeout=5)
        wait_until(lambda: metrics.value(metrics.samples(metrics_port), "dnsrouter_dropped_total",
                                         reason="client_qps") == 400 - len(flood), timeout=5)


@pytest.mark.parametrize("cache", ["cache", "no_cache"])
def test_rrl_slips_and_drops_identical_answers(router, cache):
    """responses_per_second 5: 60 identical queries at once from one network
    get 5 full answers and then, every second one (slip 2), an empty TC
    reply that a real client takes to TCP, where it gets the answer; another
    name's account is its own. Answers from the packet cache are limited
    alike (with the cache, the backend sees the name once)."""
    metrics_port = free_port()
    with FakeBackend() as backend:
        args = ["--rrl", "5", "--metrics", f"{HOST}:{metrics_port}"]
        r = router(args=args + (["--cache-size", "1000"] if cache == "cache" else []))
        r.route("all", f"{backend.addr},.*")
        wait_until(lambda: routed(r, "ready.example."), timeout=10)
        assert routed(r, "same.example.")  # from 127.0.0.1: in the cache, if there is one
        replies = [dns.message.from_wire(w) for w in
                   _burst(r.port, [_query("same.example.", n) for n in range(60)], "127.0.5.1")]
        if cache == "cache":  # all 60 were hits, limited alike
            assert sum(1 for q in backend.received if q.qname == "same.example.") == 1
        full = [m for m in replies if not m.flags & dns.flags.TC]
        slipped = [m for m in replies if m.flags & dns.flags.TC]
        assert len(full) == 5, len(full)
        assert all(not m.answer and str(m.question[0].name) == "same.example." for m in slipped)
        assert abs(len(slipped) - (60 - len(full)) / 2) <= 1
        assert len(_burst(r.port, [_query("another.example.", 1)], "127.0.5.1")) == 1
        over_tcp = dns.query.tcp(dns.message.make_query("same.example.", "A"), HOST, port=r.port, timeout=3)
        assert over_tcp.answer and not over_tcp.flags & dns.flags.TC

        def counted() -> bool:
            page = metrics.samples(metrics_port)
            return (metrics.value(page, "dnsrouter_rrl_total", action="slipped") == len(slipped)
                    and metrics.value(page, "dnsrouter_rrl_limited_total", kind="responses") >= 60 - len(full) - 1)
        wait_until(counted, timeout=5)
        assert metrics.value(metrics.samples(metrics_port), "dnsrouter_rrl_accounts") >= 1


def test_rrl_limits_the_routers_own_errors_together(router):
    """No route: SERVFAIL is an error answer; errors_per_second 3 limits all
    of one network's error answers together, whatever the name."""
    r = router(start=False)
    ini = r.dir / "limits.ini"
    ini.write_text("[rrl]\nresponses_per_second = 100\nerrors_per_second = 3\nslip = 0\n")
    r.args += ["--config", str(ini)]
    r.start()
    replies = _burst(r.port, [_query(f"n{n}.nowhere.", n) for n in range(30)], "127.0.6.1")
    assert 3 <= len(replies) <= 4  # slip 0: the limited ones are dropped
