"""Routes from a real etcd, end to end: the router subprocess, Knot backends, dnsrouterctl."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import uuid

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from support import metrics
from support.etcd import EtcdCluster, EtcdServer, delete, put, read_dir
from support.etcd_routing import PREFIX, ctl as _ctl, ctl_command, etcd_router as _etcd_router
from support.net import rcode_of, routed, wait_until
from support.processes import spawn, stop

pytestmark = pytest.mark.system

API = "v2"  # these tests are about the v2 keys API; test_etcd3_routing.py has the v3 ones


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server


def etcd_router(router, urls, *extra, **kw):
    return _etcd_router(router, urls, *extra, api=API, **kw)


def test_the_curl_form_routes_within_a_second(router, etcd, knots, split_zone):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (Debian package curl)")
    r = etcd_router(router, [etcd.url])
    name = split_zone.names[split_zone.zone_names[0]][0]
    assert rcode_of(r, name) == dns.rcode.SERVFAIL
    key = str(uuid.uuid4())
    subprocess.run(["curl", "-sf", "-XPUT", f"{etcd.url}/v2/keys/dnsrouter/{key}",
                    "-d", rf"value={knots[0].addr},^h[0-9]*\.a\.example\.com\.$"],
                   check=True, stdout=subprocess.DEVNULL)
    wait_until(lambda: routed(r, name), 1.0, message="curl-registered route not used within a second")


def test_update_delete_and_ttl_expiry(router, etcd, knots, split_zone):
    a, b = knots
    name_a = split_zone.names[split_zone.zone_names[0]][0]
    name_b = split_zone.names[split_zone.zone_names[1]][0]
    r = etcd_router(router, [etcd.url])
    put(etcd.url, PREFIX + "k1", rf"{a.addr},\.a\.example\.com\.$")
    wait_until(lambda: routed(r, name_a), 2, message="create not applied")
    put(etcd.url, PREFIX + "k1", rf"{b.addr},\.b\.example\.com\.$")  # update: the value is replaced
    wait_until(lambda: routed(r, name_b) and rcode_of(r, name_a) == dns.rcode.SERVFAIL, 2,
               message="update not applied")
    delete(etcd.url, PREFIX + "k1")
    wait_until(lambda: rcode_of(r, name_b) == dns.rcode.SERVFAIL, 2, message="delete not applied")
    put(etcd.url, PREFIX + "k2", rf"{a.addr},\.a\.example\.com\.$", ttl=1)
    wait_until(lambda: routed(r, name_a), 2, message="ttl key not applied")
    wait_until(lambda: rcode_of(r, name_a) == dns.rcode.SERVFAIL, 5, message="expired key still routes")


def test_bad_values_are_skipped_and_counted(router, etcd, knots, split_zone):
    name = split_zone.names[split_zone.zone_names[0]][0]
    r = etcd_router(router, [etcd.url])
    for key, value in {"bad1": "no comma", "bad2": "localhost:53,x", "bad3": "127.0.0.1:53,(",
                       "bad4": "", "bad5": "127.0.0.1:53," + "a" * 70000}.items():
        put(etcd.url, PREFIX + key, value)
    put(etcd.url, PREFIX + "sub/k", rf"{knots[1].addr},.")  # a directory: ignored
    put(etcd.url, PREFIX + "good", rf"{knots[0].addr},\.a\.example\.com\.$")
    wait_until(lambda: routed(r, name), 2, message="good value not routed beside bad ones")
    table = wait_until(lambda: (t := metrics.routes(r.mport)) and len(t["invalid"]) == 5 and t, 3,
                       message="invalid values not all counted")
    assert set(table["invalid"]) == {"bad1", "bad2", "bad3", "bad4", "bad5"}
    assert [x["pattern"] for x in table["routes"]] == [r"\.a\.example\.com\.$"]
    assert "dnsrouter_registry_invalid_values 5.0" in metrics.text(r.mport)


def test_etcd_restart_keeps_serving_and_applies_later_changes(router, etcd, knots, split_zone):
    name_a = split_zone.names[split_zone.zone_names[0]][0]
    name_b = split_zone.names[split_zone.zone_names[1]][0]
    r = etcd_router(router, [etcd.url])
    put(etcd.url, PREFIX + "a", rf"{knots[0].addr},\.a\.example\.com\.$")
    wait_until(lambda: routed(r, name_a), 2, message="route not applied")
    etcd.kill()
    for _ in range(50):  # the last table keeps serving through the outage
        assert routed(r, name_a)
    etcd.start()
    put(etcd.url, PREFIX + "b", rf"{knots[1].addr},\.b\.example\.com\.$")
    wait_until(lambda: routed(r, name_b), 10, message="change after the restart not applied")
    assert routed(r, name_a)
    assert r.log().count("etcd") < 20  # one line per outage, not one per try


def test_router_started_before_etcd(router, knots, split_zone):
    etcd = EtcdServer()
    try:
        r = etcd_router(router, [etcd.url])
        name = split_zone.names[split_zone.zone_names[0]][0]
        assert rcode_of(r, name) == dns.rcode.SERVFAIL  # serving, with no routes yet
        etcd.start()
        put(etcd.url, PREFIX + "a", rf"{knots[0].addr},\.a\.example\.com\.$")
        wait_until(lambda: routed(r, name), 10, message="routes not loaded once etcd came")
    finally:
        etcd.stop()
        etcd.cleanup()


def test_watcher_far_behind_ends_in_etcds_state(router, etcd, knots):
    r = etcd_router(router, [etcd.url])
    put(etcd.url, PREFIX + "keep", rf"{knots[0].addr},^keep\.$")
    wait_until(lambda: routed(r, "keep.") or rcode_of(r, "keep.") == dns.rcode.REFUSED, 3,
               message="first route not applied")
    r.signal(signal.SIGSTOP)
    try:
        for i in range(1100):  # more than etcd's 1000-event history
            put(etcd.url, PREFIX + f"k{i % 40}", rf"{knots[1].addr},^n{i}\.$")
        delete(etcd.url, PREFIX + "keep")
    finally:
        r.signal(signal.SIGCONT)
    expected = {value.split(",", 1)[1] for value, _ in read_dir(etcd.url, PREFIX).values()}

    def converged():
        patterns = {x["pattern"] for x in metrics.routes(r.mport)["routes"]}
        return patterns == expected

    wait_until(converged, 10, interval=0.1, message="router did not end in etcd's state")
    assert len(expected) == 40


def test_cluster_member_killed_still_delivers_changes(router, knots, split_zone):
    name_a = split_zone.names[split_zone.zone_names[0]][0]
    name_b = split_zone.names[split_zone.zone_names[1]][0]
    with EtcdCluster(3) as cluster:
        r = etcd_router(router, cluster.urls)
        put(cluster.urls[1], PREFIX + "a", rf"{knots[0].addr},\.a\.example\.com\.$")
        wait_until(lambda: routed(r, name_a), 3, message="route not applied")
        cluster.members[0].kill()  # the first endpoint, the one the router uses

        def write():  # the cluster may be electing a new leader for a moment
            try:
                return put(cluster.urls[2], PREFIX + "b", rf"{knots[1].addr},\.b\.example\.com\.$")
            except OSError:
                return None

        wait_until(write, 15, message="the cluster never took the write")
        wait_until(lambda: routed(r, name_b), 10, message="change not delivered after a member died")


def ctl(etcd, *args) -> subprocess.CompletedProcess:
    return _ctl(etcd, *args, api=API)


def test_dnsrouterctl_register_list_which_deregister(router, etcd, knots, split_zone):
    name = split_zone.names[split_zone.zone_names[0]][0]
    r = etcd_router(router, [etcd.url])
    done = ctl(etcd, "register", knots[0].addr, r"\.a\.example\.com\.$")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert str(uuid.UUID(key)) == key
    wait_until(lambda: routed(r, name), 2, message="ctl registration not routed")
    refused = ctl(etcd, "register", "localhost:53", "x")
    assert refused.returncode == 2 and "not a literal IP" in refused.stderr
    put(etcd.url, PREFIX + "broken", "nonsense")
    listing = ctl(etcd, "list").stdout
    assert f"{key}\t{knots[0].addr},\\.a\\.example\\.com\\.$\tok" in listing
    assert "broken\tnonsense\tinvalid: no comma" in listing
    which = ctl(etcd, "which", name.upper())
    assert which.returncode == 0 and f"-> {knots[0].addr} (none)" in which.stdout
    assert ctl(etcd, "which", "www.example.org").returncode == 1
    # A backend with its own client_address: registered as a JSON value, shown everywhere.
    own = ctl(etcd, "register", knots[1].addr, r"\.a\.example\.com\.$", "--client-address", "proxy")
    assert own.returncode == 0, own.stderr
    proxied = own.stdout.strip()
    assert f"{proxied}\t{{\"backend\": \"{knots[1].addr}\"" in ctl(etcd, "list").stdout
    assert "\tok, client_address proxy" in ctl(etcd, "list").stdout
    assert f"{knots[0].addr} (none) {knots[1].addr} (proxy)" in ctl(etcd, "which", name).stdout
    routes = subprocess.run([sys.executable, "-m", "dnsrouter.supervisor.tools.ctl", "--metrics", r.metrics[7:], "routes"],
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert f"{knots[0].addr} (up; client_address none)" in routes.stdout and "invalid key broken" in routes.stdout
    assert ctl(etcd, "deregister", proxied).returncode == 0
    assert ctl(etcd, "deregister", key).returncode == 0
    wait_until(lambda: rcode_of(r, name) == dns.rcode.SERVFAIL, 2, message="deregistered route still used")
    assert key not in read_dir(etcd.url, PREFIX)


def test_dnsrouterctl_keepalive_refreshes_until_stopped(etcd):
    proc = spawn(ctl_command(etcd, "register", "127.0.0.1:5300", r"\.ka\.$", "--ttl", "1", "--keepalive", api=API),
                 stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        key = proc.stdout.readline().strip()
        # Alive well past its TTL: refreshed.
        seen = []
        wait_until(lambda: seen.append(key in read_dir(etcd.url, PREFIX)) or len(seen) > 60, 10,
                   interval=0.05)
        assert all(seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert key not in read_dir(etcd.url, PREFIX)
    finally:
        stop(proc)
