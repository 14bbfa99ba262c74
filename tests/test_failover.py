"""Failover within milliseconds: what resolvers see when a backend dies, stops or loses packets.

A resolver asks once and gives up after a few hundred milliseconds, long
before a health check (default settings: every 2 s, 3 failures) notices
anything. So these tests keep the DEFAULT [health] settings: the early
retry (SRTT + 4 x RTTVAR, at least [forward] retry_min) and the ICMP
port-unreachable retry must carry every query on their own.
"""
from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import time

import dns.rcode
import pytest

from support import metrics
from support.fake_backend import FakeBackend
from support.knot import KnotServer
from support.load import Load
from support.net import HOST, free_port, rcode_of, wait_until
from support.processes import spawn, stop
from support.router import Router
from support.unbound import UnboundServer
from support.zones import zone_text

# Every test here runs against both UDP packet paths (conftest.PACKET_PATHS).
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("packet_path")]

WORKERS = 2
ZONE_RE = r"(^|\.)a\.example\.com\.$"  # the apex too: Unbound's probe asks it


# -- helpers -------------------------------------------------------------------

def metrics_router(router, workers: int = WORKERS) -> tuple[Router, int]:
    mport = free_port("tcp")
    return router(workers=workers, args=["--metrics", f"{HOST}:{mport}"]), mport


def counter(mport: int, name: str, **labels: str) -> float:
    return metrics.value(metrics.samples(mport), name, **labels)


def wait_members_up(r, members, probe: str) -> None:
    """Every member up, and both workers with that snapshot (each probe comes
    from a new port, so ten good ones in a row mean every worker has it)."""
    wait_until(lambda: all(f"backend {m.addr}: new -> up" in r.log() for m in members), 5,
               message=f"members never up:\n{r.log()}")
    wait_until(lambda: all(rcode_of(r, probe) == dns.rcode.NOERROR for _ in range(10)), 5,
               message="not routed by every worker")


def summary(load: Load) -> str:
    lat = sorted(load.latencies)
    if not lat:
        return f"{load.sent} sent, none answered"
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return (f"{load.sent} sent, {len(load.failures)} failed; latency p50 {q[49] * 1e3:.1f} ms, "
            f"p99 {q[98] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms")


def router_lines(r, *words: str) -> str:
    return "\n".join(line for line in r.log().splitlines() if any(w in line for w in words))


# -- 1. a member dies or stops under resolver-like clients ----------------------

def test_a_sigkilled_member_fails_no_query_of_clients_that_wait_200ms(router, split_zone):
    zone = split_zone.zone_names[0]
    names = split_zone.names[zone]
    with KnotServer({zone: split_zone.zones[zone]}) as one, KnotServer({zone: split_zone.zones[zone]}) as two:
        r, mport = metrics_router(router)
        r.route("a1", f"{one.addr},{ZONE_RE}")
        r.route("a2", f"{two.addr},{ZONE_RE}")
        wait_members_up(r, (one, two), names[0])
        # A resolver's patience: one try, 200 ms.
        with Load(r.port, names, rate=300, threads=6, timeout=0.2) as load:
            wait_until(lambda: load.sent > 300, 10, message="load not running")
            one.kill()
            killed, killed_at = time.monotonic(), load.sent
            wait_until(lambda: load.sent > killed_at + 900, 15, message="load stalled")
        failures = list(load.failures)
        assert not failures, (f"{len(failures)} of {load.sent} queries failed (SIGKILL at {killed:.3f}): "
                              f"{failures[:20]}\n{router_lines(r, 'backend', 'ERROR')}")
        # The killed member's port answered with ICMP, and that is what moved
        # its queries on (a health check takes seconds).
        wait_until(lambda: counter(mport, "dnsrouter_backend_icmp_errors_total", backend=one.addr) > 0, 5,
                   message="no ICMP error counted for the killed member")
        print(f"\nSIGKILL: {summary(load)}; icmp errors "
              f"{counter(mport, 'dnsrouter_backend_icmp_errors_total', backend=one.addr):g}, retries "
              f"{counter(mport, 'dnsrouter_backend_retries_total', backend=one.addr):g}")


