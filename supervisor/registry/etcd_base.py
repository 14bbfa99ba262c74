"""What the etcd registries (v2 keys API, v3 gRPC API) do alike.

Both keep a table of the keys directly under a prefix: read it once, then
follow a watch from just after what was read. This module is that loop and
its failure handling, written once: the endpoints tried in turn, the table
kept while etcd does not answer (``outage``), the prefix read again after a
bug, and the one-off operations of ``dnsrouterctl`` (read, put, refresh,
delete) on the same clients, each turning a failure into one RegistryError
that says where and why.

A subclass supplies the API calls: a client for an endpoint, one step of the
watch, the read of the prefix, put, refresh and delete on a client; and says
which of its library's errors mean that an endpoint failed, and which of
those that the member is away (try the next) rather than that it said no.
"""
from __future__ import annotations

import logging
import threading
import urllib.parse
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Generic, NamedTuple, Optional, Sequence, TypeVar

from . import Changes, Publish, Record, RegistryError, in_order
from .outage import Outage

C = TypeVar("C")  # a subclass's client for one endpoint
T = TypeVar("T")

# Keys below the prefix that are not routes are logged once each, for this
# many distinct names at most: a misdirected writer must not grow the set.
MAX_IGNORED = 10000


class EtcdURL(NamedTuple):
    scheme: str  # http or https
    host: str  # an IPv6 literal in brackets: both libraries put it into a URL or target as it is
    port: int
    path: str


def parse_url(url: str) -> EtcdURL:
    """An etcd client URL (``http(s)://host[:port][/path]``, or ``host[:port]``)."""
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"etcd URL must be http(s)://host[:port]: {url!r}")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return EtcdURL(u.scheme, host, u.port or 2379, u.path)


