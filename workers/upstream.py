"""Queries in flight to the backends, over UDP.

Each upstream socket has a receiving thread and a table of pending queries
keyed by the 16-bit upstream ID. Nothing here takes a lock per packet:
inserts and removals are single dict operations, atomic under the GIL, and
a reply and a timeout race for the same entry through ``dict.pop``.

Expiry scans the table of pending queries. It holds only the queries not
yet answered (rate x backend latency: tens, normally), so the scan costs
little, and nothing has to be appended per packet; a deadline queue would
keep every query, answered or not, for the whole timeout (megabytes at tens
of thousands of queries a second).
"""
from __future__ import annotations

import array
import os
import socket
import time
from typing import Callable, Iterator, TypeAlias

from dnsrouter.address import Address
from dnsrouter.routes import Pool

from . import mmsg
from .types import Client, Counts, Outbox

MAX_IN_FLIGHT = 60_000  # per upstream socket at most; of 65,536 IDs, keep some free


class Pending:
    """One query waiting for a backend's reply."""

    __slots__ = ("client", "addr", "query", "question", "pool",
                 "backend", "retried", "strip_opt", "sent", "tcp")

    def __init__(self, client: Client, addr: bytes | None, query: bytes, question: bytes,
                 pool: Pool, backend: Address, strip_opt: bool, tcp: bool) -> None:
        self.client = client
        self.addr = addr  # the client's raw address; None over TCP
        self.query = query  # with the client's ID: only the sent copy carries ours
        self.question = question  # wire bytes of the question, to check the reply
        self.pool = pool
        self.backend = backend
        self.retried = False
        self.strip_opt = strip_opt
        self.sent = 0.0
        self.tcp = tcp


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


# What to do with a valid reply, on the receiving socket's thread: (entry,
# reply, that thread's counts, the outbox of its batch).
OnReply: TypeAlias = Callable[[Pending, bytes, Counts, Outbox], None]


class Upstream:
    """One UDP socket towards the backends of one address family."""

    def __init__(self, family: int, on_reply: OnReply, counts: Counts, limit: int = MAX_IN_FLIGHT) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        # Port 0: the kernel picks a random ephemeral port.
        self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        self.fd = self.sock.fileno()
        self.pending: dict[int, Pending] = {}
        self._ids = RandomIds()
        self._on_reply = on_reply
        self.counts = counts  # this socket's thread counts here
        self.limit = min(limit, MAX_IN_FLIGHT)

    def send(self, entry: Pending, outbox: Outbox | None = None) -> bool:
        """Send ``entry.query`` to ``entry.backend``, with the batch or now;
        False when too busy."""
        pending = self.pending
        if len(pending) >= self.limit:
            return False
        # The send time first: the timer thread may scan the table as soon as
        # the entry is in it, and must not take a stale time for an expired one.
        entry.sent = time.monotonic()
        while True:
            uid = self._ids.next()
            if pending.setdefault(uid, entry) is entry:
                break
        query = uid.to_bytes(2, "big") + entry.query[2:]
        if outbox is None:
            mmsg.send(self.fd, query, mmsg.raw_address(entry.backend))
        else:
            outbox.add(self.fd, query, mmsg.raw_address(entry.backend))
        return True  # a datagram the kernel refuses times out like a lost one

    def serve(self) -> None:
        """Receive replies forever (the socket's own thread)."""
        receive = mmsg.Receiver(self.sock).receive
        pending = self.pending
        on_reply = self._on_reply
        counts = self.counts
        peer_key = mmsg.peer_key
        outbox = mmsg.Outbox()  # the relayed replies of one batch
        while True:
            try:
                batch = receive()
            except OSError:
                continue  # ICMP errors surface here on Linux; the deadline covers them
            for data, addr in batch:
                if len(data) < 12:
                    counts["ignored_replies", "short"] += 1
                    continue
                uid = data[0] << 8 | data[1]
                entry = pending.get(uid)
                if entry is None:
                    counts["ignored_replies", "unknown_id"] += 1
                    continue
                key = peer_key(entry.backend)
                if addr[:len(key)] != key:
                    counts["ignored_replies", "wrong_source"] += 1
                    continue
                question = entry.question
                if not data[2] & 0x80 or data[12:12 + len(question)].lower() != question:
                    counts["ignored_replies", "wrong_question"] += 1
                    continue
                if pending.pop(uid, None) is not entry:
                    continue  # the timer took it a moment ago
                on_reply(entry, data, counts, outbox)
            outbox.flush()

    def expired(self, sent_before: float) -> list[Pending]:
        """Entries sent before ``sent_before`` that got no reply: taken out."""
        out = []
        pending = self.pending
        for uid, entry in list(pending.items()):  # a copy: other threads change the dict
            if entry.sent > sent_before:
                continue
            taken = pending.pop(uid, None)
            if taken is entry:
                out.append(entry)
            elif taken is not None:
                pending.setdefault(uid, taken)  # answered and the ID reused meanwhile; put it back
        return out