def test_a_sigstopped_member_fails_no_query_and_takes_traffic_again_after_sigcont(router, split_zone):
    zone = split_zone.zone_names[0]
    names = split_zone.names[zone]
    with KnotServer({zone: split_zone.zones[zone]}) as one, KnotServer({zone: split_zone.zones[zone]}) as two:
        r, mport = metrics_router(router)
        r.route("a1", f"{one.addr},{ZONE_RE}")
        r.route("a2", f"{two.addr},{ZONE_RE}")
        wait_members_up(r, (one, two), names[0])
        pid = two.pid
        assert pid is not None
        stopped = False
        try:
            # SIGSTOP: the port stays open, nothing answers, no ICMP: only the
            # early retry (tens of milliseconds) saves a 400 ms client.
            with Load(r.port, names, rate=300, threads=6, timeout=0.4) as load:
                wait_until(lambda: load.sent > 300, 10, message="load not running")
                os.kill(pid, signal.SIGSTOP)
                stopped = True
                stopped_at_time, stopped_at = time.monotonic(), load.sent
                # Three seconds stopped: past the forward timeout, past a failed
                # health check, so the member is also seen down.
                wait_until(lambda: load.sent > stopped_at + 900, 15, message="load stalled")
                failures_stopped = list(load.failures)
                during = summary(load)
                os.kill(pid, signal.SIGCONT)
                stopped = False
                continued = time.monotonic()
                # Back in the rotation by itself (health checks, default
                # settings: rise 2 every 2 s): its query counter grows again.
                # The counters come with the workers' reports, once a second.
                base = counter(mport, "dnsrouter_backend_queries_total", backend=two.addr)
                wait_until(lambda: counter(mport, "dnsrouter_backend_queries_total", backend=two.addr) > base + 50,
                           15, interval=0.2,
                           message=f"continued member never got traffic again:\n{router_lines(r, 'backend')}")
                back_after = time.monotonic() - continued
                failures_all = list(load.failures)
        finally:
            if stopped:
                os.kill(pid, signal.SIGCONT)  # so that teardown can stop it
        assert not failures_stopped, (
            f"{len(failures_stopped)} queries failed while a member was stopped (SIGSTOP at "
            f"{stopped_at_time:.3f}): {failures_stopped[:20]}\n{router_lines(r, 'backend', 'ERROR')}")
        assert not failures_all, f"queries failed after SIGCONT ({continued:.3f}): {failures_all[:20]}"
        print(f"\nSIGSTOP: {during}; whole run {summary(load)}; retries "
              f"{counter(mport, 'dnsrouter_backend_retries_total', backend=two.addr):g}, late replies "
              f"{counter(mport, 'dnsrouter_backend_late_replies_total', backend=two.addr):g}; "
              f"traffic again {back_after:.1f} s after SIGCONT")


# -- 2. a pool of one that loses one query in ten --------------------------------

def test_a_lossy_pool_of_one_fails_no_query_thanks_to_the_retry(router):
    with FakeBackend("ok") as fake:
        r, mport = metrics_router(router)
        r.route("lossy", rf"{fake.addr},\.lossy\.test\.$")
        wait_members_up(r, (fake,), "probe.lossy.test.")
        retries_before = counter(mport, "dnsrouter_backend_retries_total", backend=fake.addr)
        fake.mode = "lossy"  # every 10th UDP query from now on is dropped
        lost_from = fake.count("udp")
        names = [f"q{i}.lossy.test." for i in range(1000)]
        with Load(r.port, names, rate=150, threads=4, timeout=0.4) as load:
            wait_until(lambda: load.sent >= 500, 15, message="load stalled")
        dropped = (fake.count("udp") - lost_from) // fake.loss_every
        assert dropped >= 45, f"the backend dropped only {dropped} queries"
        lossy = [q for q in fake.received if q.transport == "udp"][lost_from:]
        # A query fails only when the backend dropped its retry as well: when
        # a slow spell of the machine put the retry on the next 10th datagram.
        lost_names = {q.qname for k, q in enumerate(lossy) if (k + 1) % fake.loss_every == 0}
        kept_names = {q.qname for k, q in enumerate(lossy) if (k + 1) % fake.loss_every}
        failed = [f for f in load.failures if f.split()[0] not in lost_names - kept_names]
        assert not failed and len(load.failures) <= 2, (
            f"{len(load.failures)} of {load.sent} queries failed with {dropped} dropped by the backend: "
            f"{load.failures[:20]}\n{router_lines(r, 'backend')}")
        # Each dropped query was asked again, of the same member (a pool of one)
        # -- unless the dropped datagram was itself the retry of a first try
        # the router had not read in time (a busy machine), which then answered.
        for k in range(fake.loss_every - 1, len(lossy), fake.loss_every):
            lost = lossy[k]
            if lost.qname:
                others = [q for q in lossy[:k] + lossy[k + 1:] if q.qname == lost.qname]
                assert any(q.wire[:2] != lost.wire[:2] for q in others), \
                    f"dropped query for {lost.qname} never asked again"
        # And counted (the reports come once a second): one retry a dropped
        # datagram, but for a query whose retry was dropped too (two drops, one retry).
        both_dropped = len(lost_names - kept_names)
        wait_until(lambda: counter(mport, "dnsrouter_backend_retries_total", backend=fake.addr)
                   - retries_before >= dropped - both_dropped, 5, interval=0.2,
                   message=f"fewer retries than the {dropped} datagrams dropped, less {both_dropped} "
                           "queries dropped twice")
        print(f"\nlossy: {summary(load)}; dropped {dropped}, retries "
              f"{counter(mport, 'dnsrouter_backend_retries_total', backend=fake.addr) - retries_before:g}")