class EtcdRegistryBase(ABC, Generic[C]):
    """Routes from the etcd keys directly under ``prefix``."""

    # What a request to an endpoint raises when it fails (unreachable, no
    # leader, credentials or TLS refused); anything else is a bug here.
    FAILURES: ClassVar[tuple[type[BaseException], ...]]
    default_log: ClassVar[logging.Logger]

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
        ``cert`` without ``key`` is a PEM file holding both.
        """
        if not urls:
            raise ValueError("at least one etcd URL is needed")
        if (username is None) != (password is None):
            raise ValueError("etcd username and password go together")
        if key is not None and cert is None:
            raise ValueError("an etcd client key needs its certificate")
        self.urls = list(urls)
        self._endpoints = [self._check_url(parse_url(u), u) for u in self.urls]
        # the routes are the keys that start with '/dnsrouter/' ('/' for the root)
        self._base = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
        self._username, self._password = username, password
        self._ca_cert, self._cert, self._key = ca_cert, cert, key
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._log = logger or self.default_log
        self._clients: dict[int, C] = {}
        self._current = 0  # index into self._endpoints
        self._table: dict[str, Record] = {}
        # where the watch resumes (v2: the next waitIndex, v3: the next
        # revision); None: read the whole prefix first
        self._position: Optional[int] = None
        self._ignored: set[str] = set()

    # -- the loop ---------------------------------------------------------

    def run(self, publish: Publish, stop: threading.Event) -> None:
        """Publish the records until ``stop`` is set; never raise."""
        changes = Changes(publish, self._log)
        outage = Outage(self.urls, self._min_backoff, self._max_backoff, self._log)
        self._position = None
        try:
            while not stop.is_set():
                try:
                    self._step()
                except self.FAILURES as e:
                    # Keep the table we have (routes stay up) and the position
                    # (no change is lost: the watch resumes from it), try the
                    # next endpoint; pause only once every endpoint has failed
                    # in a row.
                    self._drop_client()
                    self._current = outage.failed(self._current, self._reason(e), len(self._table), stop)
                    continue
                except Exception:  # a bug here must not end route updates for good
                    self._log.exception("etcd registry failed; reading %s again", self._base)
                    self._position = None
                    self._drop_client()
                    stop.wait(self._max_backoff)
                    continue
                outage.over(self._current)
                if self._position is not None:
                    changes.offer(in_order(self._table))
        finally:
            self._close_all()

    # -- one-off operations (dnsrouterctl), on the same clients -----------

    def read(self) -> tuple[Record, ...]:
        """The records under the prefix now, in registration order."""
        self._call(self._read_all)
        return in_order(self._table)

    def put(self, name: str, value: str, ttl: Optional[int] = None) -> None:
        """Write the key ``name`` under the prefix; with ``ttl``, it expires
        after that many seconds unless refreshed."""
        self._call(lambda client: self._put(client, self._base + name, value, ttl))

    def refresh(self, name: str, ttl: int) -> bool:
        """Keep the key from expiring; False when it has expired meanwhile."""
        return self._call(lambda client: self._refresh(client, self._base + name, ttl))

    def delete(self, name: str) -> bool:
        """Remove the key; False when there was none."""
        return self._call(lambda client: self._delete(client, self._base + name))

    def _call(self, operation: Callable[[C], T]) -> T:
        """``operation`` on each endpoint in turn until one answers.

        Every failure becomes one RegistryError that says where and why.
        """
        error: BaseException = RegistryError("no endpoint")
        for _ in self._endpoints:
            try:
                return operation(self._client())
            except self.FAILURES as e:
                self._drop_client()
                if not self._away(e):  # it answered, and said no
                    raise RegistryError(f"etcd at {self.urls[self._current]}: {self._reason(e)}") from None
                error = e  # this member is away: the next one
                self._current = (self._current + 1) % len(self._endpoints)
        raise RegistryError(f"etcd at {', '.join(self.urls)}: {self._reason(error)}")

    # -- clients ----------------------------------------------------------

    def _client(self) -> C:
        client = self._clients.get(self._current)
        if client is None:
            client = self._clients[self._current] = self._connect(self._endpoints[self._current])
        return client

    def _drop_client(self) -> None:
        """Close the current endpoint's client; made again on use."""
        client = self._clients.pop(self._current, None)
        if client is not None:
            self._close(client)

    def _close_all(self) -> None:
        for client in self._clients.values():
            self._close(client)
        self._clients.clear()

    def _ignore(self, top: str, message: str) -> None:
        """Log ``message`` (formatted with the prefix, ``top``, the prefix)
        once for each name ``top`` below the prefix that is not a route."""
        if top not in self._ignored and len(self._ignored) < MAX_IGNORED:
            self._ignored.add(top)
            self._log.warning(message, self._base, top, self._base)

    # -- what each API does its own way ----------------------------------

    def _check_url(self, url: EtcdURL, text: str) -> EtcdURL:
        """``url`` (given as ``text``) as this API's client takes it; ValueError
        when this API cannot use it."""
        return url

    @abstractmethod
    def _connect(self, url: EtcdURL) -> C:
        """A new client for the endpoint at ``url``."""

    @abstractmethod
    def _close(self, client: C) -> None:
        """Let go of ``client`` (and of a watch on it); never raise."""

    @abstractmethod
    def _step(self) -> None:
        """One step of the loop: read the prefix when ``_position`` is None,
        else follow the watch for up to ``watch_timeout``; a failure raises
        one of FAILURES, anything that only asks for a new read sets
        ``_position`` to None."""

    @abstractmethod
    def _read_all(self, client: C) -> None:
        """Replace the table with etcd's state; set ``_position`` just after it."""

    @abstractmethod
    def _put(self, client: C, key: str, value: str, ttl: Optional[int]) -> None: ...

    @abstractmethod
    def _refresh(self, client: C, key: str, ttl: int) -> bool: ...

    @abstractmethod
    def _delete(self, client: C, key: str) -> bool: ...

    @staticmethod
    @abstractmethod
    def _away(e: BaseException) -> bool:
        """Whether ``e`` (one of FAILURES) says the member is away (try another) rather than no."""

    @staticmethod
    @abstractmethod
    def _reason(e: BaseException) -> str:
        """What went wrong, in words, on one line, without the libraries' reprs."""
