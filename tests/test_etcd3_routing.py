"""Routes from a real etcd over its v3 API, end to end: the router subprocess
(its default --etcd-api, v3), Knot backends, etcdctl and dnsrouterctl.

The same checks as test_etcd_routing.py (v2), written with ``etcdctl`` and
the v3 helpers of support.etcd.
"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import threading
import time
import uuid
from typing import Any

import dns.rcode
import pytest

from support import metrics
from support.etcd import (EtcdCluster, EtcdServer, etcdctl, grant_lease, put3, read_prefix3, revision,
                          v3_client)
from support.etcd_routing import CTL, PREFIX, ctl, etcd_router
from support.net import rcode_of, routed, wait_until
from support.processes import program, spawn, stop

pytestmark = pytest.mark.system

A_ZONE = r"\.a\.example\.com\.$"
B_ZONE = r"\.b\.example\.com\.$"


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def names(split_zone):
    """(a name of zone a, a name of zone b): Knot a serves only the first, Knot b only the second."""
    zone_a, zone_b = split_zone.zone_names
    return split_zone.names[zone_a][0], split_zone.names[zone_b][0]


def table(r) -> list[tuple[str, list[str]]]:
    """The router's live routes, first registered first: [(pattern, [backend, ...])]."""
    return [(x["pattern"], [b["address"] for b in x["backends"]]) for x in metrics.routes(r.mport)["routes"]]


def etcds_table(url: str) -> list[tuple[str, list[str]]]:
    """What table() must be for etcd's keys now (every value "backend,pattern", patterns distinct)."""
    out = []
    for value, _ in sorted(read_prefix3(url, PREFIX).values(), key=lambda v: v[1]):
        backend, pattern = value.split(",", 1)
        out.append((pattern, [backend]))
    return out


def test_etcdctl_put_routes_within_a_second(router, etcd, knots, names):
    r = etcd_router(router, [etcd.url])
    name = names[0]
    assert rcode_of(r, name) == dns.rcode.SERVFAIL
    etcdctl(etcd.url, "put", PREFIX + str(uuid.uuid4()), rf"{knots[0].addr},^h[0-9]*\.a\.example\.com\.$")
    wait_until(lambda: routed(r, name), 1.0, message="etcdctl-registered route not used within a second")


def test_update_keeps_precedence_delete_and_lease_expiry(router, etcd, knots, names):
    a, b = knots
    name_a, name_b = names
    url = etcd.url
    r = etcd_router(router, [url])
    etcdctl(url, "put", PREFIX + "first", f"{a.addr},{A_ZONE}")
    wait_until(lambda: routed(r, name_a), 2, message="create not applied")
    # created later, overlapping the first: it only gets what the first does not match
    etcdctl(url, "put", PREFIX + "later", rf"{b.addr},\.example\.com\.$")
    wait_until(lambda: routed(r, name_b), 2, message="second key not applied")
    assert routed(r, name_a)  # still Knot a: the first key wins

    # Rewritten to overlap all of the later key's names: an update keeps the
    # key's place (create_revision), so names of zone b now go to Knot a,
    # which refuses them. Were it re-registered last, they would stay with Knot b.
    etcdctl(url, "put", PREFIX + "first", rf"{a.addr},example\.com\.$")
    wait_until(lambda: rcode_of(r, name_b) == dns.rcode.REFUSED, 2,
               message="update not applied, or it lost its precedence to the later key")
    assert routed(r, name_a)
    assert table(r) == [(r"example\.com\.$", [a.addr]), (r"\.example\.com\.$", [b.addr])]

    assert etcdctl(url, "del", PREFIX + "first").strip() == "1"
    wait_until(lambda: routed(r, name_b), 2, message="delete not applied")
    assert etcdctl(url, "del", PREFIX + "later").strip() == "1"
    wait_until(lambda: rcode_of(r, name_b) == dns.rcode.SERVFAIL, 2, message="delete not applied")

    # A lease that nobody keeps alive: the key goes when it expires.
    lease = grant_lease(url, 2)
    etcdctl(url, "put", f"--lease={lease:x}", PREFIX + "leased", f"{a.addr},{A_ZONE}")
    wait_until(lambda: routed(r, name_a), 1.5, message="leased key not applied")
    wait_until(lambda: rcode_of(r, name_a) == dns.rcode.SERVFAIL, 6, message="key of an expired lease still routes")
    assert read_prefix3(url, PREFIX) == {}


