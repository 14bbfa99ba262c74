"""Etcd3Registry against a real etcd (v3 API) started by the tests."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from dnsrouter.supervisor.registry import RegistryError
from dnsrouter.supervisor.registry.etcd3 import Etcd3Registry
from support.etcd import (EtcdCluster, EtcdServer, compact, delete3, enable_auth3, etcdctl,
                          grant_lease, make_tls_files, put3, read_prefix3, revision)
from support.registry import Running as RunningRegistry
from support.net import wait_until

pytestmark = pytest.mark.system

PREFIX = "/dnsrouter/"
LOGGER = "dnsrouter.registry.etcd3"
VALUE = r"127.0.0.1:5300,^[ab]*\.example\.com\.$"


def Running(urls: list[str], prefix: str = PREFIX, hook=None, **kw) -> RunningRegistry:
    """An Etcd3Registry running in a thread, recording what it publishes."""
    kw.setdefault("watch_timeout", 0.25)  # quicker teardown; the stop tests use the default
    return RunningRegistry(Etcd3Registry(urls, prefix, **kw), lambda url: read_prefix3(url, PREFIX), hook)


class Hold:
    """A publish hook that blocks the registry's next publish until released."""

    def __init__(self) -> None:
        self.entered, self.released = threading.Event(), threading.Event()

    def __call__(self, records) -> None:
        if not self.released.is_set():
            self.entered.set()
            self.released.wait(60)


def test_etcdctl_put_is_published_within_a_second(etcd_server, running):
    url = etcd_server.url
    a = put3(url, PREFIX + "a", "10.0.0.1:53,^a\\.$")
    r = running([url])
    r.wait_for(lambda t: set(t) == {"a"})
    assert r.table()["a"] == ("10.0.0.1:53,^a\\.$", a)
    assert len(r.published) == 1

    uuid = "3f0c5a52-9b1e-4c47-a4e6-0d1f8a7f2b11"
    etcdctl(url, "put", PREFIX + uuid, VALUE)
    # Timed from etcdctl's return, when the operator sees the put done: a Go
    # client's start-up can take seconds on a loaded CI machine, and that is
    # not the router's delay. (Published before the return counts as 0.)
    done = time.monotonic()
    r.wait_for(lambda t: t.get(uuid, ("",))[0] == VALUE, timeout=1.0, message="published within 1 s")
    assert r.published[-1][0] - done < 1.0
    r.wait_equal(url)


def test_empty_prefix_update_order_delete(etcd_server, running):
    url = etcd_server.url
    r = running([url])
    r.wait_for(lambda t: t == {})
    assert len(r.published) == 1  # published once at start, empty
    # names in reverse alphabetical order: order must follow create_revision
    created = {k: put3(url, PREFIX + k, f"10.0.0.{i}:53,x") for i, k in enumerate(["z", "y"], 1)}
    r.wait_for(lambda t: len(t) == 2)
    assert {k: v[1] for k, v in r.table().items()} == created
    # rewriting z (an update) keeps its create_revision, so it still wins over
    # y and over a later overlapping key
    put3(url, PREFIX + "z", "10.0.0.9:53,x")
    put3(url, PREFIX + "x", "10.0.0.3:53,x")
    r.wait_for(lambda t: t.get("z") == ("10.0.0.9:53,x", created["z"]) and "x" in t)
    assert [rec.key for rec in r.published[-1][1]] == ["z", "y", "x"]

    delete3(url, PREFIX + "y")
    r.wait_for(lambda t: set(t) == {"z", "x"})
    # deleted and written again: a new key, registered last
    again = put3(url, PREFIX + "y", "10.0.0.2:53,x")
    r.wait_for(lambda t: t.get("y", ("", 0))[1] == again)
    assert [rec.key for rec in r.published[-1][1]] == ["z", "x", "y"]
    r.wait_equal(url)


def test_lease_not_kept_alive_expires(etcd_server, running):
    url = etcd_server.url
    r = running([url])
    put3(url, PREFIX + "stays", VALUE)
    put3(url, PREFIX + "short", VALUE, lease=grant_lease(url, 1))
    r.wait_for(lambda t: set(t) == {"stays", "short"})
    r.wait_for(lambda t: set(t) == {"stays"}, timeout=10, message="lease expiry")


