"""Self-checks of the support package: net, processes, zones, metrics, knot, fake_backend.

If these fail, integration test failures elsewhere say nothing about
dnsrouter.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import psutil
import pytest

import support.knot
from support import metrics
from support.fake_backend import ANSWER_ADDRESS, ANSWER_ADDRESS6, FakeBackend
from support.knot import KnotServer
from support.net import free_port, query, raw_udp, wait_until
from support.processes import gone, spawn, stop
from support.zones import make_split_zone, numbered_zone, zone_text

SPLIT = make_split_zone(n=20)
ZONE_A, ZONE_B = SPLIT.zone_names


def port_is_free(port: int) -> bool:
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def identity_of(port: int) -> str:
    r = query("id.server.", "TXT", port=port, transport="tcp", rdclass="CH")
    assert r.rcode() == dns.rcode.NOERROR
    return b"".join(r.answer[0][0].strings).decode()


# -- net -----------------------------------------------------------------------

def test_free_port_is_bindable_for_udp_and_tcp():
    port = free_port()
    assert 1024 <= port <= 65535
    assert port_is_free(port)


def test_wait_until_returns_value_and_fails_at_deadline():
    calls = []
    assert wait_until(lambda: calls.append(1) or (len(calls) >= 3 and "done")) == "done"
    start = time.monotonic()
    with pytest.raises(AssertionError, match="never"):
        wait_until(lambda: False, timeout=0.2, message="never")
    assert 0.2 <= time.monotonic() - start < 2


# -- processes -------------------------------------------------------------------

@pytest.mark.system
def test_stop_escalates_to_sigkill_and_kills_the_group():
    # A shell that ignores SIGTERM, with a child of its own in its group.
    proc = spawn(["sh", "-c", "trap '' TERM; sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    started = time.monotonic()
    assert stop(proc, timeout=0.3) == -signal.SIGKILL
    assert time.monotonic() - started < 3
    wait_until(lambda: gone([child]), 3, message="the child in the group survived stop()")
    assert stop(proc) == -signal.SIGKILL  # idempotent


@pytest.mark.system
def test_a_spawned_process_dies_with_its_parent():
    # The parent, SIGKILLed, has no chance to clean up: the kernel must.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from support.processes import spawn; "
            "print(spawn(['sleep', '60']).pid, flush=True); sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        orphan = psutil.Process(int(parent.stdout.readline()))
        assert not gone([orphan])
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: gone([orphan]), 5, message="a spawned process outlived its parent")


# -- zones and metrics --------------------------------------------------------------

def test_numbered_zone_text():
    assert numbered_zone("z.example", 2, width=5, net=3) == (
        "$ORIGIN z.example.\n$TTL 300\n@ SOA ns hostmaster 1 3600 900 604800 300\n@ NS ns\n"
        "ns A 192.0.2.53\nh00001 A 10.3.0.1\nh00002 A 10.3.0.2\n")


def test_metrics_parse_and_value():
    page = ('# TYPE q counter\nq_total{transport="udp"} 3.0\nq_total{transport="tcp"} 1.0\n'
            '# TYPE v gauge\nv 7.0\n')
    samples = metrics.parse(page)
    assert metrics.value(samples, "q_total", transport="udp") == 3
    assert metrics.value(samples, "q_total", transport="other") == 0
    assert metrics.value(samples, "v") == 7
    assert metrics.lines(page, "q_total") == ['q_total{transport="udp"} 3.0', 'q_total{transport="tcp"} 1.0']


# -- knot ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def knots():
    with KnotServer({ZONE_A: SPLIT.zones[ZONE_A]}) as a, KnotServer({ZONE_B: SPLIT.zones[ZONE_B]}) as b:
        yield a, b


def test_split_zone_shape():
    assert SPLIT.zone_names == ["a.example.com.", "b.example.com."]
    assert SPLIT.names[ZONE_A][0] == "h0001.a.example.com."
    assert len(SPLIT.names[ZONE_B]) == 20
    assert SPLIT.big_txt[ZONE_B] == "big.b.example.com."


@pytest.mark.system
def test_knot_answers_its_zone(knots):
    a, b = knots
    for server, zone in ((a, ZONE_A), (b, ZONE_B)):
        for transport in ("udp", "tcp"):
            name = SPLIT.names[zone][-1]
            r = query(name, "A", port=server.port, transport=transport)
            assert r.rcode() == dns.rcode.NOERROR
            assert r.flags & dns.flags.AA
            assert [rd.address for rd in r.answer[0]] == [SPLIT.addresses[name]]
    assert a.addr == f"127.0.0.1:{a.port}"


@pytest.mark.system
def test_knot_refuses_names_outside_its_zones(knots):
    a, _ = knots
    r = query(SPLIT.names[ZONE_B][0], "A", port=a.port)
    assert r.rcode() == dns.rcode.REFUSED


@pytest.mark.system
def test_knot_identity_over_tcp_tells_servers_apart(knots):
    a, b = knots
    assert identity_of(a.port) == a.identity == f"knot-{a.port}"
    assert identity_of(b.port) == b.identity != a.identity


@pytest.mark.system
def test_big_txt_truncated_over_udp_whole_over_tcp(knots):
    a, _ = knots
    big = SPLIT.big_txt[ZONE_A]
    r = query(big, "TXT", port=a.port, use_edns=False)
    assert r.flags & dns.flags.TC
    # Knot caps UDP at 1232 bytes even when the client offers more.
    r = query(big, "TXT", port=a.port, use_edns=0, payload=4096)
    assert r.flags & dns.flags.TC
    r = query(big, "TXT", port=a.port, transport="tcp")
    assert not r.flags & dns.flags.TC
    got = sorted(b"".join(rd.strings).decode() for rd in r.answer[0])
    assert got == sorted(SPLIT.big_txt_strings[ZONE_A])
    assert 1232 < len(r.to_wire()) < 4000


@pytest.mark.system
def test_knot_kill_restart_same_port_then_stop():
    with KnotServer({ZONE_A: SPLIT.zones[ZONE_A]}) as k:
        port, pid = k.port, k.pid
        k.kill()
        assert not k.running()
        with pytest.raises(ConnectionRefusedError):
            query(ZONE_A, "SOA", port=port, transport="tcp", timeout=1)
        k.start()
        assert (k.port, k.identity) == (port, f"knot-{port}")
        assert k.pid != pid
        assert query(SPLIT.names[ZONE_A][0], port=port).answer
        k.stop()
        assert not k.running()
        assert port_is_free(port)
        k.start()  # stop() too leaves it restartable
        assert identity_of(port) == k.identity
        workdir = k.dir
    assert not k.running()
    assert not os.path.exists(workdir)


def test_missing_knotd_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setattr(support.knot.shutil, "which", lambda name: None)
    monkeypatch.setattr(support.knot.os, "access", lambda path, mode: False)
    with pytest.raises(RuntimeError, match="knotd not found"):
        support.knot.knotd_path()


@pytest.mark.system
def test_knot_listens_on_extra_ports_too():
    extra = free_port()
    with KnotServer({ZONE_A: SPLIT.zones[ZONE_A]}, extra_ports=[extra]) as k:
        for port in (k.port, extra):
            assert [rd.address for rd in query(SPLIT.names[ZONE_A][0], port=port).answer[0]] == \
                [SPLIT.addresses[SPLIT.names[ZONE_A][0]]]


@pytest.mark.system
def test_bad_zone_fails_fast_with_log():
    k = KnotServer({"bad.example.": "this is not a zone file\n"}, startup_timeout=5)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="could not load a zone(.|\n)*unsupported record type"):
        k.start()
    assert time.monotonic() - start < 3
    assert not k.running()
    k.close()


def proxy_v2(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """A PROXY v2 header for UDP over IPv4, built by hand from the specification."""
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x12]) + (12).to_bytes(2, "big")
            + socket.inet_aton(source) + socket.inet_aton(destination)
            + source_port.to_bytes(2, "big") + destination_port.to_bytes(2, "big"))


def a_addresses(wire: bytes | None) -> list[str]:
    assert wire is not None, "no reply"
    return [rd.address for rrset in dns.message.from_wire(wire).answer for rd in rrset]


@pytest.mark.system
def test_knot_whoami_believes_a_proxy_header_from_its_allowlist_only():
    zone = "whoami.test."
    q = dns.message.make_query(zone, "A").to_wire()
    with KnotServer({zone: zone_text(zone, [])}, whoami=[zone], proxy_allowlist="127.0.0.0/8") as k:
        assert "proxy-allowlist: [127.0.0.0/8]" in Path(k.conf_path).read_text()
        assert a_addresses(raw_udp(k.port, q)) == ["127.0.0.1"]
        assert a_addresses(raw_udp(k.port, proxy_v2("127.1.2.3", 4000, "127.0.0.1", 53) + q)) == ["127.1.2.3"]
        assert a_addresses(raw_udp(k.port, proxy_v2("203.0.113.9", 4000, "127.0.0.1", 53) + q)) == ["203.0.113.9"]
        assert [rd.address for rd in query(zone, port=k.port, transport="tcp").answer[0]] == ["127.0.0.1"]
    with KnotServer({zone: zone_text(zone, [])}, whoami=[zone]) as k:
        assert a_addresses(raw_udp(k.port, q)) == ["127.0.0.1"]
        # Not allowed to proxy: Knot drops the datagram (what a router that
        # sent a header to the wrong backend would see).
        assert raw_udp(k.port, proxy_v2("127.1.2.3", 4000, "127.0.0.1", 53) + q, timeout=0.3) is None


@pytest.mark.system
def test_knot_geoip_answers_by_ecs_else_by_source_and_echoes_the_scope():
    zone, owner = "geo.test.", "where.geo.test."
    views = {owner: [("127.0.0.0/24", {"A": "198.51.100.10"}), ("127.0.0.1/32", {"A": "198.51.100.1"}),
                     ("127.0.1.0/24", {"A": ["198.51.100.11", "198.51.100.12"]})]}
    with KnotServer({zone: zone_text(zone, [])}, edns_client_subnet=True,
                    geoip={zone: support.knot.geoip_subnets(views)}) as k:
        assert "edns-client-subnet: on" in Path(k.conf_path).read_text()
        for transport in ("udp", "tcp"):
            assert [rd.address for rd in query(owner, port=k.port, transport=transport).answer[0]] == \
                ["198.51.100.1"]
            for net, expected in (("127.0.0.0", ["198.51.100.10"]), ("127.0.1.0", ["198.51.100.11", "198.51.100.12"])):
                r = query(owner, port=k.port, transport=transport, use_edns=0,
                          options=[dns.edns.ECSOption(net, 24)])
                assert sorted(rd.address for rd in r.answer[0]) == expected
                (echo,) = [o for o in r.options if o.otype == dns.edns.OptionType.ECS]
                assert (echo.address, echo.srclen, echo.scopelen) == (net, 24, 24)
        # No ECS, another source: that source's network.
        r = dns.query.udp(dns.message.make_query(owner, "A"), "127.0.0.1", port=k.port, source="127.0.1.5", timeout=2)
        assert sorted(rd.address for rd in r.answer[0]) == ["198.51.100.11", "198.51.100.12"]


@pytest.mark.system
def test_knot_bad_module_config_fails_before_knotd_starts():
    zone = "geo.test."
    k = KnotServer({zone: zone_text(zone, [])}, geoip={zone: "where.geo.test.:\n  - subnet: 127.0.0.0/24\n    A: [192.0.2.1]\n"})
    with pytest.raises(RuntimeError, match="conf-check(.|\n)*invalid key type 'subnet'"):
        k.start()
    assert k.proc is None
    k.close()
    with pytest.raises(ValueError, match="not one of the zones"):
        KnotServer({zone: zone_text(zone, [])}, whoami=["other.test."])


# -- fake_backend --------------------------------------------------------------

@pytest.mark.system
def test_fake_ok_answers_and_records():
    with FakeBackend("ok") as b:
        for transport in ("udp", "tcp"):
            q = dns.message.make_query("anything.example.", "A")
            r = query(q, port=b.port, transport=transport)
            assert r.id == q.id and r.question == q.question
            assert r.rcode() == dns.rcode.NOERROR
            assert [rd.address for rd in r.answer[0]] == [ANSWER_ADDRESS]
        assert identity_of(b.port) == b.identity == f"fake-{b.port}"
        assert (b.count("udp"), b.count("tcp"), b.count()) == (1, 2, 3)
        first = b.received[0]
        assert (first.transport, first.qname) == ("udp", "anything.example.")
        assert first.message.question[0].rdtype == dns.rdatatype.A
        assert b.addr == f"127.0.0.1:{b.port}"


@pytest.mark.system
def test_fake_records_unparsable_queries_without_answering():
    with FakeBackend("ok") as b:
        assert raw_udp(b.port, b"\x01\x02\x03", timeout=0.3) is None  # no answer
        assert b.received[0].message is None and b.received[0].wire == b"\x01\x02\x03"


@pytest.mark.system
def test_fake_drop_never_answers_udp_or_tcp():
    with FakeBackend("drop") as b:
        with pytest.raises(dns.exception.Timeout):
            query("x.example.", port=b.port, timeout=0.3)
        with pytest.raises(dns.exception.Timeout):
            query("x.example.", port=b.port, transport="tcp", timeout=0.3)
        wait_until(lambda: b.count() == 2, timeout=2, message="drop mode did not record both queries")


@pytest.mark.system
def test_fake_delay_answers_late_without_serialising():
    with FakeBackend("delay", delay=0.4) as b:
        start = time.monotonic()
        # Two queries in flight at once: both must come back after ~one delay.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            for name in ("one.example.", "two.example."):
                s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", b.port))
            replies = [dns.message.from_wire(s.recv(65535)) for _ in range(2)]
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 0.8  # one after the other would take 0.8 s
        assert all(r.answer for r in replies)


@pytest.mark.system
def test_fake_wrong_id_refused_garbage():
    q = dns.message.make_query("x.example.", "A")
    with FakeBackend("wrong_id") as b:
        r = dns.message.from_wire(raw_udp(b.port, q.to_wire()))
        assert r.id != q.id and r.question == q.question
        b.mode = "refused"
        r = query("x.example.", port=b.port, transport="tcp")
        assert r.rcode() == dns.rcode.REFUSED
        b.mode = "garbage"
        data = raw_udp(b.port, q.to_wire())
        assert 1 <= len(data) <= 64
        try:
            assert not q.is_response(dns.message.from_wire(data))
        except dns.exception.DNSException:
            pass  # the usual outcome: not a DNS message at all
        # TCP garbage keeps the length framing, so a client reads exactly it.
        with socket.create_connection(("127.0.0.1", b.port), timeout=2) as s:
            wire = q.to_wire()
            s.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", s.recv(2))
            assert 1 <= length <= 64


@pytest.mark.system
def test_fake_mode_switch_at_runtime_and_stop_frees_port():
    b = FakeBackend("ok").start()
    try:
        assert query("x.example.", port=b.port, timeout=1).answer
        b.mode = "drop"
        with pytest.raises(dns.exception.Timeout):
            query("x.example.", port=b.port, timeout=0.3)
        b.mode = "ok"
        assert query("x.example.", port=b.port, timeout=1).answer
        with pytest.raises(ValueError):
            b.mode = "nonsense"
    finally:
        b.stop()
    assert not b._thread.is_alive()
    assert port_is_free(b.port)


@pytest.mark.system
def test_fake_udp_only():
    with FakeBackend("ok", transports=("udp",)) as b:
        assert query("x.example.", port=b.port).answer
        with pytest.raises(ConnectionRefusedError):
            query("x.example.", port=b.port, transport="tcp", timeout=1)


@pytest.mark.system
def test_fake_on_the_ipv6_loopback():
    with FakeBackend("ok", host="::1") as b:
        assert b.addr == f"[::1]:{b.port}"
        for transport in ("udp", "tcp"):
            r = query("x.example.", "AAAA", port=b.port, transport=transport, host="::1")
            assert [rd.address for rd in r.answer[0]] == [ANSWER_ADDRESS6]
        assert b.received[0].peer[0] == "::1" and b.count() == 2
    with pytest.raises(ValueError, match="loopback"):
        FakeBackend(host="0.0.0.0")
