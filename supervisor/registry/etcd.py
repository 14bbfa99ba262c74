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
"""
from __future__ import annotations

import logging
import threading
import urllib.parse
from typing import Any, Callable, Optional, Sequence, TypeVar

import etcd
import urllib3

from . import Changes, Publish, Record, RegistryError, in_order
from .outage import Outage

T = TypeVar("T")

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


class EtcdRegistry:
    """Routes from etcd keys under ``prefix`` (v2 keys API)."""

    def __init__(
        self,
        urls: Sequence[str],
        prefix: str = "/dnsrouter/",
        *,
        username: Optional[str] = None,
        password: Optional[str] = None,
        ca_cert: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        watch_timeout: float = 1.0,
        request_timeout: float = 2.0,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        """``urls``: etcd client URLs (``http://host:port`` or ``https://``),
        tried in turn when one fails. ``watch_timeout`` bounds how long
        ``stop`` may wait; ``request_timeout`` bounds connects and reads.
        """
        if not urls:
            raise ValueError("at least one etcd URL is needed")
        if (username is None) != (password is None):
            raise ValueError("etcd username and password go together")
        if key is not None and cert is None:
            raise ValueError("an etcd client key needs its certificate")
        self.urls = list(urls)
        self._endpoints = [_parse_url(u) for u in self.urls]
        self._dir = "/" + prefix.strip("/")  # the directory: '/dnsrouter' ('/' for the root)
        self._base = self._dir.rstrip("/") + "/"  # its children's keys start with this
        self._client_kw: dict[str, Any] = dict(
            username=username, password=password, ca_cert=ca_cert,
            cert=(cert, key) if key is not None else cert,
            read_timeout=request_timeout,
        )
        self._watch_timeout = urllib3.Timeout(connect=request_timeout, read=watch_timeout)
        self._request_timeout = request_timeout
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._log = logger or log
        self._clients: dict[int, _Client] = {}
        self._current = 0  # index into self._endpoints
        self._table: dict[str, Record] = {}
        self._index: Optional[int] = None  # next waitIndex; None: read everything first
        self._ignored: set[str] = set()

    # -- the loop ---------------------------------------------------------

    def run(self, publish: Publish, stop: threading.Event) -> None:
        """Publish the records until ``stop`` is set; never raise."""
        changes = Changes(publish, self._log)
        outage = Outage(self.urls, self._min_backoff, self._max_backoff, self._log)
        self._index = None
        while not stop.is_set():
            error: Optional[Exception] = None
            try:
                if self._index is None:
                    self._read_all()
                else:
                    self._watch_once()
            except etcd.EtcdWatchTimedOut:
                pass  # etcd answered: nothing changed
            except (etcd.EtcdEventIndexCleared, etcd.EtcdWatcherCleared) as e:
                # fell out of etcd's 1000-event history (or etcd restored a
                # snapshot): only a full read gives the exact state again
                self._log.info("etcd watch index %s is gone (%s); reading %s again",
                               self._index, type(e).__name__, self._dir)
                self._index = None
            except _ReadAgain:
                self._index = None
            except etcd.EtcdClusterIdChanged as e:
                # a different cluster (restored from a backup?): our index means nothing there
                self._log.warning("etcd cluster changed (%s); reading %s again", e, self._dir)
                self._index = None
            except etcd.EtcdException as e:
                # unreachable, no leader, credentials refused, garbage answer
                error = e
            except Exception:  # a bug here must not end route updates for good
                self._log.exception("etcd registry failed; reading %s again", self._dir)
                self._index = None
                stop.wait(self._max_backoff)
                continue

            if error is None:
                outage.over(self._current)
                if self._index is not None:
                    changes.offer(self._records())
                continue

            # Keep the table we have (routes stay up) and try the next endpoint;
            # pause only once every endpoint has failed in a row.
            self._current = outage.failed(self._current, _reason(error), len(self._table), stop)

    def _records(self) -> tuple[Record, ...]:
        return in_order(self._table)

    # -- one-off operations (dnsrouterctl), on the same clients -----------

    def read(self) -> tuple[Record, ...]:
        """The records under the prefix now, in registration order."""
        self._call(lambda client: self._read_all())
        return self._records()

    def put(self, name: str, value: str, ttl: Optional[int] = None) -> None:
        """Write the key ``name`` under the prefix (with a TTL in seconds)."""
        self._call(lambda client: client.write(self._base + name, value, ttl=ttl))

    def refresh(self, name: str, ttl: int) -> bool:
        """Renew the key's TTL; False when it has expired meanwhile."""
        try:
            self._call(lambda client: client.refresh(self._base + name, ttl=ttl))
        except etcd.EtcdKeyNotFound:
            return False
        return True

    def delete(self, name: str) -> bool:
        """Remove the key; False when there was none."""
        try:
            self._call(lambda client: client.delete(self._base + name))
        except etcd.EtcdKeyNotFound:
            return False
        return True

    def _call(self, operation: Callable[[_Client], T]) -> T:
        """``operation`` on each endpoint in turn until one answers.

        EtcdKeyNotFound passes through (the caller decides what it means);
        every other failure becomes one RegistryError that says where and why.
        """
        error: Exception = RegistryError("no endpoint")
        for _ in self._endpoints:
            try:
                return operation(self._client())
            except etcd.EtcdKeyNotFound:
                raise
            except etcd.EtcdConnectionFailed as e:  # this member is away: the next one
                error = e
                self._current = (self._current + 1) % len(self._endpoints)
            except etcd.EtcdException as e:  # it answered, and said no
                raise RegistryError(f"etcd at {self.urls[self._current]}: {_reason(e)}") from None
        raise RegistryError(f"etcd at {', '.join(self.urls)}: {_reason(error)}")

    # -- talking to etcd --------------------------------------------------

    def _client(self) -> _Client:
        client = self._clients.get(self._current)
        if client is None:
            protocol, host, port, version_prefix = self._endpoints[self._current]
            client = _Client(host=host, port=port, protocol=protocol,
                             version_prefix=version_prefix, **self._client_kw)
            # We fail over and back off ourselves; urllib3's silent retries
            # would only multiply the timeouts and log a warning per retry.
            client.http.connection_pool_kw["retries"] = False
            self._clients[self._current] = client
        return client

    def _read_all(self) -> None:
        """Replace the table with etcd's state; watch from just after it."""
        try:
            # quorum: a member cut off from the cluster must not serve us an old table
            res = self._client().read(self._dir, quorum=True, timeout=self._request_timeout)
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
        self._index = index + 1

    def _watch_once(self) -> None:
        """Wait for one event (or the watch timeout) and apply it."""
        client = self._client()
        client.header_index = None
        try:
            ev = client.watch(self._dir, index=self._index, timeout=self._watch_timeout,
                              recursive=True)
        except etcd.EtcdWatchTimedOut:
            if client.header_index is not None:
                self._index = max(self._index, client.header_index + 1)
            raise
        self._apply(ev)
        self._index = ev.modifiedIndex + 1
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
        top = name.split("/", 1)[0]
        if "/" in name or is_dir:
            if top not in self._ignored and len(self._ignored) < 10000:
                self._ignored.add(top)
                self._log.warning("etcd: %s%s is a directory; routes are the keys directly "
                                  "under %s, ignoring it", self._base, top, self._base)
            return None
        if name.startswith("_"):
            return None  # etcd v2 hidden key: never listed by a read, so never a route
        return name


def _parse_url(url: str) -> tuple[str, str, int, str]:
    """(protocol, host, port, version prefix) for python-etcd's Client."""
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"etcd URL must be http(s)://host[:port]: {url!r}")
    # python-etcd builds "proto://host:port" itself: an IPv6 literal needs its brackets
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return u.scheme, host, u.port or 2379, u.path.rstrip("/") + "/v2"


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
