"""Health checks that heal, and failover without failed queries (real Knot, fake backends)."""
from __future__ import annotations

import time

import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from support.fake_backend import FakeBackend
from support.knot import KnotServer
from support.load import Load
from support.net import ask, rcode_of, wait_until

pytestmark = pytest.mark.system

INTERVAL, RISE, FALL = 0.2, 2, 2


@pytest.fixture
def health_router(router, tmp_path):
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(f"[health]\ninterval = {INTERVAL}\ntimeout = 0.3\nfall = {FALL}\nrise = {RISE}\n"
                    "[forward]\ntimeout = 0.5\n")

    def make(**kw):
        return router(args=["--config", str(conf)], **kw)

    return make


def state_change(r, backend, old: str, new: str) -> bool:
    return f"backend {backend.addr}: {old} -> {new}" in r.log()


def test_the_health_query_is_id_server_ch_txt_over_tcp(health_router):
    with FakeBackend("ok") as fake:
        r = health_router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: fake.count("tcp") >= 2, 3, message="no health check arrived")
        checks = [q for q in fake.received if q.transport == "tcp"]
        for check in checks:
            question = check.message.question[0]
            assert question.name.to_text() == "id.server."
            assert question.rdclass == dns.rdataclass.CH and question.rdtype == dns.rdatatype.TXT
        assert rcode_of(r, "x.test.") == dns.rcode.NOERROR


@pytest.mark.parametrize("mode", ["drop", "wrong_id", "garbage"])
def test_a_backend_that_fails_checks_goes_down(health_router, mode):
    with FakeBackend("ok") as fake:
        r = health_router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: rcode_of(r, "x.test.") == dns.rcode.NOERROR, 3, message="never up")
        fake.mode = mode
        wait_until(lambda: state_change(r, fake, "up", "down"), 3, message=f"{mode} backend stays up")
        # The log line comes a moment before the workers have the new snapshot.
        wait_until(lambda: rcode_of(r, "x.test.") == dns.rcode.SERVFAIL, 2, message="down backend still used")
        started = time.monotonic()
        assert rcode_of(r, "x.test.") == dns.rcode.SERVFAIL
        # Below the forward timeout (0.5 s): answered at once, not after trying the backend.
        assert time.monotonic() - started < 0.4


def test_a_backend_answering_refused_stays_up(health_router):
    with FakeBackend("refused") as fake:
        r = health_router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: fake.count("tcp") >= 5, 5, message="not checked repeatedly")
        # REFUSED is a well-formed reply: the backend is alive, its answer relayed.
        assert rcode_of(r, "x.test.") == dns.rcode.REFUSED
        assert not state_change(r, fake, "up", "down") and state_change(r, fake, "new", "up")


def test_all_members_down_servfail_comes_at_once(health_router):
    with FakeBackend("ok") as one, FakeBackend("ok") as two:
        r = health_router()
        r.route("a", rf"{one.addr},\.test\.$")
        r.route("b", rf"{two.addr},\.test\.$")
        wait_until(lambda: rcode_of(r, "x.test.") == dns.rcode.NOERROR, 3, message="never up")
        one.mode = two.mode = "drop"
        wait_until(lambda: state_change(r, one, "up", "down") and state_change(r, two, "up", "down"), 5,
                   message="members not marked down")
        took = []
        for i in range(11):
            started = time.monotonic()
            assert rcode_of(r, f"q{i}.test.") == dns.rcode.SERVFAIL
            took.append(time.monotonic() - started)
        # The median, so that one scheduling hiccup of a loaded CI machine does
        # not count; waiting for a backend would take the forward timeout (0.5 s).
        assert sorted(took)[5] < 0.05 and max(took) < 0.5


def test_a_down_backend_comes_back_by_itself(health_router):
    with FakeBackend("drop") as fake:
        r = health_router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: "new -> down" in r.log(), 3, message="dead backend not reported")
        assert rcode_of(r, "x.test.") == dns.rcode.SERVFAIL
        fake.mode = "ok"
        wait_until(lambda: state_change(r, fake, "down", "up"), 3, message="never came back")
        # The supervisor logs the change before every worker has the new table: ask until one answers.
        wait_until(lambda: rcode_of(r, "x.test.") == dns.rcode.NOERROR, 3, message="up, but not routed")


def test_a_new_backend_takes_queries_after_its_first_check(health_router):
    with FakeBackend("ok") as fake:
        r = health_router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: rcode_of(r, "x.test.") == dns.rcode.NOERROR, 2, message="not taken")
        assert state_change(r, fake, "new", "up")


def test_a_starting_router_answers_only_once_its_backends_are_checked(router, split_zone):
    # A restart under load: queries arrive from the moment the sockets are
    # bound. None may get SERVFAIL because the first health check had not
    # passed yet, or because the routes were not read yet; they wait instead.
    zone = split_zone.zone_names[0]
    with KnotServer({zone: split_zone.zones[zone]}) as knot:
        r = router(workers=2, start=False)
        for i in range(200):  # routes to read, and checks that take a moment
            r.route(f"r{i:03d}", rf"{knot.addr},^x{i}\.{zone.replace('.', '[.]')}$")
        r.route("zz", rf"{knot.addr},\.a\.example\.com\.$")
        names = split_zone.names[zone]
        r.start(wait=False)
        rcodes = []
        for i in range(40):  # each from a new port: both workers are asked
            reply = ask(r, names[i], timeout=0.2 if not rcodes else 2.0)  # quick tries until it is bound
            if reply is not None:
                rcodes.append(dns.rcode.to_text(reply.rcode()))
            assert r.proc.poll() is None, r.log()
        assert rcodes and set(rcodes) == {"NOERROR"}, rcodes
        assert "serving routes version" in r.log()


def test_kill_one_of_two_knot_members_under_load(health_router, split_zone):
    zone = split_zone.zone_names[0]
    with KnotServer({zone: split_zone.zones[zone]}) as one, KnotServer({zone: split_zone.zones[zone]}) as two:
        r = health_router(workers=2)
        r.route("a1", rf"{one.addr},\.a\.example\.com\.$")
        r.route("a2", rf"{two.addr},\.a\.example\.com\.$")
        names = split_zone.names[zone]
        wait_until(lambda: state_change(r, one, "new", "up") and state_change(r, two, "new", "up"), 3,
                   message="members never up")
        # The log line comes a moment before the workers have the snapshot; every
        # probe comes from a new port, so ten good ones in a row mean both have it.
        wait_until(lambda: all(rcode_of(r, names[0]) == dns.rcode.NOERROR for _ in range(10)), 3,
                   message="not routed by both workers")
        with Load(r.port, names) as load:
            wait_until(lambda: load.sent > 300, 10, message="load not running")
            one.kill()
            killed, killed_at = time.monotonic(), load.sent
            wait_until(lambda: state_change(r, one, "up", "down"), 3, message="killed member stays up")
            wait_until(lambda: load.sent > killed_at + 600, 15, message="load stalled")
            failures = list(load.failures)
            one.start()
            restarted = time.monotonic()
            wait_until(lambda: state_change(r, one, "down", "up"), RISE * INTERVAL + 1.5,
                       message="restarted member not taken back")
            assert time.monotonic() - restarted < RISE * INTERVAL * 1.1 + 1
        assert not failures, f"{len(failures)} of {load.sent} client queries failed (kill at {killed:.3f}): {failures}"
        # The restarted member serves: with the other one gone, queries still succeed.
        two.kill()
        wait_until(lambda: state_change(r, two, "up", "down"), 3, message="second kill not seen")
        assert all(ask(r, n).rcode() == dns.rcode.NOERROR for n in names[:30])
