"""Queries in flight to the backends, over UDP.

Each upstream socket has a receiving thread and a table of pending queries
keyed by the 16-bit upstream ID. Any thread sends (inserting into the
table); only the socket's own thread decides what becomes of a query: the
reply, the early retry, an ICMP error, the timeout. One owner per query, so
"first answer wins" needs no lock and no atomic claim: a query answered is
``done``, and whatever comes for it afterwards is late.

A query not answered within its backend's retry time (``Policy.rto``: SRTT
+ 4 x RTTVAR, clamped) is sent again, from the same socket under a second
ID, to another member of its pool, and both tries stay open. An ICMP error
(IP_RECVERR: the kernel hands back the datagram it refers to, so we know the
query) sends it on at once. ``[forward] timeout`` after the first send, the
query gets SERVFAIL if nothing answered, and each try still open counts as
unanswered against its backend.

Retries are found through per-backend queues in send order, which hold a
query only until its retry time (tens of milliseconds); timeouts by scanning
the table, which holds only queries not yet answered. A deadline queue of
every query for the whole timeout would cost megabytes at tens of thousands
of queries a second.
"""
from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from dnsrouter import ecs, proxy
from dnsrouter.address import Address
from dnsrouter.routes import Pool

from . import mmsg
from .types import Client, Counts, Outbox

if TYPE_CHECKING:
    from ._fastpath import Counters, Replies
    from .fastpath import FastPath

MAX_IN_FLIGHT = 60_000  # per upstream socket at most; of 65,536 IDs, keep some free
TICK = 0.005  # seconds between two looks at due retries when no reply wakes the thread
# Of a datagram an ICMP error returns, enough for a PROXY v2 header (16 bytes
# and at most 216 of addresses) and the DNS ID after it.
_ERROR_HEAD = 16 + 216 + 2
_IP_RECVERR, _IPV6_RECVERR = 11, 25  # linux/in.h, linux/in6.h; the socket module lacks them
# A plain int: `|` of the socket module's IntFlag members runs enum code in
# Python on every tick, a cost of the same order as reading the error queue.
_ERROR_QUEUE = int(socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)


class Pending:
    """One query waiting for a backend's reply: its first try and its retry.

    While the compiled path runs, the entries are ``_fastpath.Pending``, the
    same fields as a C struct: a new slot goes there as well."""

    __slots__ = ("client", "addr", "query", "question", "pool", "strip_opt", "tcp",
                 "backend", "sent", "uid", "retry_at", "retry_backend", "retry_sent", "retry_uid", "done",
                 "variants", "ecs_added")

    def __init__(self, client: Client, addr: bytes | None, query: bytes, question: bytes,
                 pool: Pool, backend: Address, strip_opt: bool, tcp: bool) -> None:
        self.client = client
        self.addr = addr  # the client's raw address; None over TCP
        self.query = query  # with the client's ID: only the sent copies carry ours
        self.question = question  # wire bytes of the question, to check the reply
        self.pool = pool
        self.strip_opt = strip_opt
        self.tcp = tcp
        self.backend = backend  # of the first try; once answered, of the try that answered
        self.sent = 0.0  # of the first try: the timeout counts from here
        self.uid = -1
        self.retry_at = 0.0
        self.retry_backend = backend
        self.retry_sent = 0.0
        self.retry_uid = -1  # -1: not retried
        self.done = False  # answered, or SERVFAIL sent: nothing more to do
        # For the members of a pool that learn the client's address: backend ->
        # (what goes before the message, the message). None: every backend
        # gets ``query`` as it is, the case that must cost nothing.
        self.variants: dict[Address, tuple[bytes, bytes]] | None = None
        self.ecs_added: ecs.Added | None = None  # what the ECS variant added, to take out of the reply


class RandomIds:
    """Unpredictable 16-bit IDs, drawn from the kernel in batches."""

    def __init__(self) -> None:
        self._it: Iterator[int] = iter(())

    def next(self) -> int:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(array.array("H", os.urandom(8192)))
            return next(self._it)


