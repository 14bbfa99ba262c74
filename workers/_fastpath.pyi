"""The compiled UDP path's Python API (built from _fastpath.pyx), for mypy."""
import socket
import threading
from typing import Callable

from dnsrouter.routes import Matcher, Pool
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.types import Client, CountKey, Counts, Outbox as OutboxType
from dnsrouter.workers.upstream import Pending as PythonPending, Upstream

BUILT: bool
HANDOFF_REASONS: tuple[str, ...]

def classify(packet: bytes) -> tuple[int, bytes] | None:
    """(end of the question, the question lower-cased) of a query the
    compiled path takes, else None."""

class RouteCache:
    def __init__(self) -> None: ...
    def lookup(self, matcher: Matcher, question: bytes) -> tuple[bytes, Pool | None]: ...

class Receiver:
    def __init__(self, sock: socket.socket, n: int = 0, wait: bool = True) -> None: ...
    def receive(self) -> list[tuple[bytes, bytes]]: ...

class Outbox:
    pick: int
    def __init__(self) -> None: ...
    def add(self, fd: int, payload: bytes, name: bytes) -> None: ...
    def flush(self) -> None: ...

class Counters:
    def __init__(self, latency_buckets: int = 0) -> None: ...
    def snapshot(self) -> dict[CountKey, float]: ...

# The same fields as upstream.Pending, as a C struct: typed as a subclass so
# that the Python code takes either (it is not one at run time).
class Pending(PythonPending): ...

class Replies:
    def __init__(self, upstream: Upstream, counters: Counters) -> None: ...

def serve(sock: socket.socket, forwarder: Forwarder, counts: Counts, counters: Counters,
          stopping: threading.Event, client: Client, failed: Callable[[], None],
          replies: list[Replies] = ...) -> list[Upstream]: ...
def serve_upstreams(replies: list[Replies]) -> None: ...
def due_retries(upstream: Upstream, now: float, counts: Counts, outbox: OutboxType) -> None: ...