def test_bad_values_are_skipped_and_counted(router, etcd, knots, names):
    url = etcd.url
    r = etcd_router(router, [url])
    for key, value in {"bad1": "no comma", "bad2": "localhost:53,x", "bad3": "127.0.0.1:53,(",
                       "bad4": ""}.items():
        etcdctl(url, "put", PREFIX + key, value)
    put3(url, PREFIX + "bad5", "127.0.0.1:53," + "a" * 70000)
    etcdctl(url, "put", PREFIX + "sub/k", f"{knots[1].addr},.")  # below the prefix: ignored
    etcdctl(url, "put", "/dnsrouterx/k", f"{knots[1].addr},.")  # the prefix's spelling, not under it
    etcdctl(url, "put", PREFIX + "good", f"{knots[0].addr},{A_ZONE}")
    wait_until(lambda: routed(r, names[0]), 2, message="good value not routed beside bad ones")
    def all_counted() -> Any:  # the table, once every bad value is counted
        routes = metrics.routes(r.mport)
        return routes if len(routes["invalid"]) == 5 else None

    routes = wait_until(all_counted, 3, message="invalid values not all counted")
    assert set(routes["invalid"]) == {"bad1", "bad2", "bad3", "bad4", "bad5"}
    assert table(r) == [(A_ZONE, [knots[0].addr])]
    assert "dnsrouter_registry_invalid_values 5.0" in metrics.text(r.mport)
    assert rcode_of(r, names[1]) == dns.rcode.SERVFAIL  # "." of the ignored keys is no route


def churn(url: str, knots) -> None:
    """300 changes to 40 keys (puts and deletes), each with its own pattern."""
    with v3_client(url) as c:
        for i in range(300):
            key = PREFIX + f"k{i % 40}"
            if i % 7 == 3:
                c.delete(key)
            else:
                c.put(key, rf"{knots[i % 2].addr},^n{i}\.$")


def paused_router(router, url, knots, names):
    """A router routing names[0] by the key "keep"."""
    r = etcd_router(router, [url])
    etcdctl(url, "put", PREFIX + "keep", f"{knots[0].addr},^{re.escape(names[0])}$")
    wait_until(lambda: routed(r, names[0]), 3, message="first route not applied")
    return r


def ends_in_etcds_state(r, url, knots, names) -> None:
    expected = etcds_table(url)
    assert 30 < len(expected) <= 40
    wait_until(lambda: table(r) == expected, 10, interval=0.1,
               message=f"router did not end in etcd's state {expected}")
    # /routes is the supervisor's table; the workers apply it a moment later
    wait_until(lambda: rcode_of(r, names[0]) == dns.rcode.SERVFAIL, 2,
               message='the deleted key "keep" still routes')
    # and it still follows etcd
    etcdctl(url, "put", PREFIX + "after", f"{knots[1].addr},{B_ZONE}")
    wait_until(lambda: routed(r, names[1]), 3, message="change after catching up not applied")


def test_paused_supervisor_catches_up_over_compaction(router, etcd, knots, names):
    url = etcd.url
    r = paused_router(router, url, knots, names)
    os.kill(r.proc.pid, signal.SIGSTOP)  # the supervisor, which runs the registry; workers serve on
    try:
        churn(url, knots)
        etcdctl(url, "del", PREFIX + "keep")
        etcdctl(url, "compact", str(revision(url)))
        assert routed(r, names[0])  # the workers still have the old table
    finally:
        os.kill(r.proc.pid, signal.SIGCONT)
    ends_in_etcds_state(r, url, knots, names)


