"""The decision for every query: answer it here, or forward it to a backend."""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dnsrouter import acl, cache, ecs, ratelimit, wire
from dnsrouter.address import Address
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.purges import PurgeLog
from dnsrouter.ratelimit import RateTable
from dnsrouter.routes import Matcher
from dnsrouter.settings import Config
from dnsrouter.snapshot import Snapshot

from .stats import Stats, observe_latency
from .types import Client, Counts, Outbox
from .upstream import Pending, RandomIds, Upstream, serve_together
from . import mmsg, tcp_fetch
from .rtt import Rtt

if TYPE_CHECKING:
    from . import _fastpath
    from .fastpath import FastPath

log = logging.getLogger("dnsrouter.worker")
qlog = logging.getLogger("dnsrouter.queries")

_FORMERR, _SERVFAIL, _REFUSED, _NOTIMP = wire.FORMERR, wire.SERVFAIL, wire.REFUSED, wire.NOTIMP

# The cache's byte limit per entry of ``[cache] size``: a signed NXDOMAIN
# with NSEC3 proofs is about 1 KiB, a plain answer a few hundred bytes.
CACHE_BYTES_PER_ENTRY = 2048


@dataclass(frozen=True)
class ClientAddress:
    """How backends learn the client's address: ``[forward] client_address``
    (the default of members whose registry value names none) and its options."""

    mode: str
    proxy_tcp: bool
    ecs_ipv4_prefix: int
    ecs_ipv6_prefix: int
    ecs_override: bool

    @classmethod
    def from_config(cls, config: Config) -> ClientAddress:
        return cls(config.forward_client_address, config.forward_proxy_tcp, config.forward_ecs_ipv4_prefix,
                   config.forward_ecs_ipv6_prefix, config.forward_ecs_override)