# -- 3. a real resolver in front -------------------------------------------------

def test_unbound_in_front_sees_no_servfail_and_no_timeout_when_a_member_is_killed(router):
    zone = "a.example.com."
    # A wildcard: every client query is a new name, so nothing Unbound has
    # cached can hide what the router answered.
    text = zone_text(zone, ["* A 10.9.9.9"])
    with KnotServer({zone: text}) as one, KnotServer({zone: text}) as two:
        r, mport = metrics_router(router)
        r.route("a1", f"{one.addr},{ZONE_RE}")
        r.route("a2", f"{two.addr},{ZONE_RE}")
        wait_members_up(r, (one, two), "probe.a.example.com.")
        with UnboundServer({zone: [r.addr]}, probe=("probe2.a.example.com.", "A")) as unbound:
            run = os.urandom(3).hex()
            names = [f"u{i}-{run}.a.example.com." for i in range(20000)]
            queries_before = counter(mport, "dnsrouter_queries_total", transport="udp")
            with Load(unbound.port, names, rate=300, threads=6, timeout=2.0) as load:
                wait_until(lambda: load.sent > 300, 10, message="load through unbound not running")
                one.kill()
                killed, killed_at = time.monotonic(), load.sent
                wait_until(lambda: load.sent > killed_at + 900, 15, message="load stalled")
            failures = list(load.failures)
            sent = load.sent
            assert not failures, (f"{len(failures)} of {sent} queries at Unbound failed (SIGKILL at "
                                  f"{killed:.3f}): {failures[:20]}\nunbound log:\n{unbound.log_tail()}\n"
                                  f"{router_lines(r, 'backend', 'ERROR')}")
            # Every client query reached the router: nothing came from a cache.
            wait_until(lambda: counter(mport, "dnsrouter_queries_total", transport="udp") - queries_before >= sent,
                       5, interval=0.2, message="fewer queries at the router than at Unbound: a cache answered")
            print(f"\nunbound: {summary(load)}; router saw "
                  f"{counter(mport, 'dnsrouter_queries_total', transport='udp') - queries_before:g} udp queries")


# -- 4. a dead member at 5,000 qps: the supervisor is not flooded ------------------

