"""The packet cache in front of a real, signed Knot (issue 27), on both packet
paths: hits while the backend is stopped, exactly the backend's bytes but
for the ID and the question's case, DO kept apart, the client's UDP size,
NXDOMAIN, cookies, NOTIFY from [cache] notify_allow or not, dnsrouterctl purge."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from typing import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from support.knot_xfr import KnotPrimary, KnotSecondary
from support.metrics import samples, value
from support.net import HOST, free_port, wait_until
from support.processes import program
from support.zones import zone_text

pytestmark = pytest.mark.system

ORIGIN = "cache.test."
ZONE = zone_text(ORIGIN, [
    "www A 192.0.2.1",
    "mail A 192.0.2.25",
    "alias CNAME www",
    "big TXT " + " ".join(f'"{n}{"x" * 199}"' for n in range(5)),  # about 1,170 bytes with DO: over 512
])
ROUTE = r"(^|\.)cache\.test\.$"


@pytest.fixture(scope="module")
def backend() -> Iterator[KnotPrimary]:
    """One signed zone for the tests that do not change it (with mod-cookies)."""
    with KnotPrimary(ORIGIN, ZONE, cookies=True) as primary:
        yield primary


@contextlib.contextmanager
def paused(process: KnotPrimary) -> Iterator[None]:
    """The backend stopped (SIGSTOP): whatever answers now is the cache."""
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def cached_router(router, primary: KnotPrimary, tmp_path, workers: int = 1, notify_allow: str = "127.0.0.1/32",
                  metrics: int | None = None):
    ini = tmp_path / "dnsrouter.ini"
    ini.write_text(f"[cache]\nsize = 1000\nnotify_allow = {notify_allow}\n[forward]\ntimeout = 0.5\n")
    args = ["--config", str(ini)] + (["--metrics", f"{HOST}:{metrics}"] if metrics else [])
    r = router(workers=workers, args=args)
    r.route("zone", f"{primary.addr},{ROUTE}")
    wait_until(lambda: ask(r, "www.cache.test.").rcode() == dns.rcode.NOERROR, timeout=10)
    return r


def ask(r, name: str, rdtype: str = "A", *, source: str = HOST, source_port: int = 0, timeout: float = 2.0,
        **query) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **query)
    return dns.query.udp(q, HOST, port=r.port, timeout=timeout, source=source, source_port=source_port,
                         ignore_trailing=True)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset)


def test_a_cached_name_answers_while_the_backend_is_stopped(router, backend, tmp_path, packet_path):
    r = cached_router(router, backend, tmp_path)
    signed = ask(r, "www.cache.test.", want_dnssec=True)
    plain = ask(r, "www.cache.test.")
    missing = ask(r, "nope.cache.test.", want_dnssec=True)
    big = ask(r, "big.cache.test.", "TXT", want_dnssec=True, payload=1232)
    assert missing.rcode() == dns.rcode.NXDOMAIN and len(big.to_wire()) > 512
    assert any(rrset.rdtype == dns.rdatatype.RRSIG for rrset in signed.answer)
    with paused(backend):
        again = ask(r, "WwW.CaChE.TeSt.", want_dnssec=True)
        assert str(again.question[0].name) == "WwW.CaChE.TeSt."  # the client's spelling back (0x20)
        assert again.answer == signed.answer and [s.ttl for s in again.answer] == [s.ttl for s in signed.answer]
        # DO and no DO are two entries: the one without has no signatures.
        unsigned = ask(r, "www.cache.test.")
        assert unsigned.answer == plain.answer
        assert not any(rrset.rdtype == dns.rdatatype.RRSIG for rrset in unsigned.answer)
        nxdomain = ask(r, "NOPE.cache.test.", want_dnssec=True)
        assert nxdomain.rcode() == dns.rcode.NXDOMAIN and nxdomain.authority == missing.authority
        assert ask(r, "big.cache.test.", "TXT", want_dnssec=True, payload=1232).answer == big.answer
        # A 512-byte client: the cached reply does not fit, so it is a miss,
        # forwarded to the stopped backend: SERVFAIL at the timeout, never
        # more than it can take.
        small = ask(r, "big.cache.test.", "TXT", want_dnssec=True, payload=512)
        assert small.rcode() == dns.rcode.SERVFAIL and len(small.to_wire()) <= 512
        assert ask(r, "big.cache.test.", "TXT", use_edns=False).rcode() == dns.rcode.SERVFAIL


def _raw_exchange(port: int, query: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query, (HOST, port))
        return s.recv(65535)


def _spelled(name: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flip else c for c, flip in zip(name, flips + [False] * len(name)))


_NAMES = st.sampled_from([("www.cache.test.", "A"), ("mail.cache.test.", "A"), ("alias.cache.test.", "A"),
                          ("nope.cache.test.", "A"), ("www.cache.test.", "AAAA"), ("cache.test.", "SOA"),
                          ("cache.test.", "DNSKEY"), ("big.cache.test.", "TXT"), ("x.nope.cache.test.", "TXT")])


def test_a_cached_reply_is_the_backends_but_for_the_id_and_the_questions_case(router, backend, tmp_path,
                                                                               packet_path):
    """The router's cached reply to a query, with the backend stopped, has
    the very bytes the backend sends for the same query once it runs again."""
    r = cached_router(router, backend, tmp_path)
    hits = []

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_NAMES, st.lists(st.booleans(), max_size=20), st.booleans(), st.integers(0, 0xFFFF),
           st.sampled_from([1232, 4096]))
    def check(question, flips, dnssec, qid, payload):
        name, rdtype = question
        warm = dns.message.make_query(name, rdtype, want_dnssec=dnssec, payload=payload)
        assert _raw_exchange(r.port, warm.to_wire())  # a miss: the backend's answer is cached
        query = dns.message.make_query(_spelled(name, flips), rdtype, want_dnssec=dnssec, payload=payload)
        query.id = qid
        wire = query.to_wire()
        with paused(backend):
            cached = _raw_exchange(r.port, wire)
        direct = _raw_exchange(backend.port, wire)
        event(f"{dns.rcode.to_text(dns.message.from_wire(direct).rcode())}, DO {dnssec}")
        assert cached == direct
        hits.append(name)

    check()
    assert len(hits) >= 20  # the examples reached the comparison


def test_two_clients_with_their_own_cookies_each_get_their_own(router, backend, tmp_path, packet_path):
    r = cached_router(router, backend, tmp_path)
    # Knot (mod-cookies) wants its server cookie: a client cookie alone gets
    # BADCOOKIE with one (not cached), and the query again with it the answer.
    hello = ask(r, "mail.cache.test.", options=[dns.edns.GenericOption(10, b"AAAAAAAA")])
    assert hello.rcode() == dns.rcode.BADCOOKIE
    (cookie,) = [o.to_wire() for o in hello.options if o.otype == 10]
    assert cookie[:8] == b"AAAAAAAA" and len(cookie) > 8
    first = ask(r, "mail.cache.test.", options=[dns.edns.GenericOption(10, cookie)])
    assert first.rcode() == dns.rcode.NOERROR and addresses(first) == ["192.0.2.25"]
    assert [o.to_wire()[:8] for o in first.options if o.otype == 10] == [b"AAAAAAAA"]
    with paused(backend):
        second = ask(r, "mail.cache.test.", options=[dns.edns.GenericOption(10, b"BBBBBBBB")])
        assert second.answer == first.answer
        assert [o.to_wire() for o in second.options if o.otype == 10] == [b"BBBBBBBB"]  # its own, and no other
        third = ask(r, "mail.cache.test.", use_edns=0)
        assert third.answer == first.answer and not [o for o in third.options if o.otype == 10]


def _notify(r, zone: str, source: str) -> dns.message.Message:
    q = dns.message.make_query(zone, "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    q.flags |= dns.flags.AA  # after set_opcode, which writes the same field
    return dns.query.udp(q, HOST, port=r.port, timeout=2, source=source)


def _warm_every_worker(r, metrics: int, name: str, workers: int) -> None:
    """Ask ``name`` from new source ports until every worker has cached it."""
    def cached_everywhere() -> bool:
        for _ in range(8):
            ask(r, name)
        return value(samples(metrics), "dnsrouter_cache_entries") >= workers
    wait_until(cached_everywhere, timeout=10)


def test_notify_from_notify_allow_purges_the_zone_in_every_worker_and_from_elsewhere_nothing(
        router, tmp_path, packet_path):
    metrics = free_port()
    with KnotPrimary(ORIGIN, ZONE) as primary:
        r = cached_router(router, primary, tmp_path, workers=2, metrics=metrics)
        _warm_every_worker(r, metrics, "www.cache.test.", 2)
        primary.update(["del www.cache.test. A", "add www.cache.test. 300 A 192.0.2.2"])
        assert addresses(ask(r, "www.cache.test.")) == ["192.0.2.1"]  # the cache still says so

        refused = _notify(r, ORIGIN, "127.0.0.2")  # outside 127.0.0.1/32
        assert refused.rcode() == dns.rcode.REFUSED
        assert {tuple(addresses(ask(r, "www.cache.test."))) for _ in range(20)} == {("192.0.2.1",)}

        allowed = _notify(r, ORIGIN, HOST)
        assert allowed.rcode() == dns.rcode.NOERROR and allowed.flags & dns.flags.AA
        assert allowed.opcode() == dns.opcode.NOTIFY
        # At once, at every worker (20 source ports reach both): the reloaded zone.
        assert {tuple(addresses(ask(r, "www.cache.test."))) for _ in range(20)} == {("192.0.2.2",)}
        wait_until(lambda: value(samples(metrics), "dnsrouter_cache_purges_total", cause="notify") == 2,
                   timeout=5)


def test_knot_notifies_the_router_of_a_new_serial(router, tmp_path, packet_path):
    """The backend's own NOTIFY (Knot's `notify:` to the router's address)
    purges the zone: the documented way to pair the cache with backends that
    reload, dnsrouter-feed's secondaries among them."""
    port = free_port()
    with KnotPrimary(ORIGIN, ZONE, notify=[(HOST, port)]) as primary:
        ini = tmp_path / "dnsrouter.ini"
        ini.write_text("[cache]\nsize = 1000\nnotify_allow = 127.0.0.1\n")
        r = router(args=["--config", str(ini)], port=port)
        r.route("zone", f"{primary.addr},{ROUTE}")
        wait_until(lambda: addresses(ask(r, "mail.cache.test.")) == ["192.0.2.25"], timeout=10)
        primary.update(["del mail.cache.test. A", "add mail.cache.test. 300 A 192.0.2.26"])
        # Cached for 300 s unless Knot's NOTIFY (about a second after the change) purges it.
        wait_until(lambda: addresses(ask(r, "mail.cache.test.")) == ["192.0.2.26"], timeout=15)


