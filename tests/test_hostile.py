"""Hostile input: spoofed replies, unpredictable IDs and ports, limits, ACL."""
from __future__ import annotations

import collections
import socket
import struct
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from support.fake_backend import FakeBackend
from support.metrics import http_get, samples, value
from support.net import HOST, free_port, raw_udp, wait_until

# Every test here runs against both UDP packet paths (conftest.PACKET_PATHS).
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("packet_path")]


def configured(router, tmp_path, text: str, answers: bool = True, args=(), **kw):
    """A router with this INI text (and these flags) and metrics; ready when it
    answers, or when /healthz says so for one that answers nobody (an ACL that drops)."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(text)
    mport = free_port("tcp")
    r = router(args=["--config", str(conf), "--metrics", f"{HOST}:{mport}", *args], start=answers, **kw)
    r.mport = mport
    if not answers:
        r.start(wait=False)
        def healthy():
            assert r.proc.poll() is None, r.log()
            try:
                return http_get(f"http://{HOST}:{mport}/healthz")[0] == 200
            except OSError:
                return False  # not listening yet

        wait_until(healthy, 15, message="router never healthy")
    return r


def counter(r, name: str, **labels) -> float:
    return value(samples(r.mport), name, **labels)


def test_spoofed_replies_are_ignored_and_counted(router, tmp_path):
    with FakeBackend("ok") as fake:
        r = configured(router, tmp_path, "[forward]\ntimeout = 3\n")
        r.route("a", rf"{fake.addr},\.test\.$")
        # "up" in the supervisor's log is not yet the worker's table: wait for an answer through it
        wait_until(lambda: dns.query.udp(dns.message.make_query("warm.test.", "A"), HOST, port=r.port,
                                         timeout=1).rcode() == dns.rcode.NOERROR, 5, message="backend never used")
        fake.mode = "drop"  # the test answers in its place (health checks are seconds apart)
        fake.clear()
        query = dns.message.make_query("victim.test.", "HTTPS")  # type 65: 0x41, an upper-case letter's byte
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(3)
            client.sendto(query.to_wire(), (HOST, r.port))
            forwarded = wait_until(lambda: [q for q in fake.received if q.transport == "udp"], 3,
                                   message="query not forwarded")[0]
            upstream = forwarded.peer
            good = dns.message.make_response(forwarded.message)
            good.answer.append(dns.rrset.from_text("victim.test.", 60, "IN", "A", "192.0.2.7"))
            forged = dns.message.make_response(forwarded.message)
            forged.answer.append(dns.rrset.from_text("victim.test.", 60, "IN", "A", "203.0.113.66"))
            wrong_id = forged.to_wire()
            wrong_id = struct.pack("!H", (forwarded.message.id + 1) % 65536) + wrong_id[2:]
            other_question = dns.message.make_response(dns.message.make_query("other.test.", "A"))
            other_question.id = forwarded.message.id
            other_type = bytearray(good.to_wire())  # the question's type 65 as 97: ASCII lower-casing confuses them
            other_type[12 + len(query.question[0].name.to_wire()) + 1] |= 0x20
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.sendto(forged.to_wire(), upstream)  # right ID, wrong source port
            fake._udp.sendto(wrong_id, upstream)  # right source, wrong ID
            fake._udp.sendto(other_question.to_wire(), upstream)  # right source and ID, other question
            fake._udp.sendto(bytes(other_type), upstream)  # right source and ID, other type
            fake._udp.sendto(good.to_wire(), upstream)  # the real answer, last
            reply = dns.message.from_wire(client.recv(65535))
        assert reply.id == query.id
        assert reply.answer[0][0].address == "192.0.2.7"

        def counted():
            return [counter(r, "dnsrouter_ignored_replies_total", reason=why)
                    for why in ("wrong_source", "unknown_id", "wrong_question")] == [1, 1, 2]

        wait_until(counted, 5, interval=0.2, message="spoofs not counted")


def test_upstream_ids_and_source_ports_are_unpredictable(router):
    with FakeBackend("ok") as fake:
        r = router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: raw_udp(r.port, dns.message.make_query("w.test.", "A").to_wire(), 0.3), 3)
        wait_until(lambda: dns.query.udp(dns.message.make_query("w.test.", "A"), HOST, port=r.port,
                                         timeout=1).rcode() == dns.rcode.NOERROR, 3, message="not routed")
        fake.clear()
        n = 2000
        client_id = 4242  # the same client ID every time: the router must not reuse it
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            for i in range(n):
                query = dns.message.make_query(f"q{i}.test.", "A")
                query.id = client_id
                s.sendto(query.to_wire(), (HOST, r.port))
                s.recv(65535)
        sent = [q for q in fake.received if q.transport == "udp"]
        # Every query reached the backend; one slow to answer under load may
        # also have gone out again as an early retry (under another ID).
        assert len({q.message.question[0].name for q in sent}) == n and len(sent) <= n * 1.05
        ids = [q.message.id for q in sent]
        ports = collections.Counter(q.peer[1] for q in sent)
        # Source ports: several, each used for a fair share.
        assert len(ports) >= 4 and all(c > n / len(ports) / 2 for c in ports.values())
        # IDs: nearly all distinct (about 30 repeats expected by chance), none the client's.
        assert len(set(ids)) > n - 80 and ids.count(client_id) < 3
        # Spread over the whole 16-bit space: each of 16 slices gets its share (chi-square, 15 df).
        slices = collections.Counter(i >> 12 for i in ids)
        chi2 = sum((slices[k] - n / 16) ** 2 / (n / 16) for k in range(16))
        assert chi2 < 40  # p < 0.001 for a uniform source
        # And not a sequence: successive differences take many values.
        assert len({(b - a) % 65536 for a, b in zip(ids, ids[1:])}) > n * 0.9


def test_in_flight_cap_drops_and_counts(router, tmp_path):
    with FakeBackend("ok") as fake:
        r = configured(router, tmp_path, "[server]\nmax_in_flight = 8\n[forward]\ntimeout = 2\n")
        r.route("a", rf"{fake.addr},\.test\.$")
        # Not "up" in the supervisor's log, which can come before the workers have
        # the route (then the burst gets SERVFAIL, nothing to drop): an answer through it.
        wait_until(lambda: dns.query.udp(dns.message.make_query("warm.test.", "A"), HOST, port=r.port,
                                         timeout=1).rcode() == dns.rcode.NOERROR, 5, message="backend never used")
        fake.mode = "drop"
        fake.clear()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(200):
                s.sendto(dns.message.make_query(f"q{i}.test.", "A").to_wire(), (HOST, r.port))
        wait_until(lambda: counter(r, "dnsrouter_dropped_total", reason="in_flight_limit") > 150, 5,
                   interval=0.2, message="drops beyond the cap not counted")
        # Each admitted query goes out twice: its first try and its early retry.
        assert fake.count("udp") <= 2 * (8 + 1)


def test_tcp_connection_cap_idle_timeout_and_slow_clients(router, tmp_path):
    with FakeBackend("ok") as fake:
        r = configured(router, tmp_path, "[server]\ntcp_connections = 3\ntcp_idle_timeout = 0.5\n")
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: "new -> up" in r.log(), 3, message="backend never up")
        held = [socket.create_connection((HOST, r.port), timeout=3) for _ in range(3)]
        try:
            extra = socket.create_connection((HOST, r.port), timeout=3)
            assert extra.recv(1) == b""  # over the cap: closed at once
            extra.close()
            started = time.monotonic()
            for conn in held:  # idle ones are closed after the idle timeout
                assert conn.recv(1) == b""
            assert time.monotonic() - started < 2.5
        finally:
            for conn in held:
                conn.close()
        # A client dribbling one byte at a time cannot keep its slot.
        slow = socket.create_connection((HOST, r.port), timeout=5)
        query = dns.message.make_query("slow.test.", "A").to_wire()
        message = struct.pack("!H", len(query)) + query
        started = time.monotonic()
        closed = False
        for byte in message:
            try:
                slow.send(bytes([byte]))
                # The attack itself: one byte every 0.3 s, unless the router hangs up first.
                slow.settimeout(0.3)
                closed = slow.recv(65535) == b""
            except socket.timeout:
                continue
            except OSError:
                closed = True
            break
        if not closed:
            slow.settimeout(3)
            closed = slow.recv(65535) == b""
        slow.close()
        assert closed and time.monotonic() - started < 5
        answer = dns.query.tcp(dns.message.make_query("ok.test.", "A"), HOST, port=r.port, timeout=3)
        assert answer.rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("action", ["refuse", "drop"])
def test_acl_denies_others(router, tmp_path, action):
    with FakeBackend("ok") as fake:
        # Listening on ::1 too, which the ACL allows: the same worker then shows
        # it forwards to the backend, so that what 127.0.0.1 gets is the ACL's doing.
        port = free_port()
        r = configured(router, tmp_path, f"[server]\nallow = 10.0.0.0/8 192.0.2.1 ::1\ndeny_action = {action}\n",
                       answers=action == "refuse", port=port, args=["--listen", f"[::1]:{port}"])
        r.route("a", rf"{fake.addr},\.test\.$")
        query = dns.message.make_query("x.test.", "A")
        wait_until(lambda: (m := raw_udp(r.port, query.to_wire(), 0.3, host="::1"))
                   and dns.message.from_wire(m).rcode() == dns.rcode.NOERROR, 5,
                   message="the allowed client on ::1 was not forwarded to")
        forwarded = fake.count("udp")
        assert forwarded >= 1
        reply = raw_udp(r.port, query.to_wire(), timeout=0.5)
        if action == "refuse":
            assert dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
        else:
            assert reply is None
        with pytest.raises((ConnectionError, EOFError, dns.exception.DNSException, OSError)):
            dns.query.tcp(query, HOST, port=r.port, timeout=1)
        assert fake.count("udp") == forwarded


def test_acl_allows_listed_clients(router, tmp_path):
    with FakeBackend("ok") as fake:
        r = configured(router, tmp_path, "[server]\nallow = 10.0.0.0/8, 127.0.0.0/8\n")
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: (m := raw_udp(r.port, dns.message.make_query("x.test.", "A").to_wire(), 0.3))
                   and dns.message.from_wire(m).rcode() == dns.rcode.NOERROR, 3, message="allowed client refused")
        assert dns.query.tcp(dns.message.make_query("x.test.", "A"), HOST, port=r.port,
                             timeout=2).rcode() == dns.rcode.NOERROR
