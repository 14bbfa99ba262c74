"""The etcd registry: read and watch a prefix through the v3 API (gRPC).

The table is read once (a linearizable range read of the prefix, which also
gives the store's revision), then kept current by one watch of the prefix
from that revision + 1. Every put (create or update) and every delete
(including a lease that expires) applies; the table is published after each
batch of watch responses. Precedence is by ``create_revision``, which a
rewrite of a key keeps.

etcd compacts its history. A watch whose start revision has been compacted
is cancelled by etcd (reported as RevisionCompactedError); the prefix is then
read again and the table replaced. The revision to resume from advances
with every event and with every progress notification (the watch asks for
them), so a quiet prefix on a busy cluster resumes after an outage from a
recent revision rather than from its last own event.

The client library is etcd-sdk-python (``pyetcd``, gRPC), used with these
adjustments, all local to this module:

* one client per endpoint, rotated here, never its own failover: its
  endpoints are marked failed for 300 s after one error, and with a single
  endpoint a failed one refuses every call. We make the endpoints ourselves
  with ``time_retry=0`` and a channel of our own options (a local subchannel
  pool and short reconnect backoff, so a restarted etcd is used at once;
  keepalive pings, so a member that vanishes without closing the connection
  is noticed).
* a client that failed is closed and made again: a new channel, a new auth
  token (etcd's simple tokens die with a restart or after their TTL), the
  certificate files read again.
* requests carry gRPC metadata ``hasleader=true`` (what etcd's Go client
  calls WithRequireLeader): a member cut off from its cluster ends our watch
  instead of keeping it silent, and refuses reads, so we fail over.
* its token goes as call credentials too, which gRPC refuses to send over
  plain http: there the token travels in the metadata alone.
* its exceptions drop etcd's message; the reason is taken from the gRPC
  error they were raised from.

The loop, the failover between endpoints and the one-off operations are
``etcd_base``'s; this module makes the v3 API calls.
"""
from __future__ import annotations

import logging
import queue
from typing import Any, Optional

import grpc
import pyetcd
import pyetcd.events
import pyetcd.exceptions
from pyetcd.client import Endpoint, MultiEndpointEtcd3Client

from . import Record
from .etcd_base import EtcdRegistryBase, EtcdURL

log = logging.getLogger("dnsrouter.registry.etcd3")

# Codes (and pyetcd exceptions) that say "this member is away or busy": a
# one-off operation tries the next endpoint. Anything else is etcd saying no.
_AWAY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_AWAY_ERRORS = (pyetcd.exceptions.ConnectionFailedError, pyetcd.exceptions.ConnectionTimeoutError,
                pyetcd.exceptions.WatchTimedOut)

# The system's words for a failed connection, as they appear in gRPC's details.
_SYSTEM_REASONS = ("Connection refused", "Connection reset by peer", "No route to host",
                   "Network is unreachable", "Connection timed out", "Broken pipe")


