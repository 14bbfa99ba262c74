"""NOTIFY (RFC 1996) to each secondary of each shard at every new serial,
signed with the shard's key, sent again until the secondary answers (after
1, 2, 4 ... seconds, at most a minute apart), or until a newer serial takes
its place.
"""
from __future__ import annotations

import logging
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA

from dnsrouter.address import Address

from .settings import TsigKey

log = logging.getLogger("dnsrouter.feed.notify")

FIRST_RETRY = 1.0
LAST_RETRY = 60.0


@dataclass
class _Due:
    shard: int
    serial: int
    ident: int
    at: float  # when to send (again)
    tries: int = 0
    mac: bytes = b""  # of the last NOTIFY sent: the reply's signature covers it


class Notifier:
    def __init__(self, shards: list[tuple[TsigKey, tuple[Address, ...]]], origin: dns.name.Name,
                 source: str, count: Callable[..., None]) -> None:
        """``source``: the address NOTIFY comes from, the feeder's listen address (what the
        secondaries' ACLs name), for the backends of its family."""
        self.origin = origin
        self.count = count
        self.keys = {k: key for k, (key, _) in enumerate(shards)}
        self.backends = {backend: k for k, (_, backends) in enumerate(shards) for backend in backends}
        self.acknowledged: dict[Address, int] = {}  # backend -> the last serial it answered a NOTIFY for
        self._due: dict[Address, _Due] = {}
        self._lock = threading.Lock()
        self._sockets = {family: socket.socket(family, socket.SOCK_DGRAM)
                         for family in {b.family for b in self.backends}}
        source_family = socket.AF_INET6 if ":" in source else socket.AF_INET
        if source_family in self._sockets and source not in ("0.0.0.0", "::"):
            self._sockets[source_family].bind((source, 0))
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="feed-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    def serial(self, serial: int) -> None:
        """A new serial: NOTIFY every secondary of every shard."""
        now = time.monotonic()
        with self._lock:
            for backend, k in self.backends.items():
                self._due[backend] = _Due(k, serial, secrets.randbits(16), now)
        self._wake_w.send(b"x")

    def _message(self, due: _Due) -> bytes:
        query = dns.message.make_query(self.origin, dns.rdatatype.SOA)
        query.flags = dns.flags.AA  # RFC 1996, 3.7; no RD
        query.set_opcode(dns.opcode.NOTIFY)  # the opcode lives in the flags: after them
        query.id = due.ident
        rrset = query.find_rrset(query.answer, self.origin, dns.rdataclass.IN, dns.rdatatype.SOA, create=True)
        rrset.add(dns.rdtypes.ANY.SOA.SOA(dns.rdataclass.IN, dns.rdatatype.SOA, self.origin, self.origin,
                                          due.serial, 0, 0, 0, 0), 0)
        key = self.keys[due.shard]
        query.use_tsig({key.name: key.key()}, key.name, algorithm=key.algorithm)
        wire = query.to_wire()
        due.mac = query.mac or b""
        return wire

    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            with self._lock:
                for backend, due in self._due.items():
                    if due.at <= now:
                        try:
                            self._sockets[backend.family].sendto(self._message(due), backend.sockaddr)
                        except OSError as e:
                            log.debug("NOTIFY to %s: %s", backend, e)
                        due.tries += 1
                        due.at = now + min(FIRST_RETRY * 2 ** (due.tries - 1), LAST_RETRY)
                        self.count("notifies_sent", str(due.shard))
                        if due.tries > 1:
                            log.info("NOTIFY to %s (shard %d, serial %d) not answered, sent again (%d)",
                                     backend, due.shard, due.serial, due.tries)
                wait = max(0.0, min((d.at for d in self._due.values()), default=now + 3600) - now)
            readable, _, _ = select.select([*self._sockets.values(), self._wake_r], [], [], wait)
            for sock in readable:
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    continue
                try:
                    wire, peer = sock.recvfrom(65535)
                except OSError:
                    continue
                self._answered(wire, peer)

    def _answered(self, wire: bytes, peer: tuple) -> None:
        with self._lock:
            backend = next((b for b in self._due if b.sockaddr[:2] == peer[:2]), None)
            if backend is None:
                return
            due = self._due[backend]
            try:
                key = self.keys[due.shard]
                # The reply must carry the ID we sent and, signed, verify with the shard's key.
                reply = dns.message.from_wire(wire, keyring={key.name: key.key()}, request_mac=due.mac)
            except dns.exception.DNSException:
                return
            if reply.id != due.ident or not reply.flags & dns.flags.QR or reply.opcode() != dns.opcode.NOTIFY:
                return
            del self._due[backend]
            self.acknowledged[backend] = due.serial
        self.count("notifies_answered", str(due.shard))