def test_values_passed_through_and_deeper_keys_ignored(etcd_server, running, logs):
    url = etcd_server.url
    huge = "10.0.0.1:53," + "a" * (100 * 1024)
    odd = "not a route, at all ✓"
    put3(url, PREFIX + "empty", "")
    put3(url, PREFIX + "sub/early", VALUE)
    r = running([url])
    put3(url, PREFIX + "huge", huge)
    put3(url, PREFIX + "odd", odd)
    put3(url, PREFIX + "sub/late", VALUE)
    put3(url, PREFIX + "sub/deeper/x", VALUE)
    put3(url, "/dnsrouterx/k", VALUE)  # shares the prefix's spelling, not the prefix
    put3(url, PREFIX + "last", VALUE)
    r.wait_for(lambda t: set(t) == {"empty", "huge", "odd", "last"})
    assert {k: v[0] for k, v in r.table().items()} == {"empty": "", "huge": huge, "odd": odd,
                                                         "last": VALUE}
    assert len(logs(logging.WARNING, PREFIX + "sub/ ")) == 1


def test_paused_registry_catches_up_over_compaction(etcd_server, running, logs):
    """The registry is paused (its publish blocks) while 300 changes are
    written and the history is compacted; afterwards it equals etcd."""
    url = etcd_server.url
    for i in range(5):
        put3(url, PREFIX + f"k{i}", f"10.0.0.{i}:53,x")

    def churn() -> None:
        for i in range(300):
            key = PREFIX + f"k{i % 40}"
            if i % 7 == 3:
                delete3(url, key)
            else:
                put3(url, key, f"10.0.{i // 256}.{i % 256}:53,x")

    # Paused at the first publish, after the read and before the watch: the
    # watch then starts from a compacted revision, and the prefix is read again.
    hold = Hold()
    r = running([url], hook=hold)
    assert hold.entered.wait(10), "first publish not reached"
    churn()
    compact(url)
    hold.released.set()
    r.wait_equal(url, timeout=15)
    assert logs(logging.INFO, "is compacted"), "the compaction path was not taken"

    # Paused with the watch running: the changes and the compaction come
    # while the registry is blocked, and it catches up with one or two publishes.
    hold = Hold()
    r.hook = hold
    put3(url, PREFIX + "trigger", VALUE)
    assert hold.entered.wait(10), "publish for the trigger not reached"
    churn()
    compact(url)
    before = len(r.published)
    hold.released.set()
    r.wait_equal(url, timeout=15)
    assert len(r.published) - before <= 2


def test_etcd_restart_keeps_table_and_quiet_prefix_stays_current(tmp_path, running, logs):
    """Killed and restarted on its data dir: the last table is kept, changes
    after the restart apply. Progress notifications keep a quiet prefix's
    revision current, so the compaction of a busy etcd's history while it was
    away does not force a full read."""
    with EtcdServer(extra_args=["--experimental-watch-progress-notify-interval", "100ms"]) as server:
        url = server.url
        put3(url, PREFIX + "a", VALUE)
        r = running([url])
        r.wait_for(lambda t: set(t) == {"a"})
        published = len(r.published)

        for i in range(50):  # busy elsewhere
            put3(url, f"/other/k{i % 10}", "x")
        busy = revision(url)
        wait_until(lambda: (r.registry._position or 0) > busy, timeout=5,
                   message="progress notification advanced the revision")
        compact(url)

        server.kill()
        wait_until(lambda: logs(logging.WARNING, "unusable"), timeout=10, message="outage warning")
        assert set(r.table()) == {"a"}
        server.start()
        put3(url, PREFIX + "b", VALUE)
        r.wait_for(lambda t: set(t) == {"a", "b"}, timeout=10)
        # the table was kept (never published empty); one warning, one recovery line
        assert all({"a"} <= {rec.key for rec in recs} for _, recs in r.published[published - 1:])
        assert len(logs(logging.WARNING, "unusable")) == 1
        wait_until(lambda: logs(logging.INFO, "reachable again"), message="recovery line")
        assert len(logs(logging.INFO, "reachable again")) == 1
        assert not logs(logging.INFO, "is compacted")