class Forwarder:
    """Shared by every serving thread of a worker.

    ``matcher`` is replaced whole when a snapshot arrives; a thread that read
    the old one a moment earlier finishes its query with it, which is fine.
    """

    # Upstream sockets per address family, each query sent from one picked at
    # random: the source port an off-path spoofer must guess, beside the ID.
    SOCKETS = 4

    def __init__(self, config: Config, stats: Stats, fast: FastPath | None = None,
                 purges: PurgeLog | None = None, limits: RateTable | None = None,
                 rrl: RateTable | None = None) -> None:
        """Every value from ``config``; ``fast``: the compiled UDP path
        (workers/fastpath.py, as ``[server] fast_path`` allows), or None: all
        in Python; ``purges``: the log of cache purges every worker reads,
        ``limits`` and ``rrl`` the tables of the rate limits' accounts (each
        a worker's own if None and the limit is on)."""
        # timeout, retry_min and query_log change on SIGHUP (workers/live.py);
        # the packet path reads them where it uses them.
        self.timeout = config.forward_timeout
        self.fast = fast
        # The pending entries' class: the compiled loops read the fields of theirs directly.
        self.Pending: type[Pending] = fast.Pending if fast else Pending
        self.client_address = ClientAddress.from_config(config)
        self.retry_min = config.forward_retry_min
        self.stats = stats
        self.allowed = acl.make(config.server_allow)
        self.allow = config.server_allow  # the same networks, for the compiled path's matcher (_fastpath.Networks)
        self.deny_action = config.server_deny_action
        # The answer to a query no route (or no usable backend) is there for: [forward] no_route.
        self.no_route = _REFUSED if config.forward_no_route == "refused" else _SERVFAIL
        self._per_socket = -(-config.server_max_in_flight // self.SOCKETS)
        self.matcher = Matcher(())
        self.version = -1
        self.query_log = config.log_queries
        # The packet cache (dnsrouter/cache.py), compiled with the fast path: one
        # per worker, shared by its threads. None: off, and the path does not look.
        self.cache: cache.PacketCache | _fastpath.PacketCache | None = None
        self.purges = purges or PurgeLog()
        if config.cache_size:
            cache_class = fast.PacketCache if fast else cache.PacketCache
            self.cache = stats.add(cache_class(config.cache_size, config.cache_size * CACHE_BYTES_PER_ENTRY,
                                               config.cache_max_ttl, config.cache_max_negative_ttl, self.purges))
        # [limits] and [rrl] (dnsrouter/ratelimit.py; compiled twins with the fast path). None: off.
        self.limits: ratelimit.QueryLimit | _fastpath.QueryLimit | None = None
        self.rrl: ratelimit.ResponseLimit | _fastpath.ResponseLimit | None = None
        if config.limits_client_qps:
            self.limits = (fast.QueryLimit if fast else ratelimit.QueryLimit)(
                limits or RateTable(config.limits_table_size), config.limits_client_qps, config.limits_burst,
                config.limits_ipv4_prefix, config.limits_ipv6_prefix, config.limits_exempt)
        if config.rrl_responses_per_second:
            rate = config.rrl_responses_per_second
            rates = (rate, rate if config.rrl_nxdomains_per_second is None else config.rrl_nxdomains_per_second,
                     rate if config.rrl_errors_per_second is None else config.rrl_errors_per_second)
            self.rrl = (fast.ResponseLimit if fast else ratelimit.ResponseLimit)(
                rrl or RateTable(config.rrl_table_size), rates, config.rrl_slip, config.rrl_window,
                config.rrl_ipv4_prefix, config.rrl_ipv6_prefix, config.rrl_exempt)
        self.notify_allowed = acl.make(config.cache_notify_allow)  # None: nobody (acl.make's None is everyone)
        self.notify_allow = config.cache_notify_allow  # the same networks, for the compiled path
        self._routes: tuple[object, ...] = ()  # the routes the cache's entries were answered under
        # Passive health evidence: unanswered tries and ICMP errors in a row
        # per backend, "in a row" by the order queries were sent. A backend
        # that answered a query sent after the lost one is alive; a burst of
        # packets lost to a full buffer must not take down a backend that
        # answers thousands of others.
        self.streaks: dict[Address, int] = {}
        # last_answered, rtts, rtos and upstreams are filled in place, never
        # replaced: the compiled loops take them once, when they start.
        self.last_answered: dict[Address, float] = {}  # backend -> send time of its latest answered query
        # What the supervisor has not been told yet: backend -> latest streak.
        # The worker sends it at most every EVIDENCE_INTERVAL, one message for
        # all backends: a dead backend at 20,000 qps must not flood the pipe.
        self.evidence: dict[Address, int] = {}
        self.rtts: dict[Address, Rtt] = {}
        self.rtos: dict[Address, float] = {}  # each backend's retry time, kept ready for the packet path
        self.upstreams: dict[int, list[Upstream]] = {}
        self._upstreams_lock = threading.Lock()  # taken once per family, at its first query
        self._adopted: list[Upstream] = []  # see start
        self._random = RandomIds()
        # Truncated replies fetched again over TCP: a bounded pool, never a thread per reply.
        self.tcp_fetches: tcp_fetch.Fetches[Pending] = tcp_fetch.Fetches(
            config.forward_tcp_fetches, stats, self._fetch_tcp)

    # -- snapshots -------------------------------------------------------
    def apply(self, snapshot: Snapshot) -> None:
        old = self.matcher
        same_routes = tuple(r.pattern for r in snapshot.routes) == tuple(r.pattern for r in old.routes)
        # A health-only change keeps the compiled RE2 set: no recompile.
        self.matcher = Matcher(snapshot.routes, snapshot.down, old.set if same_routes and old.routes else None,
                               self.client_address.mode)
        self.version = snapshot.version
        if snapshot.routes is not self._routes:  # the same object while line 2 of the snapshot is the same
            self._routes = snapshot.routes
            if self.cache is not None:
                self.cache.purge_all("routes")  # where a name goes may have changed: its replies too
        # A backend's first estimate is its health check's round trip (over
        # TCP, so if anything too long: no needless retries at the start).
        for backend, seconds in snapshot.rtt.items():
            if backend not in self.rtts:
                self.rtts[backend] = Rtt(seconds)
                self.rtos[backend] = self.rtts[backend].timeout(self.retry_min, self.timeout / 2)

    def retune(self) -> None:
        """Each backend's retry time again, after ``timeout`` or ``retry_min``
        changed (SIGHUP): a backend that never answers would keep its old one."""
        for backend, estimate in list(self.rtts.items()):
            self.rtos[backend] = estimate.timeout(self.retry_min, self.timeout / 2)

    # -- threads ---------------------------------------------------------
    def start(self, adopted: bool = False) -> None:
        """The IPv4 upstream sockets (IPv6 ones come with the first IPv6
        backend). ``adopted``: on the compiled path, no thread of their own;
        the first ``udp`` thread serves them beside its listening socket
        (``adopt``), so that a query and its reply take no hand-over."""
        self.upstreams_for(socket.AF_INET, thread=not (adopted and self.fast))

    def adopt(self) -> list[Upstream]:
        """The upstreams ``start`` left for a udp thread to serve: to the first that asks."""
        with self._upstreams_lock:
            adopted, self._adopted = self._adopted, []
        return adopted

    def upstreams_for(self, family: int, thread: bool = True) -> list[Upstream]:
        """The upstream sockets of an address family, made (and given their
        threads) at the family's first query; the compiled path calls this
        too, on a family it has not seen in ``upstreams``."""
        with self._upstreams_lock:
            if family not in self.upstreams:
                fast = self.fast
                pool = [Upstream(family, self, self.stats.for_thread(), self._per_socket, fast,
                                 self.stats.add(fast.Counters(len(LATENCY_BUCKETS))) if fast else None)
                        for _ in range(self.SOCKETS)]
                if not thread:
                    self._adopted = pool
                elif fast:  # the compiled loop serves them all in one thread (upstream.serve_together)
                    threading.Thread(target=serve_together, args=(pool,), name="upstream", daemon=True).start()
                else:
                    for upstream in pool:
                        threading.Thread(target=upstream.serve, name="upstream", daemon=True).start()
                self.upstreams[family] = pool
            return self.upstreams[family]

    def _all_upstreams(self) -> list[Upstream]:
        return [u for pool in list(self.upstreams.values()) for u in pool]

    def in_flight(self) -> int:
        return sum(len(u.pending) for u in self._all_upstreams())

    # -- the packet path -------------------------------------------------
    def handle(self, data: bytes, addr: bytes | None, client: Client, counts: Counts, tcp: bool = False,
               outbox: Outbox | None = None, admitted: bool = False) -> None:
        """One query from a client (``addr``: its raw address, None over TCP);
        what it sends goes with ``outbox`` if given, else at once.
        ``admitted``: the compiled path has charged it to ``[limits]``
        already. Never raises."""
        try:
            self._handle(data, addr, client, counts, tcp, outbox, admitted)
        except Exception:  # a bug must cost one query, never the worker
            counts["dropped", "error"] += 1
            log.exception("query handling failed")

    def _handle(self, data: bytes, addr: bytes | None, client: Client, counts: Counts, tcp: bool,
                outbox: Outbox | None, admitted: bool = False) -> None:
        if len(data) < 12:
            counts["dropped", "short"] += 1
            return
        flags = data[2]
        if flags & 0x80:
            counts["dropped", "response"] += 1
            return
        counts["queries", "tcp" if tcp else "udp"] += 1
        # [limits]: UDP only, where sources can be forged and floods are cheap; before anything costs.
        if self.limits is not None and addr is not None and not admitted and \
                not self.limits.allow(addr, time.monotonic_ns()):
            counts["dropped", "client_qps"] += 1
            return
        if self.allowed is not None and addr is not None and not self.allowed(mmsg.host(addr)):
            if self.deny_action == "drop":
                counts["dropped", "acl"] += 1
                return
            return self._answer(data, _REFUSED, None, 0, addr, client, counts, outbox)
        rcode, question, end, lower = wire.check_query(data)
        if rcode:
            if rcode == _NOTIMP and (flags >> 3) & 0xF == wire.OPCODE_NOTIFY:
                return self._notify(data, question, end, addr, client, counts, outbox)
            return self._answer(data, rcode, question, end, addr, client, counts, outbox)
        pool = self.matcher.lookup_wire(lower[:-4], wire.name_to_text)
        if self.query_log:
            assert question is not None  # check_query gives one with rcode 0
            qlog.info("%s %s %s %d -> %s", "tcp" if tcp else "udp", mmsg.host(addr) if addr else "-",
                      wire.name_to_text(question[0]), question[1],
                      pool.route.pattern if pool else "REFUSED" if self.no_route == _REFUSED else "SERVFAIL")
        if pool is None:
            return self._answer(data, self.no_route, question, end, addr, client, counts, outbox)
        if self.cache is not None and not pool.modes:  # a reply shaped by the client's address is its own
            cached = self.cache.lookup(data, end, tcp, time.monotonic())
            if cached is not None:
                return self._respond(client, cached, addr, counts, outbox)
        strip_opt = False
        query = data
        if tcp:
            query, strip_opt = wire.with_large_buffer(data, end)
        entry = self.Pending(client, addr, query, lower, pool, pool.next(), strip_opt, tcp)
        if pool.modes and not self._variants(entry, end, counts):  # none costs this test only
            return self._answer(data, _FORMERR, question, end, addr, client, counts, outbox)
        self._send(entry, counts, outbox)

    def _variants(self, entry: Pending, end: int, counts: Counts) -> bool:
        """What each member of the pool that learns the client's address gets:
        a PROXY v2 header before the query, or the query with ECS. False for
        a query whose additional records do not parse (FORMERR: forwarded
        as it is, a client's own ECS would slip past ecs_override)."""
        settings = self.client_address
        variants: dict[Address, tuple[bytes, bytes]] = {}
        with_ecs: bytes | None = None
        for backend, mode in entry.pool.modes.items():
            try:
                if mode == "proxy":
                    variants[backend] = (entry.client.proxy_header(entry.addr), entry.query)
                    continue
                if with_ecs is None:
                    with_ecs, entry.ecs_added = ecs.add(
                        entry.query, end, entry.client.host(entry.addr), settings.ecs_ipv4_prefix,
                        settings.ecs_ipv6_prefix, settings.ecs_override)
                variants[backend] = (b"", with_ecs)
            except wire.WireError:
                return False
            except ValueError:  # a client address no header or option can carry: as it is, counted
                counts["client_address_failed", mode] += 1
        entry.variants = variants
        return True

    def _send(self, entry: Pending, counts: Counts, outbox: Outbox | None = None) -> None:
        family = entry.backend.family
        pool = self.upstreams.get(family) or self.upstreams_for(family)
        # A batch's queries leave together, from one socket picked per batch.
        pick = self._random.next() if outbox is None else outbox.pick
        if not pool[pick % self.SOCKETS].send(entry, outbox):
            counts["dropped", "in_flight_limit"] += 1  # never unbounded memory
            return
        counts["backend_queries", entry.backend] += 1

    def _notify(self, data: bytes, question: tuple[bytes, int, int] | None, end: int, addr: bytes | None,
                client: Client, counts: Counts, outbox: Outbox | None) -> None:
        """A NOTIFY (RFC 1996) for zone Z: from ``[cache] notify_allow``, every
        worker's cache forgets Z and what is below it, then NOERROR with AA;
        from elsewhere REFUSED, nothing purged."""
        if question is None or data[4] or data[5] != 1:
            return self._answer(data, _FORMERR, question, end, addr, client, counts, outbox)
        if self.notify_allowed is None or not self.notify_allowed(client.host(addr)):
            return self._answer(data, _REFUSED, question, end, addr, client, counts, outbox)
        self.purges.append(question[0].lower(), True, "notify")  # every worker's cache, this one's included
        self._answer(data, 0, question, end, addr, client, counts, outbox, authoritative=True)

    def _answer(self, data: bytes, rcode: int, question: tuple[bytes, int, int] | None, end: int,
                addr: bytes | None, client: Client, counts: Counts, outbox: Outbox | None,
                authoritative: bool = False) -> None:
        edns = bool(end) and wire.has_opt(data, end)
        self._respond(client, wire.make_answer(data, rcode, question, edns, authoritative), addr, counts, outbox)

    def _respond(self, client: Client, reply: bytes, addr: bytes | None, counts: Counts,
                 outbox: Outbox | None = None) -> None:
        """Every answer to a client goes here: ``[rrl]`` for UDP ones (TCP
        is never limited: its source cannot be forged), then out."""
        if self.rrl is not None and addr is not None:
            limited, kind = self.rrl.check(reply, addr, time.monotonic_ns())
            if kind >= 0:
                counts["rrl_limited", ratelimit.KINDS[kind]] += 1
                counts["rrl", "dropped" if limited is None else "slipped"] += 1
                if limited is None:
                    return
                reply = limited
        counts["responses", reply[3] & 0xF] += 1
        client.send(reply, addr, outbox)

    # -- the upstream sockets' policy (upstream.Policy), on their threads ----
    def rto(self, backend: Address) -> float:
        try:
            return self.rtos[backend]
        except KeyError:  # never answered, never checked: half the timeout
            return self.timeout / 2

    def retry_target(self, entry: Pending) -> Address:
        return entry.pool.other(entry.backend) or entry.backend  # a pool of one: the same once more

    def answered(self, backend: Address, sent: float, rtt: float, counts: Counts) -> None:
        if sent > self.last_answered.get(backend, 0.0):
            self.last_answered[backend] = sent
        observe_latency(counts, rtt)
        estimate = self.rtts.get(backend)
        if estimate is None:
            estimate = self.rtts[backend] = Rtt(rtt)
        else:
            estimate.sample(rtt)
        self.rtos[backend] = estimate.timeout(self.retry_min, self.timeout / 2)

    def unanswered(self, backend: Address, sent: float, counts: Counts) -> None:
        counts["backend_timeouts", backend] += 1
        if self.last_answered.get(backend, 0.0) > sent:
            self.streaks[backend] = 0  # it answered later queries: alive
        else:
            self._evidence(backend)

    def unreachable(self, backend: Address, counts: Counts) -> None:
        self._evidence(backend)

    def _evidence(self, backend: Address) -> None:
        streak = self.streaks[backend] = self.streaks.get(backend, 0) + 1
        self.evidence[backend] = streak

    def fail(self, entry: Pending, counts: Counts) -> None:
        self._servfail(entry, counts)

    def srtts(self) -> dict[str, float]:
        """Each backend's smoothed round trip, for the metrics."""
        return {str(b): r.srtt for b, r in list(self.rtts.items())}

    # -- replies -------------------------------------------------------------
    def reply(self, entry: Pending, data: bytes, counts: Counts, outbox: Outbox) -> None:
        """The first valid reply to ``entry`` (``entry.backend`` answered it)."""
        if entry.tcp and data[2] & 0x02:  # TC: fetch it whole over TCP, off this thread
            if not self.tcp_fetches.submit(entry):
                counts["dropped", "tcp_fetch_queue"] += 1  # the pool's backlog is full: no waiting without end
                self._servfail(entry, counts)
            return
        self._relay(entry, data, counts, outbox)
        if self.cache is not None and not entry.tcp and entry.variants is None:
            self.cache.insert(entry.query, 12 + len(entry.question), data, time.monotonic(), entry.sent)

    def _relay(self, entry: Pending, data: bytes, counts: Counts, outbox: Outbox | None = None) -> None:
        """The backend's reply to the client: its own bytes, the client's ID."""
        reply = entry.query[:2] + data[2:]  # the client's ID back
        if entry.ecs_added is not None and entry.pool.modes.get(entry.backend) == "ecs":
            try:  # the client gets no option it did not send, and no more than it can take
                reply = ecs.restore(reply, entry.ecs_added, 65535 if entry.tcp else entry.ecs_added.payload)
            except wire.WireError:
                pass  # relayed as it is: better an extra option than no answer
        if entry.strip_opt:
            try:
                reply = wire.without_opt(reply)
            except (wire.WireError, struct.error):
                pass  # relayed as it is: the client copes with an OPT better than with nothing
        self._respond(entry.client, reply, entry.addr, counts, outbox)

    def _fetch_tcp(self, entry: Pending, counts: Counts) -> None:
        """On a thread of the fetch pool; ``counts`` are that thread's."""
        variant = entry.variants.get(entry.backend) if entry.variants else None
        prefix, query = variant or (b"", entry.query)
        if prefix:  # a PROXY header: over TCP only when asked, and then the stream form
            prefix = entry.client.proxy_header(entry.addr, True) if self.client_address.proxy_tcp else b""
        try:
            reply = tcp_fetch.exchange(entry.backend, query, self.timeout, prefix)
        except (OSError, ValueError):
            counts["backend_timeouts", entry.backend] += 1
            self._servfail(entry, counts)
        else:
            self._relay(entry, reply, counts)

    def _servfail(self, entry: Pending, counts: Counts) -> None:
        qname, qtype, qclass, end = wire.parse_question(entry.query)
        # An OPT the router added for a TCP client is not the client's EDNS.
        edns = not entry.strip_opt and wire.has_opt(entry.query, end)
        self._respond(entry.client, wire.make_answer(entry.query, _SERVFAIL, (qname, qtype, qclass), edns),
                      entry.addr, counts)
