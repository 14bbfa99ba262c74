"""What the packet path's pieces ask of one another.

A query's reply goes to a client; the datagrams a batch produces go out
together through an outbox; every thread counts into its own counts. The
forwarder and the upstream sockets see these only through the types below,
which ``udp.UdpClient``, ``tcp.TcpClient`` and ``mmsg.Outbox`` implement.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Protocol, TypeAlias

CountKey: TypeAlias = tuple[str, object]  # (kind, label): ("responses", 2), ("backend_queries", Address)

# A thread's own counters, ``counts[kind, label] += 1`` without a lock: a
# defaultdict(int), so a count needs no first entry. Values are float because
# one counter sums seconds (``latency_sum``); all others stay ints.
Counts: TypeAlias = defaultdict[CountKey, float]


class CountReader(Protocol):
    """Counts a thread keeps outside its dict (the compiled path's, in C)."""

    def snapshot(self) -> dict[CountKey, float]:
        """Every count's total since the start, keyed as in Counts."""


class Outbox(Protocol):
    """The datagrams one thread sends during one batch, sent together at ``flush``."""

    pick: int  # which upstream socket this batch's queries leave from

    def add(self, fd: int, payload: bytes, name: bytes) -> None:
        """Queue ``payload`` for socket ``fd``, to the raw peer address ``name``."""

    def flush(self) -> None:
        """Send everything queued."""


class Client(Protocol):
    """Where the reply to a query goes."""

    def send(self, data: bytes, addr: bytes | None, outbox: Outbox | None = None) -> None:
        """``data`` to the client: ``addr`` is its raw address (None over TCP);
        with the batch of ``outbox`` if given, else at once. Never raises."""

    def host(self, addr: bytes | None) -> str:
        """The client's IP, as text (for ECS and the ACL)."""

    def proxy_header(self, addr: bytes | None, stream: bool = False) -> bytes:
        """The PROXY v2 header for the client's queries to a backend: from the
        client to the router's address it asked (``stream``: for a TCP
        connection). Raises ValueError where there is none to make."""