class _Compacted(Exception):
    """The watch's start revision is gone from etcd's history: read again."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self.revision = revision


class _WatchEnded(Exception):
    """The watch stream ended (the member went away, or closed it)."""

    def __init__(self, cause: Optional[BaseException]) -> None:
        super().__init__(cause)
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause


class Etcd3Registry(EtcdRegistryBase[MultiEndpointEtcd3Client]):
    """Routes from etcd keys under ``prefix`` (v3 API)."""

    # A failed request or watch raises gRPC's own error, or pyetcd's
    # translation of it (ConnectionFailedError, ConnectionTimeoutError, ...);
    # a certificate file that cannot be read, OSError (read again for every
    # new client); a watch that ends, _WatchEnded.
    FAILURES = (grpc.RpcError, pyetcd.exceptions.Etcd3Exception, OSError, _WatchEnded)
    default_log = log
    _events: Optional[queue.Queue[Any]] = None  # the live watch's responses

    def _check_url(self, url: EtcdURL, text: str) -> EtcdURL:
        if url.path.strip("/"):
            raise ValueError(f"etcd URL for the v3 API takes no path: {text!r}")
        return url

    def _connect(self, url: EtcdURL) -> MultiEndpointEtcd3Client:
        secure = url.scheme == "https"
        endpoint = Endpoint(url.host, url.port, secure=secure, creds=self._credentials() if secure else None,
                            time_retry=0, opts=self._channel_options())
        try:
            # authenticates now when a user is given (a token per client)
            client = MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=self._request_timeout,
                                              user=self._username, password=self._password)
        except BaseException:
            endpoint.close()
            raise
        client.metadata = tuple(client.metadata or ()) + (("hasleader", "true"),)
        if not secure:
            # gRPC sends call credentials over TLS only and refuses the
            # call otherwise; the token also travels in the metadata
            # (that is how etcd reads it), which plain http allows
            client.call_credentials = None
        return client

    def _close(self, client: MultiEndpointEtcd3Client) -> None:
        self._end_watch()  # the watch runs on the current client's channel: it ends with it
        try:
            client.close()
        except Exception:  # closing a broken channel: nothing left to do
            pass

    def _step(self) -> None:
        try:
            if self._position is None:
                self._read_all(self._client())
            elif self._events is None:
                self._start_watch()
            else:
                self._wait_events()
        except _Compacted as e:
            self._log.info("etcd revision %s is compacted (history starts at %s); reading %s again",
                           self._position, e.revision, self._base)
            self._position = None
            self._end_watch()

    # -- talking to etcd --------------------------------------------------

    def _put(self, client: MultiEndpointEtcd3Client, key: str, value: str, ttl: Optional[int]) -> None:
        """With ``ttl``, on a new lease of that many seconds (kept by ``refresh``)."""
        client.put(key, value, lease=client.lease(ttl).id if ttl is not None else 0)

    def _refresh(self, client: MultiEndpointEtcd3Client, key: str, ttl: int) -> bool:
        """Keep the key's lease alive; False when the key or its lease is gone.

        A v3 lease keeps the TTL it was granted with: ``ttl`` is the v2
        signature's and changes nothing. A key without a lease never
        expires: True.
        """
        res = client.get_response(key)
        if not res.kvs:
            return False
        lease = res.kvs[0].lease
        if not lease:
            return True
        for answer in client.refresh_lease(lease):
            return bool(answer.TTL > 0)  # 0: expired (its keys are going)
        return False

    def _delete(self, client: MultiEndpointEtcd3Client, key: str) -> bool:
        return bool(client.delete(key))

    @staticmethod
    def _away(e: BaseException) -> bool:
        return _away(e)

    @staticmethod
    def _reason(e: BaseException) -> str:
        return _reason(e.cause or e if isinstance(e, _WatchEnded) else e)

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: Optional[str]) -> Optional[bytes]:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()
        chain = read(self._cert)
        return grpc.ssl_channel_credentials(
            root_certificates=read(self._ca_cert),  # None: the system's CAs
            private_key=read(self._key) if self._key is not None else chain,
            certificate_chain=chain)

    def _channel_options(self) -> list[tuple[str, Any]]:
        return [
            # our own subchannels: a new client after a failure connects anew
            # instead of inheriting the old one's reconnect backoff
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(self._max_backoff * 1000)),
            # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time)
            ("grpc.keepalive_time_ms", 10000),
            ("grpc.keepalive_timeout_ms", int(max(self._request_timeout, 1.0) * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]

    def _read_all(self, client: MultiEndpointEtcd3Client) -> None:
        """Replace the table with etcd's state; watch from just after it."""
        self._end_watch()
        # linearizable (not serializable): a member cut off from the cluster
        # must not serve us an old table
        res = client.get_prefix_response(self._base)
        table = {}
        for kv in res.kvs:
            name = self._name(kv.key)
            if name is not None:
                table[name] = Record(name, _text(kv.value), kv.create_revision)
        self._table = table
        self._position = res.header.revision + 1

    def _start_watch(self) -> None:
        events: queue.Queue[Any] = queue.Queue()
        # the watch is created, or its creation failed, before this returns;
        # a compacted start revision arrives as a RevisionCompactedError
        # either here or as the watch's first response
        try:
            self._client().add_watch_prefix_callback(self._base, events.put, start_revision=self._position,
                                                     progress_notify=True)
        except pyetcd.exceptions.RevisionCompactedError as e:
            raise _Compacted(e.compacted_revision) from None
        self._events = events

    def _end_watch(self) -> None:
        # The watch ends with its client (closing the channel ends the
        # stream); a cancel request could block on a dead stream's queue. A
        # new watch gets a new queue, so late responses of this one are not seen.
        self._events = None

    def _wait_events(self) -> None:
        """Wait up to ``watch_timeout`` for watch responses; apply all that came."""
        assert self._events is not None
        try:
            responses = [self._events.get(timeout=self._watch_timeout)]
        except queue.Empty:
            return
        while True:  # everything that queued up: one publish for the lot
            try:
                responses.append(self._events.get_nowait())
            except queue.Empty:
                break
        for response in responses:
            if isinstance(response, pyetcd.exceptions.RevisionCompactedError):
                raise _Compacted(response.compacted_revision)
            if response is None or isinstance(response, BaseException):
                raise _WatchEnded(response)
            self._apply(response)

    def _apply(self, response: Any) -> None:
        assert self._position is not None
        for ev in response.events:
            name = self._name(ev.key)
            if name is None:
                continue
            if isinstance(ev, pyetcd.events.DeleteEvent):  # deleted, or its lease expired
                self._table.pop(name, None)
            else:  # created or updated: create_revision as etcd reports it
                self._table[name] = Record(name, _text(ev.value), ev.create_revision)
        # Resume after the last event; a progress notification (no events)
        # says that everything up to its header revision has been sent. The
        # header of a response with events may be ahead of them (etcd splits
        # a long catch-up): it is not a resume point.
        if response.events:
            self._position = max(self._position, response.events[-1].mod_revision + 1)
        else:
            self._position = max(self._position, response.header.revision + 1)

    def _name(self, key: bytes) -> Optional[str]:
        """The record name for an etcd key, or None when it is not a route."""
        text = key.decode("utf-8", "backslashreplace")
        if not text.startswith(self._base):
            return None
        name = text[len(self._base):]
        if "/" in name:
            self._ignore(name.split("/", 1)[0], "etcd: keys under %s%s/ are below the prefix; routes are "
                                                "the keys directly under %s, ignoring them")
            return None
        return name or None


