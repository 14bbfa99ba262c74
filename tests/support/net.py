"""Loopback networking: free ports, polling with a deadline, one-shot DNS queries.

Everything here talks to 127.0.0.1 (or ::1 when asked) only; tests must
never send traffic anywhere else.

The query helpers take a *target*: a port number, or anything with a
``.port`` (a Router, a KnotServer, a FakeBackend).
"""
from __future__ import annotations

import socket
import time
from typing import Any, Callable, Protocol, TypeVar, Union

import dns.exception
import dns.message
import dns.query
import dns.rcode

HOST = "127.0.0.1"

T = TypeVar("T")


class HasPort(Protocol):
    port: int


Target = Union[int, HasPort]


def port_of(target: Target) -> int:
    return target if isinstance(target, int) else target.port


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- ports ---------------------------------------------------------------------

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


def free_privileged_port() -> int:
    """A port below 1024 free for UDP and TCP on 127.0.0.1 (binding it needs root).

    The kernel hands out no ephemeral ports there, so trying 900..999 in
    turn is enough; nothing else on a test machine lives in that range.
    """
    for port in range(900, 1000):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind((HOST, port))
                t.bind((HOST, port))
                return port
        except OSError:
            continue
    raise RuntimeError("no free port below 1024")


# -- waiting -------------------------------------------------------------------

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


# -- queries -------------------------------------------------------------------

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


def raw_udp(port: int, payload: bytes, timeout: float = 2.0, host: str = HOST,
            source: str | None = None) -> bytes | None:
    """Send bytes (from the address ``source``, if given: the whole of 127/8
    is local), return the reply's bytes, or None when nothing comes back."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(payload, (host, port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def ask(target: Target, name: str, rdtype: str | int = "A", *, timeout: float = 2.0,
        transport: str = "udp", host: str = HOST) -> dns.message.Message | None:
    """One query; the reply, or None when none came in time."""
    try:
        return query(name, rdtype, port=port_of(target), transport=transport, timeout=timeout, host=host)
    except dns.exception.Timeout:
        return None


def rcode_of(target: Target, name: str, *, timeout: float = 0.5) -> int | None:
    """The rcode of one UDP query for name's A, None when no reply came in time."""
    reply = ask(target, name, timeout=timeout)
    return None if reply is None else reply.rcode()


def routed(target: Target, name: str, rcode: int = dns.rcode.NOERROR, *, timeout: float = 0.5) -> bool:
    """Whether one UDP query for name's A gets this rcode (NOERROR by default)."""
    return rcode_of(target, name, timeout=timeout) == rcode


def answered(target: Target, name: str, transport: str = "udp", timeout: float = 0.5) -> bool:
    """Whether one query for name's A gets NOERROR with an answer.

    Any failure is a no: a timeout, a reply that does not parse, or a
    refused connection (a server still starting)."""
    try:
        r = query(name, "A", port=port_of(target), transport=transport, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)