class Policy(Protocol):
    """What the forwarder decides for the upstream sockets."""

    timeout: float  # seconds from the first send to SERVFAIL

    def rto(self, backend: Address) -> float:
        """Seconds to wait for ``backend`` before the early retry."""

    def retry_target(self, entry: Pending) -> Address:
        """Where the retry goes: another usable member of the pool, or the same."""

    def answered(self, backend: Address, sent: float, rtt: float, counts: Counts) -> None:
        """``backend`` answered the try sent at ``sent`` after ``rtt`` seconds."""

    def reply(self, entry: Pending, data: bytes, counts: Counts, outbox: Outbox) -> None:
        """The first valid reply: relay it (``entry.backend`` is who answered)."""

    def unanswered(self, backend: Address, sent: float, counts: Counts) -> None:
        """The try sent to ``backend`` at ``sent`` got nothing within the timeout."""

    def unreachable(self, backend: Address, counts: Counts) -> None:
        """An ICMP error said ``backend`` cannot be reached."""

    def fail(self, entry: Pending, counts: Counts) -> None:
        """Nothing answered in time, or every try was unreachable: SERVFAIL."""


class Upstream:
    """One UDP socket towards the backends of one address family."""

    def __init__(self, family: int, policy: Policy, counts: Counts, limit: int = MAX_IN_FLIGHT,
                 fast: FastPath | None = None, counters: Counters | None = None) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        # ICMP errors for unconnected UDP sockets reach us only when asked for.
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        # The receive gives up after TICK, so that due retries are sent even
        # when no reply arrives to wake the thread.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(TICK * 1e6)))
        # Port 0: the kernel picks a random ephemeral port.
        self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        self.fd = self.sock.fileno()
        self.pending: dict[int, Pending] = {}
        # First tries by backend, in send order, until their retry time: the
        # retry times of one backend's queries come in the same order.
        self.waiting: dict[Address, deque[Pending]] = {}
        self._ids = RandomIds()
        self.policy = policy
        self.counts = counts  # this socket's thread counts here
        self.limit = min(limit, MAX_IN_FLIGHT)
        self._scan_at = 0.0
        self._closing = False
        self.fast = fast  # the compiled reply loop (workers/fastpath.py), or None
        # The sweep of the retry queues, every tick: compiled where the module
        # is, since every first try passes through it once.
        self._due_retries: Callable[[Upstream, float, Counts, Outbox], None] = \
            fast.due_retries if fast is not None else due_retries
        self.counters = counters  # what the compiled loop counts itself (fast.Counters), read by the reporter

    def send(self, entry: Pending, outbox: Outbox | None = None) -> bool:
        """The first try: ``entry.query`` to ``entry.backend``, with the batch
        or now; False when too busy. Any thread."""
        pending = self.pending
        if len(pending) >= self.limit:
            return False
        # Times first: the owner thread may look at the entry as soon as it is in.
        entry.sent = now = time.monotonic()
        entry.retry_at = now + self.policy.rto(entry.backend)
        uid = self._insert(entry, False)
        waiting = self.waiting.get(entry.backend)
        if waiting is None:
            waiting = self.waiting.setdefault(entry.backend, deque())
        waiting.append(entry)
        self._transmit(uid, entry, entry.backend, outbox)
        return True  # a datagram the kernel refuses times out like a lost one

    def _insert(self, entry: Pending, retry: bool) -> int:
        pending = self.pending
        while True:
            uid = self._ids.next()
            if retry:
                if uid == entry.uid:
                    continue  # setdefault would find the entry itself there: the two tries need two IDs
                entry.retry_uid = uid
            else:
                entry.uid = uid
            if pending.setdefault(uid, entry) is entry:
                return uid

    def _transmit(self, uid: int, entry: Pending, backend: Address, outbox: Outbox | None) -> None:
        variants = entry.variants
        if variants is None:
            query = uid.to_bytes(2, "big") + entry.query[2:]
        else:
            prefix, message = variants.get(backend) or (b"", entry.query)
            query = prefix + uid.to_bytes(2, "big") + message[2:]
        if outbox is None:
            mmsg.send(self.fd, query, mmsg.raw_address(backend))
        else:
            outbox.add(self.fd, query, mmsg.raw_address(backend))

    # -- the owner thread --------------------------------------------------
    def serve(self) -> None:
        """Receive replies and run the clocks, forever (the socket's own thread)."""
        if self.fast is not None:  # the same batch loop, compiled (workers/_fastpath.pyx)
            serve_together([self])
            return
        receive = mmsg.Receiver(self.sock).receive
        pending = self.pending
        policy = self.policy
        counts = self.counts
        peer_key = mmsg.peer_key
        monotonic = time.monotonic
        outbox = mmsg.Outbox()  # the relayed replies and retries of one batch
        due = 0.0
        while not self.closing:
            batch: list[tuple[bytes, bytes]] = []
            try:
                batch = receive()
            except OSError as e:
                if e.errno in mmsg.STALE_ERRORS:
                    self.errors(counts, outbox)
            now = monotonic()
            for data, addr in batch:
                if len(data) < 12:
                    counts["ignored_replies", "short"] += 1
                    continue
                uid = data[0] << 8 | data[1]
                entry = pending.get(uid)
                if entry is None:
                    counts["ignored_replies", "unknown_id"] += 1
                    continue
                retry = uid == entry.retry_uid
                backend = entry.retry_backend if retry else entry.backend
                key = peer_key(backend)
                if addr[:len(key)] != key:
                    counts["ignored_replies", "wrong_source"] += 1
                    continue
                question = entry.question  # the name lower-cased, then type and class as asked
                stop = 8 + len(question)
                if not data[2] & 0x80 or data[12:stop].lower() != question[:-4] or data[stop:stop + 4] != question[-4:]:
                    counts["ignored_replies", "wrong_question"] += 1
                    continue
                del pending[uid]
                sent = entry.retry_sent if retry else entry.sent
                policy.answered(backend, sent, now - sent, counts)
                if entry.done:
                    counts["late_replies", backend] += 1  # the other try won, or the timeout
                    continue
                entry.done = True
                if retry:  # the try that answered becomes the first: entry.backend answered
                    entry.backend, entry.retry_backend = entry.retry_backend, entry.backend
                    entry.uid, entry.retry_uid = entry.retry_uid, entry.uid
                    entry.sent, entry.retry_sent = entry.retry_sent, entry.sent
                policy.reply(entry, data, counts, outbox)
            outbox.flush()  # the replies go out before the clocks' work, not after it
            if now >= due:
                due = now + TICK
                self.tick(now, counts, outbox, len(batch) >= mmsg.BATCH)
            outbox.flush()
        self.sock.close()  # here, by the thread that reads it: its number cannot be reused under it

    def close(self) -> None:
        """Stop the owner thread (within TICK), which then closes the socket."""
        self._closing = True

    @property
    def closing(self) -> bool:
        """``close`` was called: the owner thread closes the socket at its next tick."""
        return self._closing

    def tick(self, now: float, counts: Counts, outbox: Outbox, batch_full: bool = False) -> None:
        """The clocks, every TICK on the owner thread (Python or compiled):
        ICMP errors, due retries, timeouts. ``batch_full``: the last read
        filled a batch, so replies may still wait in the socket's queue."""
        # With nothing in flight there is no try to retry, to time out or to
        # end on an ICMP error: an idle worker's tick costs nothing (the
        # queues of tries hold answered ones only, popped at the next tick
        # with something in flight; errors wait on the error queue).
        if not self.pending:
            return
        # A send from another thread may have taken the error that would have
        # woken us (mmsg.STALE_ERRORS): the ICMP message waits on the error
        # queue, so look there every tick too.
        self.errors(counts, outbox)
        # Retries only once the replies that have arrived are read (a batch
        # that did not fill up): a query whose answer waits in our own queue
        # is not lost, and a busy worker must not double its load with
        # retries of such queries.
        if not batch_full:
            self._due_retries(self, now, counts, outbox)
        if now >= self._scan_at:
            self._timeouts(now, counts)

    def retry(self, entry: Pending, now: float, counts: Counts, outbox: Outbox) -> None:
        """Send the early retry of ``entry``, to another member of its pool."""
        backend = self.policy.retry_target(entry)
        entry.retry_backend = backend
        entry.retry_sent = now
        uid = self._insert(entry, True)
        self._transmit(uid, entry, backend, outbox)
        counts["backend_retries", entry.backend] += 1
        counts["backend_queries", backend] += 1

    def _timeouts(self, now: float, counts: Counts) -> None:
        """``timeout`` after its first send, a query is over: every try
        still open is unanswered, and SERVFAIL if nothing answered."""
        pending = self.pending
        policy = self.policy
        # Scan often while few queries wait (timeouts stay precise), less
        # often when a dead backend piles them up (the scan stays cheap).
        self._scan_at = now + min(0.1, 0.02 + len(pending) / 200_000)
        sent_before = now - policy.timeout
        for uid, entry in list(pending.items()):  # a copy: senders insert meanwhile
            if entry.sent > sent_before:
                continue
            del pending[uid]
            retry = uid == entry.retry_uid
            policy.unanswered(entry.retry_backend if retry else entry.backend,
                              entry.retry_sent if retry else entry.sent, counts)
            if not entry.done:
                entry.done = True
                policy.fail(entry, counts)

    def errors(self, counts: Counts, outbox: Outbox) -> None:
        """ICMP errors queued on the socket: each names the datagram it refers
        to, so the query's try is over at once; the query goes on elsewhere."""
        pending = self.pending
        while True:
            try:
                data, _, _, peer = self.sock.recvmsg(_ERROR_HEAD, 512, _ERROR_QUEUE)
            except OSError:
                return  # the queue is empty
            at = 0
            if data.startswith(proxy.SIGNATURE):  # our ID follows the PROXY header
                at = 16 + int.from_bytes(data[14:16], "big")
            if len(data) < at + 2:
                continue
            uid = data[at] << 8 | data[at + 1]
            entry = pending.get(uid)
            if entry is None:
                continue
            retry = uid == entry.retry_uid
            backend = entry.retry_backend if retry else entry.backend
            if tuple(peer[:2]) != backend.sockaddr[:2]:
                continue  # about another datagram that had this ID before
            del pending[uid]
            counts["backend_icmp_errors", backend] += 1
            self.policy.unreachable(backend, counts)
            if entry.done:
                continue
            if not retry and entry.retry_uid < 0:
                self.retry(entry, time.monotonic(), counts, outbox)  # at once, not at the retry time
            elif pending.get(entry.uid if retry else entry.retry_uid) is not entry:
                entry.done = True  # both tries unreachable: nothing to wait for
                self.policy.fail(entry, counts)


def due_retries(upstream: Upstream, now: float, counts: Counts, outbox: Outbox) -> None:
    """Send the early retry of every first try of ``upstream`` past its retry time."""
    for waiting in list(upstream.waiting.values()):
        while waiting:
            entry = waiting[0]
            if not (entry.done or entry.retry_uid >= 0):
                if entry.retry_at > now:
                    break
                upstream.retry(entry, now, counts, outbox)
            waiting.popleft()


def replies(upstreams: list[Upstream]) -> list[Replies]:
    """The compiled reply side (``_fastpath.Replies``) of each of ``upstreams``,
    for a compiled loop to serve."""
    out = []
    for u in upstreams:
        if u.fast is None or u.counters is None:
            raise ValueError("the compiled reply loop needs the compiled module and its counters")
        out.append(u.fast.Replies(u, u.counters))
    return out


def serve_together(upstreams: list[Upstream]) -> None:
    """Upstream.serve for all of ``upstreams`` (compiled ones, of one
    forwarder) in the calling thread, until each is closed."""
    loops = replies(upstreams)  # ValueError unless all are compiled
    fast = upstreams[0].fast if upstreams else None
    if fast is not None:
        fast.serve_upstreams(loops)
