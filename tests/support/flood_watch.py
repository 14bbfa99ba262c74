"""Who a flood reaches, watched from the test's process (issue 28): a victim
counting replies it never asked for, a well-behaved client that must lose
nothing, and the datagrams the kernel dropped at the router's sockets.

The floods themselves are support/floods.py's; the same 127/8-only rule
(``loopback``) holds here.
"""
from __future__ import annotations

import collections
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import dns.flags
import dns.message
import dns.rcode

from support.floods import loopback
from support.net import HOST

@dataclass
class Tally:
    datagrams: int = 0
    bytes: int = 0
    truncated: int = 0  # replies with TC set (an RRL slip, or a reply too big)

    @property
    def full(self) -> int:
        """Replies without TC: what a reflection attack gains."""
        return self.datagrams - self.truncated


class Victim:
    """A UDP socket on 127.0.7.7 counting what arrives (replies to queries it never sent).

    Counted in a thread, in all and per whole second since start() (the
    ``seconds`` list), so a test can say "at most N full answers a second".
    """

    def __init__(self, address: str = "127.0.7.7", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((loopback(address), port))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.total = Tally()
        self.seconds: list[Tally] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def _run(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            second = int(time.monotonic() - self._started)
            tc = len(data) >= 3 and bool(data[2] & 0x02)
            with self._lock:
                while len(self.seconds) <= second:
                    self.seconds.append(Tally())
                for t in (self.total, self.seconds[second]):
                    t.datagrams += 1
                    t.bytes += len(data)
                    t.truncated += tc

    def start(self) -> "Victim":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> "Victim":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class PacedReport:
    sent: int = 0
    answered: int = 0  # replies that came within the patience, whatever their rcode
    lost: int = 0  # no reply within the patience
    truncated: int = 0
    rcodes: collections.Counter = field(default_factory=collections.Counter)
    lost_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"sent {self.sent}, answered {self.answered}, lost {self.lost} ({self.lost_names[:5]}), "
                f"truncated {self.truncated}, rcodes {dict(self.rcodes)}")


class PacedClient:
    """A well-behaved client: ``qps`` queries a second from one source address for ``duration`` seconds.

    Open loop (a query goes out on time whether or not the one before was
    answered), one try each: a query not answered within ``patience``
    seconds is lost, as a stub resolver giving up would see it. In a thread
    of the test's process (dnspython makes and parses the messages);
    ``report`` once joined.
    """

    def __init__(self, port: int, names: Sequence[str], *, qps: float = 50, duration: float = 8.0,
                 source: str = "127.0.9.9", patience: float = 2.0, rdtype: str = "A", host: str = HOST) -> None:
        self.port, self.host = port, loopback(host)
        self.names, self.qps, self.duration, self.patience, self.rdtype = list(names), qps, duration, patience, rdtype
        self.source = loopback(source)
        self.report = PacedReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        report = self.report
        pending: dict[int, tuple[float, str]] = {}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((self.source, 0))
            s.setblocking(False)
            started = time.monotonic()
            ends = started + self.duration
            i = 0
            while not self._stop.is_set():
                now = time.monotonic()
                if now < ends:
                    due = started + i / self.qps
                    if now >= due:
                        name = self.names[i % len(self.names)]
                        q = dns.message.make_query(name, self.rdtype)
                        while q.id in pending:
                            q.id = (q.id + 1) & 0xFFFF
                        pending[q.id] = (now, name)
                        s.sendto(q.to_wire(), (self.host, self.port))
                        report.sent += 1
                        i += 1
                        continue
                elif not pending:
                    break
                for qid, (when, name) in list(pending.items()):
                    if now - when > self.patience:
                        del pending[qid]
                        report.lost += 1
                        report.lost_names.append(name)
                next_due = started + i / self.qps if now < ends else now + 0.05
                ready, _, _ = select.select([s], [], [], max(0.0, min(next_due - time.monotonic(), 0.05)))
                if not ready:
                    continue
                while True:
                    try:
                        data = s.recv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    try:
                        reply = dns.message.from_wire(data, ignore_trailing=True)
                    except Exception:
                        continue
                    if reply.id not in pending:
                        continue
                    when, name = pending.pop(reply.id)
                    if time.monotonic() - when > self.patience:
                        report.lost += 1
                        report.lost_names.append(name)
                        continue
                    report.answered += 1
                    report.rcodes[dns.rcode.to_text(reply.rcode())] += 1
                    report.truncated += bool(reply.flags & dns.flags.TC)

    def start(self) -> "PacedClient":
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> PacedReport:
        """Wait until it has sent everything and every query is answered or lost; its report."""
        self._thread.join(self.duration + self.patience + 5 if timeout is None else timeout)
        if self._thread.is_alive():
            self._stop.set()
            raise AssertionError(f"the paced client did not finish: {self.report}")
        return self.report

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.patience + 2)

    def __enter__(self) -> "PacedClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped, for a full receive buffer, on the UDP sockets bound to
    port (the router's: one per worker; /proc/net/udp's last column): a lost query with this
    moving was dropped before the router read it (the machine, or a worker too slow to
    read), not by the router's choice."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                total += int(fields[-1])
    return total