def _dnsperf_result(text: str) -> dict:
    found: dict = {key: float(m.group(1)) for key, pattern in (
        ("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
        ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([\d.]+)"),
        ("latency", r"Average Latency \(s\):\s+([\d.]+)"))
        if (m := re.search(pattern, text))}
    m = re.search(r"Response codes:(.*)", text)
    found["codes"] = m.group(1).strip() if m else ""
    assert {"sent", "completed", "lost"} <= set(found), f"dnsperf said:\n{text}"
    return found


def _peak(series: list[tuple[float, float]], window: float = 1.0) -> float:
    """The most a counter grew within any ``window`` seconds of (time, value) samples."""
    return max((v2 - v1 for i, (t1, v1) in enumerate(series) for t2, v2 in series[i:] if t2 - t1 <= window),
               default=0.0)


def test_a_dead_member_at_5000_qps_sends_the_supervisor_a_bounded_number_of_messages(router, split_zone, tmp_path):
    zone = split_zone.zone_names[0]
    names = split_zone.names[zone]
    # The dead member answers its TCP health checks and loses every query:
    # unanswered tries pile up by the thousand, each one passive evidence.
    with KnotServer({zone: split_zone.zones[zone]}) as live, FakeBackend("udp_drop") as dead:
        r, mport = metrics_router(router)
        r.route("a1", f"{live.addr},{ZONE_RE}")
        r.route("a2", f"{dead.addr},{ZONE_RE}")
        wait_until(lambda: all(f"backend {m.addr}: new -> up" in r.log() for m in (live, dead)), 5,
                   message=f"members never up:\n{r.log()}")
        datafile = tmp_path / "queries.txt"
        datafile.write_text("".join(f"{n} A\n" for n in names))

        def snapshot():
            s = metrics.samples(mport)
            return {t: metrics.value(s, "dnsrouter_worker_messages_total", type=t)
                    for t in ("ready", "report", "evidence", "boot_failed")}

        before, started = snapshot(), time.monotonic()
        out_path = tmp_path / "dnsperf.out"
        with open(out_path, "wb") as out:
            perf = spawn(["dnsperf", "-s", HOST, "-p", str(r.port), "-d", str(datafile), "-Q", "5000",
                          "-l", "3", "-q", "1000", "-t", "2", "-c", "8"], stdout=out, stderr=subprocess.STDOUT)
        # (-c 8: eight source ports, so that both workers get queries.)
        # The supervisor's count, every 0.1 s while the load runs: its peak
        # rate, not only its mean, must stay bounded.
        series: list[tuple[float, float]] = []
        try:
            def sampled_until_done() -> bool:
                series.append((time.monotonic(), snapshot()["evidence"]))
                return perf.poll() is not None
            wait_until(sampled_until_done, 20, interval=0.1, message="dnsperf did not finish")
        finally:
            stop(perf)
        result = _dnsperf_result(out_path.read_text())
        # The last tries sent to the dead member time out a second later, and
        # their evidence counts too: wait until every try it got is over (a
        # worker sends its evidence before the report that counts the timeouts).
        def all_tries_over():
            s = metrics.samples(mport)
            sent_to = metrics.value(s, "dnsrouter_backend_queries_total", backend=dead.addr)
            return sent_to > 0 and metrics.value(s, "dnsrouter_backend_timeouts_total", backend=dead.addr) >= sent_to

        def open_tries() -> str:
            s = metrics.samples(mport)
            sent_to = metrics.value(s, "dnsrouter_backend_queries_total", backend=dead.addr)
            unanswered = metrics.value(s, "dnsrouter_backend_timeouts_total", backend=dead.addr)
            return (f"{sent_to - unanswered:g} of the {sent_to:g} tries sent to the dead member never counted as "
                    f"unanswered (a retry that drew its own first try's upstream ID loses that try)\n"
                    f"{metrics.text(mport)}\n{router_lines(r, 'backend', 'ERROR', 'worker')}")

        try:
            wait_until(all_tries_over, 10, interval=0.1)
        except AssertionError:
            raise AssertionError(f"10 s after the load: {open_tries()}") from None
        after, elapsed = snapshot(), time.monotonic() - started
        timeouts = counter(mport, "dnsrouter_backend_timeouts_total", backend=dead.addr)
        retries = counter(mport, "dnsrouter_backend_retries_total", backend=dead.addr)

        series.append((time.monotonic(), after["evidence"]))
        peak = _peak(series)
        evidence = after["evidence"] - before["evidence"]
        total = sum(after.values()) - sum(before.values())
        bound = WORKERS * elapsed / 0.1  # one EVIDENCE per worker per 0.1 s at most
        print(f"\n5000 qps, dead member: dnsperf {result}; {elapsed:.1f} s, evidence messages {evidence:g} "
              f"({evidence / elapsed:.1f}/s, at most {peak:g} within 1 s), all messages {total:g} ({total / elapsed:.1f}/s), "
              f"dead member timeouts {timeouts:g}, retries {retries:g}")
        assert timeouts >= 1000, f"only {timeouts:g} unanswered tries to the dead member: no flood to resist"
        assert evidence <= bound + 5, (f"{evidence:g} EVIDENCE messages in {elapsed:.1f} s "
                                       f"({evidence / elapsed:.0f}/s; bound {bound:.0f}) for {timeouts:g} "
                                       "unanswered tries")
        # Within any one second: ten per worker, and a little for the clocks.
        # (Half as much again for a supervisor that reads a few late, at once.)
        assert peak <= WORKERS * 15, f"{peak:g} EVIDENCE messages within one second (nominal {WORKERS * 10})"
        # REPORTs once a second per worker, the rest evidence: nothing per query.
        assert total <= bound + WORKERS * (elapsed + 2) + 5, f"{total:g} messages in {elapsed:.1f} s: {after}"
        # And the router kept answering: the dead member's queries went on to the live one.
        assert result["sent"] >= 10000, f"dnsperf sent only {result['sent']:g}: {result}"
        assert result["lost"] <= result["sent"] * 0.01, f"queries lost: {result}"
        assert "SERVFAIL" not in result["codes"], f"SERVFAIL at 5000 qps: {result}"
        assert retries >= 1000, f"only {retries:g} retries away from the dead member"
