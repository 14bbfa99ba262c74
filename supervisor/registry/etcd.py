"""The etcd registry: list and watch a prefix through the v2 keys API.

The table is read once (``GET prefix``), then kept current with long-poll
watches (``?wait=true&recursive=true&waitIndex=N``) that each return one
event. Every watch has a finite timeout so that ``stop`` is honoured
promptly; ``eternal_watch`` never returns and is not used.

etcd keeps only the last 1000 events. A watcher that falls further behind
gets error 401 (EtcdEventIndexCleared) and reads the whole prefix again,
which also covers an outage longer than the history.

python-etcd 0.4.5 is used with three adjustments, all local to this module:

* one client per endpoint, rotated here, with urllib3 retries off. Its own
  failover (``allow_reconnect``) contacts etcd in the constructor, replaces
  our endpoint list with the URLs the cluster advertises, and fails with
  ValueError when those are spelled differently; urllib3's retries would
  multiply every timeout by four and log a warning per retry.
* its logging, an ERROR per failed request, is dropped unless the
  ``etcd.client`` logger is configured: an outage is logged here, once.
* a hook keeps the X-Etcd-Index header of a watch that times out (python-etcd
  discards that response). Without it a quiet prefix on a busy etcd would
  fall out of the event history every 1000 unrelated writes.

The loop, the failover between endpoints and the one-off operations are
``etcd_base``'s; this module makes the v2 API calls.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import etcd
import urllib3

from . import Record
from .etcd_base import EtcdRegistryBase, EtcdURL

log = logging.getLogger("dnsrouter.registry.etcd")

SETS = frozenset({"set", "create", "update", "compareAndSwap"})
REMOVALS = frozenset({"delete", "compareAndDelete", "expire"})

# When a watch answers with an event this many indexes older than etcd's
# current index, we are far behind (a slow publish, a long outage): one read
# of the prefix is cheaper than replaying the backlog event by event, and
# publishes once instead of once per event.
CATCH_UP_READ = 100


class _PythonEtcdLogFilter(logging.Filter):
    """Drop python-etcd's own records unless its logger was configured.

    It logs an ERROR for every failed request (and urllib3 a WARNING per
    retry); this module reports an outage once, and its start and end, itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return logging.getLogger("etcd.client").level != logging.NOTSET


_etcd_client_log = logging.getLogger("etcd.client")
if not any(isinstance(f, _PythonEtcdLogFilter) for f in _etcd_client_log.filters):
    _etcd_client_log.addFilter(_PythonEtcdLogFilter())


class _Client(etcd.Client):
    """python-etcd client that remembers the X-Etcd-Index of the last response.

    python-etcd calls ``_check_cluster_id`` as soon as a response's headers
    arrive, before it reads the body, so this also sees the headers of a watch
    that then times out. For a watch, X-Etcd-Index is etcd's index when the
    watch was registered: no event under the prefix happened between the
    watch's waitIndex and that index, so the next watch may start after it.
    """

    header_index: Optional[int] = None

    def _check_cluster_id(self, response: Any) -> None:
        value = response.headers.get("x-etcd-index")
        self.header_index = int(value) if value and value.isdigit() else None
        super()._check_cluster_id(response)


class _ReadAgain(Exception):
    """The state must be read again (the prefix itself went away, or worse)."""