def _text(value: bytes) -> str:
    # an undecodable value is still published, and refused by the value parser
    return value.decode("utf-8", "replace")


def _rpc_error(e: BaseException) -> Optional[grpc.RpcError]:
    """The gRPC error behind ``e`` (pyetcd raises its own from it)."""
    seen: Optional[BaseException] = e
    while seen is not None:
        if isinstance(seen, grpc.RpcError) and hasattr(seen, "code"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _away(e: BaseException) -> bool:
    """Whether ``e`` says the member is away (try another) rather than no."""
    if isinstance(e, _AWAY_ERRORS):
        return True
    rpc = _rpc_error(e)
    return rpc is not None and rpc.code() in _AWAY_CODES


def _reason(e: BaseException) -> str:
    """What went wrong, in words, on one line, without the libraries' reprs."""
    rpc = _rpc_error(e)
    if rpc is not None:
        code, details = rpc.code(), (rpc.details() or "")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timed out"
        for words in _SYSTEM_REASONS:
            if words in details:
                return words[0].lower() + words[1:]
        details = details.strip().splitlines()[0] if details.strip() else ""
        details = details.removeprefix("etcdserver: ")
        return details or code.name.lower().replace("_", " ")
    if isinstance(e, OSError) and e.strerror:  # a certificate file that cannot be read
        return e.strerror[0].lower() + e.strerror[1:] + (f": {e.filename}" if e.filename else "")
    if isinstance(e, pyetcd.exceptions.ConnectionTimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