def test_dnsrouterctl_purge_a_name_then_a_subtree(router, tmp_path, packet_path):
    metrics = free_port()
    with KnotPrimary(ORIGIN, ZONE) as primary:
        r = cached_router(router, primary, tmp_path, workers=2, metrics=metrics)
        _warm_every_worker(r, metrics, "www.cache.test.", 2)
        _warm_every_worker(r, metrics, "mail.cache.test.", 4)
        primary.update(["del www.cache.test. A", "add www.cache.test. 300 A 192.0.2.2",
                        "del mail.cache.test. A", "add mail.cache.test. 300 A 192.0.2.26"])

        def ctl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(program("dnsrouterctl")), "--metrics", f"{HOST}:{metrics}", "purge", *args],
                                  capture_output=True, text=True, timeout=30)

        out = ctl("WWW.cache.test")
        assert out.returncode == 0, out.stderr
        assert {tuple(addresses(ask(r, "www.cache.test."))) for _ in range(20)} == {("192.0.2.2",)}
        assert {tuple(addresses(ask(r, "mail.cache.test."))) for _ in range(20)} == {("192.0.2.25",)}
        out = ctl("cache.test.", "--subtree")
        assert out.returncode == 0, out.stderr
        assert {tuple(addresses(ask(r, "mail.cache.test."))) for _ in range(20)} == {("192.0.2.26",)}
        bad = ctl("a" * 70 + ".test.")
        assert bad.returncode == 2 and "not a domain name" in bad.stderr and "Traceback" not in bad.stderr

        def counted() -> bool:  # what the workers report, about once a second
            page = samples(metrics)
            return (value(page, "dnsrouter_cache_lookups_total", result="hit") > 0
                    and value(page, "dnsrouter_cache_lookups_total", result="miss") >= 4
                    and value(page, "dnsrouter_cache_purges_total", cause="ctl") == 4  # 2 purges x 2 workers
                    and value(page, "dnsrouter_cache_purged_entries_total", cause="ctl") >= 4
                    and value(page, "dnsrouter_cache_entries") >= 2 and value(page, "dnsrouter_cache_bytes") > 0)
        wait_until(counted, timeout=5, message="the cache's metrics did not show the lookups and purges")


def test_a_secondary_notifies_the_router_after_each_transfer(router, tmp_path, packet_path):
    """docs/cache.md's Knot lines: the router's backend is a secondary (as
    dnsrouter-feed's are) that NOTIFYs the router once it has the new serial."""
    port, primary_port = free_port(), free_port()
    with KnotSecondary(ORIGIN, HOST, primary_port, notify=[(HOST, port)]) as secondary, \
            KnotPrimary(ORIGIN, ZONE, port=primary_port, notify=[(HOST, secondary.port)]) as primary:
        secondary.wait_serial(primary.serial())
        ini = tmp_path / "dnsrouter.ini"
        ini.write_text("[cache]\nsize = 1000\nnotify_allow = 127.0.0.1\n")
        r = router(args=["--config", str(ini)], port=port)
        r.route("zone", f"{secondary.addr},{ROUTE}")
        wait_until(lambda: addresses(ask(r, "mail.cache.test.")) == ["192.0.2.25"], timeout=10)
        serial = primary.update(["del mail.cache.test. A", "add mail.cache.test. 300 A 192.0.2.26"])
        secondary.wait_serial(serial)
        wait_until(lambda: addresses(ask(r, "mail.cache.test.")) == ["192.0.2.26"], timeout=15)
