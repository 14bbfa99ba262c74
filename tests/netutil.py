"""Network helpers for tests: free loopback ports, polling, one-shot DNS queries.

Everything here talks to 127.0.0.1 only; tests must never send traffic
anywhere else.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Callable, TypeVar

import dns.message
import dns.query

HOST = "127.0.0.1"

T = TypeVar("T")


def free_port(kind: str = "both") -> int:
    """Return a port on 127.0.0.1 that is free right now.

    kind is 'both' (UDP and TCP: DNS servers bind the same number on both),
    'udp' or 'tcp'. The port is only known to be free at the moment of the
    call; whoever binds it next may still lose a race, so servers started on
    it should fail loudly rather than hang.
    """
    if kind not in ("both", "udp", "tcp"):
        raise ValueError(f"kind must be 'both', 'udp' or 'tcp', not {kind!r}")
    first = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    for _ in range(100):
        # Let the kernel pick a number for one protocol, then check the other
        # protocol can have the same number too.
        with socket.socket(socket.AF_INET, first) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
            if kind != "both":
                return port
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met before the deadline",
) -> T:
    """Poll predicate until it returns something truthy and return that.

    Raises AssertionError(message) when timeout seconds pass first, so a
    test fails with a readable reason instead of hanging or sleeping blindly.
    Exceptions raised by predicate propagate: catch them in the predicate if
    "not yet" looks like an exception (e.g. a refused connection).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g}s)")
        time.sleep(interval)


def query(
    name: str | dns.message.Message,
    rdtype: str | int = "A",
    port: int | None = None,
    transport: str = "udp",
    timeout: float = 2.0,
    *,
    rdclass: str | int = "IN",
    host: str = HOST,
    **kw: Any,
) -> dns.message.Message:
    """Send one query to host:port and return the parsed reply.

    name may be a ready dns.message.Message (then rdtype, rdclass and kw are
    ignored). Otherwise kw goes to dns.message.make_query (use_edns, payload,
    want_dnssec, ...). A truncated UDP reply is returned as is (TC set),
    so tests can assert on truncation. Raises dns.exception.Timeout when no
    reply arrives in time.
    """
    if port is None:
        raise ValueError("query() needs port=")
    if isinstance(name, dns.message.Message):
        q = name
    else:
        q = dns.message.make_query(name, rdtype, rdclass, **kw)
    if transport == "udp":
        return dns.query.udp(q, host, port=port, timeout=timeout)
    if transport == "tcp":
        return dns.query.tcp(q, host, port=port, timeout=timeout)
    raise ValueError(f"transport must be 'udp' or 'tcp', not {transport!r}")