def test_paused_supervisor_resumes_from_a_compacted_revision(router, etcd, knots, names):
    """As above, and etcd restarts during the pause: the watch is gone with
    the changes etcd had not sent yet, and the revision to resume from is
    compacted away. The router must read the prefix again."""
    url = etcd.url
    r = paused_router(router, url, knots, names)
    os.kill(r.proc.pid, signal.SIGSTOP)
    try:
        churn(url, knots)
        etcdctl(url, "del", PREFIX + "keep")
        etcdctl(url, "compact", str(revision(url)))
        etcd.kill()
        etcd.start()
    finally:
        os.kill(r.proc.pid, signal.SIGCONT)
    ends_in_etcds_state(r, url, knots, names)
    assert "is compacted" in r.log(), "the compacted-revision path was not taken"


def test_etcd_restart_keeps_serving_and_applies_later_changes(router, etcd, knots, names):
    name_a, name_b = names
    r = etcd_router(router, [etcd.url])
    etcdctl(etcd.url, "put", PREFIX + "a", f"{knots[0].addr},{A_ZONE}")
    wait_until(lambda: routed(r, name_a), 2, message="route not applied")

    rcodes: list = []
    done = threading.Event()

    def ask() -> None:  # a client asking all along
        while not done.is_set():
            rcodes.append(rcode_of(r, name_a))
            done.wait(0.01)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    try:
        etcd.kill()
        wait_until(lambda: "etcd unusable" in r.log(), 10, message="outage not noticed")
        seen = len(rcodes)
        wait_until(lambda: len(rcodes) > seen + 20, 5, message="no queries during the outage")
        etcd.start()
        etcdctl(etcd.url, "put", PREFIX + "b", f"{knots[1].addr},{B_ZONE}")
        wait_until(lambda: routed(r, name_b), 10, message="change after the restart not applied")
    finally:
        done.set()
        asker.join(5)
    failed = [rc for rc in rcodes if rc != dns.rcode.NOERROR]
    assert not failed, f"{len(failed)} of {len(rcodes)} queries not answered NOERROR: {failed[:5]}"
    assert routed(r, name_a)
    assert r.log().count("etcd unusable") == 1  # one line per outage, not one per try


def test_cluster_member_killed_still_delivers_changes(router, knots, names):
    name_a, name_b = names
    with EtcdCluster(3) as cluster:
        r = etcd_router(router, cluster.urls)
        etcdctl(cluster.urls[1], "put", PREFIX + "a", f"{knots[0].addr},{A_ZONE}")
        wait_until(lambda: routed(r, name_a), 3, message="route not applied")
        cluster.members[0].kill()  # the first endpoint, the one the router uses
        cluster.wait_ready()

        def write(*args):  # the cluster may be electing a new leader for a moment
            try:
                return etcdctl(cluster.urls[2], *args) or True
            except RuntimeError:
                return None

        wait_until(lambda: write("put", PREFIX + "b", f"{knots[1].addr},{B_ZONE}"), 15,
                   message="the cluster never took the write")
        wait_until(lambda: routed(r, name_b), 10, message="change not delivered after a member died")
        wait_until(lambda: write("del", PREFIX + "a"), 15, message="the cluster never took the delete")
        wait_until(lambda: rcode_of(r, name_a) == dns.rcode.SERVFAIL, 10,
                   message="delete not delivered after a member died")
        assert routed(r, name_b)


def test_router_started_before_etcd(router, knots, names):
    etcd = EtcdServer()  # ports chosen, not started
    try:
        r = etcd_router(router, [etcd.url])
        wait_until(lambda: "etcd unusable" in r.log(), 10, message="outage not logged")
        for _ in range(5):
            assert rcode_of(r, names[0]) == dns.rcode.SERVFAIL  # serving, with no routes yet
        etcd.start()
        etcdctl(etcd.url, "put", PREFIX + "a", f"{knots[0].addr},{A_ZONE}")
        wait_until(lambda: routed(r, names[0]), 10, message="routes not loaded once etcd came")
    finally:
        etcd.stop()
        etcd.cleanup()