class EtcdRegistry(EtcdRegistryBase[_Client]):
    """Routes from etcd keys under ``prefix`` (v2 keys API)."""

    FAILURES = (etcd.EtcdException,)  # unreachable, no leader, credentials refused, garbage answer
    default_log = log

    def _check_url(self, url: EtcdURL, text: str) -> EtcdURL:
        return url._replace(path=url.path.rstrip("/") + "/v2")  # python-etcd's version_prefix

    def _connect(self, url: EtcdURL) -> _Client:
        client = _Client(host=url.host, port=url.port, protocol=url.scheme, version_prefix=url.path,
                         username=self._username, password=self._password, ca_cert=self._ca_cert,
                         cert=(self._cert, self._key) if self._key is not None else self._cert,
                         read_timeout=self._request_timeout)
        # We fail over and back off ourselves; urllib3's silent retries
        # would only multiply the timeouts and log a warning per retry.
        client.http.connection_pool_kw["retries"] = False
        return client

    def _drop_client(self) -> None:
        """Keep the client of an endpoint that failed: it remembers the id of
        the cluster it first answered for, which is how a cluster restored
        from a backup is noticed (EtcdClusterIdChanged), and its connection
        pool connects again by itself."""

    def _close(self, client: _Client) -> None:
        client.http.clear()

    @property
    def _dir(self) -> str:
        """The prefix as a directory: '/dnsrouter' ('/' for the root)."""
        return self._base.rstrip("/") or "/"

    def _step(self) -> None:
        try:
            if self._position is None:
                self._read_all(self._client())
            else:
                self._watch_once()
        except etcd.EtcdWatchTimedOut:
            pass  # etcd answered: nothing changed
        except (etcd.EtcdEventIndexCleared, etcd.EtcdWatcherCleared) as e:
            # fell out of etcd's 1000-event history (or etcd restored a
            # snapshot): only a full read gives the exact state again
            self._log.info("etcd watch index %s is gone (%s); reading %s again",
                           self._position, type(e).__name__, self._dir)
            self._position = None
        except _ReadAgain:
            self._position = None
        except etcd.EtcdClusterIdChanged as e:
            # a different cluster (restored from a backup?): our index means nothing there
            self._log.warning("etcd cluster changed (%s); reading %s again", e, self._dir)
            self._position = None

    # -- talking to etcd --------------------------------------------------

    def _put(self, client: _Client, key: str, value: str, ttl: Optional[int]) -> None:
        client.write(key, value, ttl=ttl)

    def _refresh(self, client: _Client, key: str, ttl: int) -> bool:
        try:
            client.refresh(key, ttl=ttl)
        except etcd.EtcdKeyNotFound:
            return False
        return True

    def _delete(self, client: _Client, key: str) -> bool:
        try:
            client.delete(key)
        except etcd.EtcdKeyNotFound:
            return False
        return True

    @staticmethod
    def _away(e: BaseException) -> bool:
        return isinstance(e, etcd.EtcdConnectionFailed)

    @staticmethod
    def _reason(e: BaseException) -> str:
        return _reason(e)

    def _read_all(self, client: _Client) -> None:
        """Replace the table with etcd's state; watch from just after it."""
        try:
            # quorum: a member cut off from the cluster must not serve us an old table
            res = client.read(self._dir, quorum=True, timeout=self._request_timeout)
            nodes = [n for n in res.leaves if n.key != self._dir] if res.dir else []
            index = res.etcd_index
        except etcd.EtcdKeyNotFound as e:
            # no key registered yet: an empty table, as of the index in the error
            nodes, index = [], int((e.payload or {}).get("index", 0))
        table = {}
        for node in nodes:
            name = self._name(node.key, node.dir)
            if name is not None:
                table[name] = Record(name, node.value or "", node.createdIndex)
        self._table = table
        self._position = index + 1

    def _watch_once(self) -> None:
        """Wait for one event (or the watch timeout) and apply it."""
        assert self._position is not None
        client = self._client()
        client.header_index = None
        try:
            ev = client.watch(self._dir, index=self._position, recursive=True,
                              timeout=urllib3.Timeout(connect=self._request_timeout, read=self._watch_timeout))
        except etcd.EtcdWatchTimedOut:
            if client.header_index is not None:
                self._position = max(self._position, client.header_index + 1)
            raise
        self._apply(ev)
        self._position = ev.modifiedIndex + 1
        if ev.etcd_index - ev.modifiedIndex > CATCH_UP_READ:
            raise _ReadAgain()

    def _apply(self, ev: etcd.EtcdResult) -> None:
        if ev.action in REMOVALS and self._base.startswith(ev.key.rstrip("/") + "/"):
            # the prefix directory itself (or a parent) was deleted or expired
            self._table = {}
            return
        name = self._name(ev.key, ev.dir)
        if name is None:
            return
        if ev.action in SETS:
            # createdIndex as etcd reports it: update/compareAndSwap keep it,
            # a plain set of an existing key renews it (as a full read would show)
            self._table[name] = Record(name, ev.value or "", ev.createdIndex)
        elif ev.action in REMOVALS:
            self._table.pop(name, None)
        else:
            self._log.warning("etcd event %r on %s not understood; reading %s again",
                              ev.action, ev.key, self._dir)
            raise _ReadAgain()

    def _name(self, key: str, is_dir: bool) -> Optional[str]:
        """The record name for an etcd key, or None when it is not a route."""
        if not key or not key.startswith(self._base):
            return None
        name = key[len(self._base):]
        if "/" in name or is_dir:
            self._ignore(name.split("/", 1)[0], "etcd: %s%s is a directory; routes are the keys directly "
                                                "under %s, ignoring it")
            return None
        if name.startswith("_"):
            return None  # etcd v2 hidden key: never listed by a read, so never a route
        return name


def _reason(e: BaseException) -> str:
    """What went wrong, in words, without the libraries' object reprs."""
    # python-etcd keeps urllib3's error in .cause; the system's error (refused,
    # unreachable, timed out) is at the end of urllib3's chain.
    seen: Optional[BaseException] = getattr(e, "cause", None) or e
    while seen is not None:
        if isinstance(seen, TimeoutError) or type(seen).__name__.endswith("TimeoutError"):
            return "timed out"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror[0].lower() + seen.strerror[1:]
        seen = seen.__cause__ or seen.__context__
    return str(getattr(e, "cause", None) or e) or type(e).__name__