def test_registry_started_before_etcd(running, logs):
    server = EtcdServer()  # ports chosen, not started
    try:
        r = running([server.url])
        wait_until(lambda: logs(logging.WARNING, "unusable"), timeout=10, message="outage warning")
        assert "connection refused" in logs(logging.WARNING, "unusable")[0].getMessage()
        assert r.published == []
        server.start()
        put3(server.url, PREFIX + "a", VALUE)
        r.wait_for(lambda t: set(t) == {"a"})
        assert len(logs(logging.WARNING, "unusable")) == 1
        r.close()
    finally:
        server.cleanup()


def test_cluster_member_killed(running, logs):
    with EtcdCluster(3) as cluster:
        r = running(cluster.urls)
        put3(cluster.urls[0], PREFIX + "a", VALUE)
        r.wait_for(lambda t: set(t) == {"a"})
        used = r.registry._current
        cluster.members[used].kill()
        cluster.wait_ready()
        other = cluster.urls[(used + 1) % 3]
        put3(other, PREFIX + "b", VALUE)
        r.wait_for(lambda t: set(t) == {"a", "b"}, timeout=10)
        delete3(other, PREFIX + "a")
        r.wait_for(lambda t: set(t) == {"b"}, timeout=10)
        assert r.registry._current != used
        assert not logs(logging.WARNING, "unusable")  # another member answered at once
        assert not logs(logging.INFO, "is compacted")  # resumed from its revision


def test_one_off_operations(etcd_server):
    url = etcd_server.url
    store = Etcd3Registry([url], PREFIX)
    store.put("plain", VALUE)
    store.put("leased", VALUE, ttl=1)
    assert [r.key for r in store.read()] == ["plain", "leased"]
    assert store.refresh("leased", 1) is True
    assert store.refresh("plain", 1) is True  # no lease: it never expires
    assert store.refresh("missing", 1) is False
    wait_until(lambda: "leased" not in read_prefix3(url, PREFIX), timeout=10, message="lease expiry")
    assert store.refresh("leased", 1) is False  # dnsrouterctl then puts it again
    assert store.delete("plain") is True
    assert store.delete("plain") is False
    assert store.read() == ()

    nobody = EtcdServer()  # never started
    try:
        with pytest.raises(RegistryError, match=rf"^etcd at {nobody.url}: connection refused$"):
            Etcd3Registry([nobody.url], request_timeout=1).read()
    finally:
        nobody.cleanup()


def test_username_and_password(etcd_server, running, logs):
    url = etcd_server.url
    put3(url, PREFIX + "a", VALUE)
    enable_auth3(url, "secret")
    good = running([url], username="root", password="secret")
    bad = running([url], username="root", password="wrong")
    good.wait_for(lambda t: set(t) == {"a"})
    etcdctl(url, "put", PREFIX + "b", VALUE, user="root:secret")
    good.wait_for(lambda t: set(t) == {"a", "b"})
    wait_until(lambda: logs(logging.WARNING, "authentication failed"), message="refusal logged")
    assert bad.published == []
    with pytest.raises(RegistryError, match=rf"^etcd at {url}: .*authentication failed"):
        Etcd3Registry([url], username="root", password="wrong").put("c", VALUE)


def test_https_with_client_certificate(tmp_path, running, logs):
    tls = make_tls_files(str(tmp_path))
    with EtcdServer(tls=tls) as server:
        put3(server.url, PREFIX + "a", VALUE)
        r = running([server.tls_url], ca_cert=tls.ca, cert=tls.client_cert, key=tls.client_key)
        r.wait_for(lambda t: set(t) == {"a"})
        put3(server.url, PREFIX + "b", VALUE)
        r.wait_for(lambda t: set(t) == {"a", "b"})
        no_cert = running([server.tls_url], ca_cert=tls.ca)
        wait_until(lambda: logs(logging.WARNING, "unusable"), message="refusal logged")
        assert no_cert.published == []
        r.close()
        no_cert.close()


def test_stop_is_prompt(etcd_server, running):
    r = running([etcd_server.url], watch_timeout=1.0)  # the default
    r.wait_for(lambda t: t == {})
    assert r.close() < 1.5  # waiting on the watch


def test_stop_is_prompt_while_etcd_down(running, logs):
    server = EtcdServer()  # never started: every try fails
    try:
        r = running([server.url], watch_timeout=1.0, max_backoff=30)
        wait_until(lambda: logs(logging.WARNING, "unusable"), message="outage warning")
        assert r.close() < 1.5  # in a backoff pause
    finally:
        server.cleanup()