def test_dnsrouterctl_register_list_which_deregister(router, etcd, knots, names):
    name = names[0]
    url = etcd.url
    r = etcd_router(router, [url])
    done = ctl(etcd, "register", knots[0].addr, A_ZONE)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert str(uuid.UUID(key)) == key
    assert read_prefix3(url, PREFIX)[key][0] == f"{knots[0].addr},{A_ZONE}"  # a v3 key
    wait_until(lambda: routed(r, name), 2, message="ctl registration not routed")
    refused = ctl(etcd, "register", "localhost:53", "x")
    assert refused.returncode == 2 and "not a literal IP" in refused.stderr
    etcdctl(url, "put", PREFIX + "broken", "nonsense")
    listing = ctl(etcd, "list").stdout
    assert f"{key}\t{knots[0].addr},{A_ZONE}\tok" in listing
    assert "broken\tnonsense\tinvalid: no comma" in listing
    which = ctl(etcd, "which", name.upper())
    assert which.returncode == 0 and f"-> {knots[0].addr} (none)" in which.stdout
    assert ctl(etcd, "which", "www.example.org").returncode == 1
    # A backend with its own client_address: registered as a JSON value, shown everywhere.
    own = ctl(etcd, "register", knots[1].addr, A_ZONE, "--client-address", "proxy")
    assert own.returncode == 0, own.stderr
    proxied = own.stdout.strip()
    listing = ctl(etcd, "list").stdout
    assert f"{proxied}\t{{\"backend\": \"{knots[1].addr}\"" in listing
    assert "\tok, client_address proxy" in listing
    assert listing.index(key) < listing.index("broken") < listing.index(proxied)  # registration order
    assert f"{knots[0].addr} (none) {knots[1].addr} (proxy)" in ctl(etcd, "which", name).stdout
    def live_routes() -> Any:  # the listing, once it shows the proxied backend
        out = subprocess.run([*CTL, "--metrics", r.metrics[7:], "routes"],
                             capture_output=True, text=True, timeout=30, cwd="/").stdout
        return out if f"{knots[1].addr} (up; client_address proxy)" in out else None

    routes = wait_until(live_routes, 3, message="the proxied backend not in the router's table")
    assert f"{knots[0].addr} (up; client_address none)" in routes and "invalid key broken" in routes
    assert ctl(etcd, "deregister", proxied).returncode == 0
    assert ctl(etcd, "deregister", PREFIX + key).returncode == 0  # the full key works too
    gone = ctl(etcd, "deregister", key)
    assert gone.returncode == 1 and f"no key {key}" in gone.stderr
    wait_until(lambda: rcode_of(r, name) == dns.rcode.SERVFAIL, 2, message="deregistered route still used")
    assert set(read_prefix3(url, PREFIX)) == {"broken"}


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line a child prints, waiting at most timeout seconds for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"nothing printed within {timeout:g}s"
    return proc.stdout.readline().strip()


def test_dnsrouterctl_keepalive_holds_the_route_until_killed(router, etcd, knots, names):
    name = names[0]
    url = etcd.url
    r = etcd_router(router, [url])
    proc = spawn([str(program("dnsrouterctl")), "--etcd", url, "register", knots[0].addr, A_ZONE,
                  "--ttl", "2", "--keepalive"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        key = first_line(proc, 15)
        assert read_prefix3(url, PREFIX)[key][0] == f"{knots[0].addr},{A_ZONE}"
        wait_until(lambda: routed(r, name), 2, message="keepalive registration not routed")
        # Alive well past its 2 s lease: kept alive, routed all along.
        start, held = time.monotonic(), []

        def lost_or_done() -> bool:
            held.append(routed(r, name) and key in read_prefix3(url, PREFIX))
            return not held[-1] or time.monotonic() - start > 5

        wait_until(lost_or_done, 10, interval=0.05)
        assert held and all(held), f"route lost after {time.monotonic() - start:.1f}s"
        assert proc.poll() is None, proc.communicate()[1]
        proc.kill()  # SIGKILL: no deregistration; the lease is not kept alive any more
        proc.wait(5)
        assert key in read_prefix3(url, PREFIX)
        wait_until(lambda: rcode_of(r, name) == dns.rcode.SERVFAIL, 6, message="route of a dead keepalive kept")
        assert key not in read_prefix3(url, PREFIX)
    finally:
        stop(proc)
