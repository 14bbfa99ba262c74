"""A scriptable fake DNS backend on 127.0.0.1 (or ::1) for fault-injection tests.

    with FakeBackend("ok") as b:
        ...                      # route some names to b.addr
        b.mode = "drop"          # from now on it swallows queries
        assert b.count("udp") == 1

Modes (changeable at any time through .mode):
  ok        NOERROR, A 192.0.2.1 for any name asked type A (or ANY), AAAA ::53
            for type AAAA, and `id.server. CH TXT` -> .identity; other
            types: empty NOERROR
  drop      never answers (TCP connections are accepted, then ignored)
  delay     like ok, but each answer is sent .delay seconds later
  wrong_id  like ok, but with a different message ID
  refused   REFUSED, question echoed
  garbage   random bytes (length-prefixed on TCP, so framing still works)
  truncate  over UDP an empty answer with TC set; over TCP the answer of ok,
            .delay seconds later (a big answer, and a slow TCP path to it)
  lossy     like ok, but every .loss_every-th UDP query (counted from the
            switch to this mode: the 10th, 20th, ... by default) is dropped;
            TCP is never dropped (deterministic loss, health checks pass)
  udp_drop  never answers over UDP, answers over TCP like ok (a backend whose
            health checks pass while every forwarded query is lost)

One thread serves UDP and TCP through a selector; delayed answers wait in
a schedule, not in sleeping threads, so a slow answer never holds up the
others. Every query received is recorded in .received before the mode
decides what to do with it; .tcp_peak is the most TCP queries it has held
unanswered at once (how many connections a client kept busy together).

FakeBackend(host="::1") listens on the IPv6 loopback instead; .addr is
then "[::1]:<port>", the form route values take.
"""
from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import os
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from support.net import HOST

MODES = ("ok", "drop", "delay", "wrong_id", "refused", "garbage", "truncate", "lossy", "udp_drop")
ANSWER_ADDRESS = "192.0.2.1"
ANSWER_ADDRESS6 = "::53"


@dataclass(frozen=True)
class Received:
    """One query as it arrived."""

    transport: str                        # 'udp' or 'tcp'
    wire: bytes                           # the query's bytes (no TCP length prefix)
    message: dns.message.Message | None   # parsed, or None if it did not parse
    peer: tuple                           # (host, port), or (host, port, flow, scope) on IPv6
    time: float                           # time.monotonic() at arrival

    @property
    def qname(self) -> str | None:
        if self.message is None or not self.message.question:
            return None
        return self.message.question[0].name.to_text().lower()


def _large_receive_buffer(sock: socket.socket, size: int = 4 << 20) -> None:
    """Room for a burst: the router sends a batch of queries at once, and a
    fake that drops them for want of buffer (this test thread may be slow
    to read on a loaded machine) would fail tests that are not about loss."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, size)  # past rmem_max, as root
    except (OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class FakeBackend:
    """A fake DNS server on 127.0.0.1:<port> (or [::1]:<port>), UDP and/or TCP, in one thread."""

    def __init__(
        self,
        mode: str = "ok",
        *,
        transports: Iterable[str] = ("udp", "tcp"),
        delay: float = 1.0,
        loss_every: int = 10,
        identity: str | None = None,
        port: int | None = None,
        host: str = HOST,
    ) -> None:
        ip = ipaddress.ip_address(host)
        if not ip.is_loopback:
            raise ValueError(f"a fake backend listens on loopback only (127.0.0.0/8, ::1), not {host!r}")
        self.host = host
        self.family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self.transports = tuple(transports)
        if not self.transports or set(self.transports) - {"udp", "tcp"}:
            raise ValueError(f"transports must be a non-empty subset of ('udp', 'tcp'), not {transports!r}")
        self.delay = delay
        self.loss_every = loss_every
        self._lossy_count = 0  # UDP queries seen in lossy mode since it was set
        self.mode = mode
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._udp, self._tcp = self._bind(port)
        self.port: int = (self._udp or self._tcp).getsockname()[1]
        self.addr: str = f"[{host}]:{self.port}" if self.family == socket.AF_INET6 else f"{host}:{self.port}"
        self.identity: str = identity if identity is not None else f"fake-{self.port}"
        self._sel = selectors.DefaultSelector()
        # A socketpair wakes the selector on stop() instead of a polling timeout.
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns: dict[socket.socket, bytearray] = {}
        self._schedule: list[tuple[float, int, socket.socket, bytes, tuple | None]] = []
        self._seq = itertools.count()  # heap tie-breaker: sockets do not compare
        # TCP queries received and not answered yet: how many now, and the most at once.
        self._tcp_waiting = 0
        self.tcp_peak = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"fake-backend-{self.port}", daemon=True)
        self._started = False

    # -- mode ----------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {value!r}")
        if value == "lossy":
            self._lossy_count = 0
        self._mode = value  # a plain attribute store: atomic for the server thread

    # -- lifecycle -----------------------------------------------------------

    def _bind(self, port: int | None) -> tuple[socket.socket | None, socket.socket | None]:
        # Bind the sockets ourselves rather than trusting free_port(): no race.
        for _ in range(100):
            udp = tcp = None
            try:
                if "udp" in self.transports:
                    udp = socket.socket(self.family, socket.SOCK_DGRAM)
                    _large_receive_buffer(udp)
                    udp.bind((self.host, port or 0))
                if "tcp" in self.transports:
                    tcp = socket.socket(self.family, socket.SOCK_STREAM)
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    tcp.bind((self.host, udp.getsockname()[1] if udp else (port or 0)))
                    tcp.listen(64)
                return udp, tcp
            except OSError as e:
                for s in (udp, tcp):
                    if s:
                        s.close()
                # Retry only a race for the number (UDP got one TCP cannot
                # have); anything else, say no IPv6 loopback, fails at once.
                if port or e.errno != errno.EADDRINUSE:
                    raise
        raise RuntimeError("could not bind UDP and TCP on the same port")

    def start(self) -> "FakeBackend":
        for s in (self._udp, self._tcp, self._wake_r):
            if s:
                s.setblocking(False)
                self._sel.register(s, selectors.EVENT_READ)
        self._started = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every socket and join the thread. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        if self._started:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                raise RuntimeError(f"fake backend thread on {self.addr} did not stop")
        for s in [self._udp, self._tcp, self._wake_r, self._wake_w, *self._conns]:
            if s:
                s.close()
        self._conns.clear()
        self._sel.close()

    def __enter__(self) -> "FakeBackend":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was received -----------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """A copy of every query received so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def count(self, transport: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._received if transport is None or r.transport == transport)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    # -- server thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            timeout = None
            if self._schedule:
                timeout = max(0.0, self._schedule[0][0] - time.monotonic())
            for key, _ in self._sel.select(timeout):
                sock = key.fileobj
                if sock is self._wake_r:
                    return
                try:
                    if sock is self._udp:
                        self._on_udp()
                    elif sock is self._tcp:
                        self._on_accept()
                    else:
                        self._on_tcp_data(sock)
                except OSError:
                    # A client went away mid-exchange; the server goes on.
                    if sock in self._conns:
                        self._close_conn(sock)
            self._send_due()

    def _on_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(65535)
        except BlockingIOError:
            return
        self._handle("udp", wire, peer, self._udp)

    def _on_accept(self) -> None:
        try:
            conn, _ = self._tcp.accept()
        except BlockingIOError:
            return
        # Blocking with a timeout: recv only runs when the selector says data
        # is there, and sendall of a small answer must not give up half way.
        conn.settimeout(2.0)
        self._conns[conn] = bytearray()
        self._sel.register(conn, selectors.EVENT_READ)

    def _on_tcp_data(self, conn: socket.socket) -> None:
        data = conn.recv(65535)
        if not data:
            self._close_conn(conn)
            return
        buf = self._conns[conn]
        buf += data
        # RFC 1035 4.2.2 framing: 2-byte length, then the message; a client
        # may pipeline several queries in one segment.
        while len(buf) >= 2:
            (length,) = struct.unpack("!H", buf[:2])
            if len(buf) < 2 + length:
                break
            wire = bytes(buf[2:2 + length])
            del buf[:2 + length]
            self._handle("tcp", wire, conn.getpeername(), conn)

    def _close_conn(self, conn: socket.socket) -> None:
        self._sel.unregister(conn)
        del self._conns[conn]
        conn.close()

    def _handle(self, transport: str, wire: bytes, peer: tuple, sock: socket.socket) -> None:
        try:
            msg: dns.message.Message | None = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            msg = None
        with self._lock:
            self._received.append(Received(transport, wire, msg, peer, time.monotonic()))
        mode = self._mode  # read once: a concurrent change applies to the next query
        if mode == "drop" or (msg is None and mode != "garbage"):
            return
        if transport == "udp" and mode == "udp_drop":
            return
        if transport == "udp" and mode == "lossy":
            self._lossy_count += 1
            if self._lossy_count % self.loss_every == 0:
                return
        reply = self._reply(mode, msg, transport)
        dest = peer if transport == "udp" else None
        slow = mode == "delay" or (mode == "truncate" and transport == "tcp")
        due = time.monotonic() + (self.delay if slow else 0.0)
        if dest is None:
            self._tcp_waiting += 1
            self.tcp_peak = max(self.tcp_peak, self._tcp_waiting)
        heapq.heappush(self._schedule, (due, next(self._seq), sock, reply, dest))

    def _reply(self, mode: str, q: dns.message.Message | None, transport: str = "udp") -> bytes:
        if mode == "garbage":
            return os.urandom(random.randint(1, 64))
        assert q is not None
        r = dns.message.make_response(q)  # echoes ID, question, RD and EDNS
        if mode == "refused":
            r.set_rcode(dns.rcode.REFUSED)
            return r.to_wire()
        if mode == "truncate" and transport == "udp":
            r.flags |= dns.flags.TC
            return r.to_wire()
        if q.question:
            qq = q.question[0]
            if qq.rdclass == dns.rdataclass.CH and qq.rdtype == dns.rdatatype.TXT \
                    and qq.name.to_text().lower() in ("id.server.", "hostname.bind."):
                r.answer.append(dns.rrset.from_text(qq.name, 0, "CH", "TXT", f'"{self.identity}"'))
            elif qq.rdclass == dns.rdataclass.IN and qq.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
                r.answer.append(dns.rrset.from_text(qq.name, 300, "IN", "A", ANSWER_ADDRESS))
            elif qq.rdclass == dns.rdataclass.IN and qq.rdtype == dns.rdatatype.AAAA:
                r.answer.append(dns.rrset.from_text(qq.name, 300, "IN", "AAAA", ANSWER_ADDRESS6))
        if mode == "wrong_id":
            r.id = (q.id + 1) & 0xFFFF
        return r.to_wire()

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._schedule and self._schedule[0][0] <= now:
            _, _, sock, reply, dest = heapq.heappop(self._schedule)
            if dest is None:
                self._tcp_waiting -= 1  # answered (or its client gone): no longer waiting
            try:
                if dest is not None:
                    sock.sendto(reply, dest)
                elif sock in self._conns:  # the client may have hung up meanwhile
                    sock.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                if sock in self._conns:
                    self._close_conn(sock)

    def __repr__(self) -> str:
        return f"FakeBackend({self.addr}, mode={self._mode!r}, received={self.count()})"
