"""Secondary for the whole zone: transfers from the primary into the store.

The first start makes an AXFR; after that each NOTIFY from the primary, and
the SOA refresh timer, make the feeder ask the primary's serial and, when
it is newer (RFC 1982), an IXFR from the stored serial (RFC 1995), or an
AXFR when the primary cannot give the increment. dnspython runs the
transfer (``dns.xfr.Inbound``: its state machine checks the SOA sequence,
``dns.message.from_wire`` the TSIG of every message) into the store's
transaction, which
commits only a whole, good transfer: one that breaks keeps the last good
serial, and is tried again after 1, 2, 4 ... seconds, at most the SOA's
retry time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from typing import Callable

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.serial
import dns.xfr

from dnsrouter.address import Address

from ..shardmap import ShardError
from .settings import TsigKey
from .store import Applied, Store
from .tcp import framed

log = logging.getLogger("dnsrouter.feed.inbound")

FIRST_RETRY = 1.0  # seconds after a failed transfer; doubling up to the SOA's retry time


class Secondary:
    def __init__(self, store: Store, primary: Address, key: TsigKey | None, timeout: float,
                 applied: Callable[[Applied], None], count: Callable[..., None], source: str) -> None:
        """``source``: the address queries and transfers leave from, the feeder's listen address
        (what the primary's ACL names), when it is of the primary's family."""
        self.store = store
        self.primary = primary
        specific = source not in ("0.0.0.0", "::") and (":" in source) == (":" in primary.host)
        self.source = source if specific else None
        self.key = key
        self.timeout = timeout
        self.applied = applied
        self.count = count
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.last_success: float | None = store.loaded_at()
        self._thread = threading.Thread(target=self._run, name="feed-inbound", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self._thread.join(timeout=self.timeout + 5)

    def notified(self) -> None:
        """A NOTIFY from the primary: look at its serial now."""
        self.wake.set()

    def _run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                self.check()
                failures = 0
                wait = self._timers()[0]  # the SOA just stored: its refresh
            except (dns.exception.DNSException, OSError, ShardError, EOFError) as e:
                failures += 1
                wait = min(FIRST_RETRY * 2 ** (failures - 1), self._timers()[1])
                log.warning("transfer from %s failed (%s), serial %s kept; again in %.0f s", self.primary,
                            _reason(e), self.store.serial(), wait)
            except Exception:  # a bug must not end the secondary: the zone would stop following quietly
                failures += 1
                wait = min(FIRST_RETRY * 2 ** (failures - 1), self._timers()[1])
                log.exception("transfer from %s failed, serial %s kept", self.primary, self.store.serial())
            self.wake.wait(wait)

    def expired(self) -> bool:
        """Whether the primary has not been reached for longer than the SOA's
        expire time: then the shards are not served (their secondaries expire
        the zone by their own timers, as they would with the primary)."""
        record = self.store.soa_record()
        if record is None or self.last_success is None:
            return False
        return time.time() - self.last_success > int.from_bytes(record[-8:-4], "big")

    def _timers(self) -> tuple[float, float]:
        """The SOA's refresh and retry times (before the first load: 60 s and 10 s)."""
        record = self.store.soa_record()
        if record is None:
            return 60.0, 10.0
        wire = record[-20:]
        refresh, retry = int.from_bytes(wire[4:8], "big"), int.from_bytes(wire[8:12], "big")
        return float(max(refresh, 1)), float(max(retry, 1))

    def _query_serial(self) -> int:
        query = dns.message.make_query(self.store.origin, dns.rdatatype.SOA)
        if self.key is not None:
            query.use_tsig({self.key.name: self.key.key()}, self.key.name, algorithm=self.key.algorithm)
        response = dns.query.udp(query, self.primary.host, port=self.primary.port, timeout=min(self.timeout, 5),
                                 source=self.source)
        if response.flags & dns.flags.TC:
            response = dns.query.tcp(query, self.primary.host, port=self.primary.port, timeout=self.timeout,
                                     source=self.source)
        if response.rcode() != dns.rcode.NOERROR:
            raise dns.xfr.TransferError(response.rcode())
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.name == self.store.origin:
                return int(rrset[0].serial)
        raise dns.exception.FormError("the primary's answer has no SOA for the zone")

    def check(self) -> None:
        """Bring the store to the primary's serial, if it is not there."""
        stored = self.store.serial()
        if stored is not None and not dns.serial.Serial(self._query_serial()) > stored:
            self.last_success = time.time()
            return
        kind = "axfr" if stored is None else "ixfr"
        try:
            try:
                self._transfer(stored)
            except (dns.xfr.TransferError, dns.exception.FormError) as e:
                if stored is None:
                    raise
                # The primary refused the increment or sent one that does not
                # apply to our serial: the whole zone instead.
                log.info("IXFR from %s failed (%s): AXFR", self.primary, _reason(e))
                self.count("transfers_in", "ixfr", "failed")
                kind = "axfr"
                self._transfer(None)
        except BaseException:
            self.count("transfers_in", kind, "failed")
            raise

    def _transfer(self, serial: int | None) -> None:
        with self.store.write_lock:
            query, _ = dns.xfr.make_query(
                self.store, serial=serial,
                keyring={self.key.name: self.key.key()} if self.key else None,
                keyname=self.key.name if self.key else None,
                keyalgorithm=self.key.algorithm if self.key else dns.tsig.default_algorithm)
            self.store.last_applied = None
            started = time.monotonic()
            self._receive_and_apply(query, serial)
            applied = self.store.last_applied
        if applied is None:  # the primary was at our serial after all
            self.last_success = time.time()
            return
        kind = "axfr" if applied.full else "ixfr"
        self.count("transfers_in", kind, "ok")
        self.last_success = time.time()
        log.info("serial %s -> %s by %s from %s in %.2f s%s", applied.serial_from, applied.serial, kind.upper(),
                 self.primary, time.monotonic() - started,
                 "" if applied.full else ": changes per shard " + " ".join(
                     f"{k}:{n}" for k, n in enumerate(applied.changes)))
        self.applied(applied)


    def _receive_and_apply(self, query: dns.message.Message, serial: int | None) -> None:
        """``dns.query.inbound_xfr``'s loop, with the primary's messages read
        by a thread of their own into a spool file in the state directory:
        the stream is taken as fast as it comes, whatever the pace of parsing
        and storing (a primary gives up on a reader that stalls: Knot after
        500 ms, its tcp-io-timeout), and memory does not grow with it."""
        rdtype = query.question[0].rdtype
        with socket.create_connection(self.primary.sockaddr, timeout=self.timeout,
                                      source_address=(self.source, 0) if self.source else None) as sock, \
                tempfile.TemporaryFile(dir=self.store.directory, prefix="transfer-") as spool:
            sock.sendall(framed(query.to_wire()))
            written: queue.Queue[int | BaseException | None] = queue.Queue()
            done = threading.Event()
            reader = threading.Thread(target=_spool, args=(sock, spool.fileno(), written, done),
                                      name="feed-receive", daemon=True)
            reader.start()
            available = 0

            def read(at: int, size: int) -> bytes:
                """``size`` bytes of the stream from ``at``, once the reader has them."""
                nonlocal available
                while available < at + size:
                    try:
                        item = written.get(timeout=self.timeout)
                    except queue.Empty:
                        raise dns.exception.Timeout from None
                    if item is None or isinstance(item, BaseException):
                        raise item or EOFError("the primary closed the connection before the transfer's end")
                    available = item
                return os.pread(spool.fileno(), size, at)

            try:
                with dns.xfr.Inbound(self.store, rdtype, serial) as inbound:
                    context, at, finished = None, 0, False
                    while not finished:
                        size = int.from_bytes(read(at, 2), "big")
                        message = dns.message.from_wire(
                            read(at + 2, size), keyring=query.keyring, request_mac=query.mac, xfr=True,
                            origin=self.store.from_wire_origin(), tsig_ctx=context, multi=True,
                            one_rr_per_rrset=rdtype == dns.rdatatype.IXFR)
                        if not query.is_response(message, xfr_continuation=at > 0):
                            raise dns.query.BadResponse
                        at += 2 + size
                        finished = inbound.process_message(message)
                        context = message.tsig_ctx
            finally:
                done.set()
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the reader's recv returns
                reader.join()


def _spool(sock: socket.socket, fd: int, written: queue.Queue, done: threading.Event) -> None:
    """Append what ``sock`` brings to the file ``fd``, a large read at a time
    (a few hand-overs of the interpreter per megabyte, not per message), and
    put the bytes written so far in ``written``; at the end None (closed) or
    the error."""
    chunk = bytearray(1 << 20)
    total = 0
    try:
        while not done.is_set():
            received = sock.recv_into(chunk)
            if not received:
                break
            view = memoryview(chunk)[:received]
            while view:
                view = view[os.write(fd, view):]
            total += received
            written.put(total)
    except OSError as e:
        written.put(None if done.is_set() else e)
        return
    written.put(None)


def _reason(error: BaseException) -> str:
    if isinstance(error, dns.xfr.TransferError):
        return f"the primary answered {dns.rcode.to_text(error.rcode)}"
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    return str(error) or type(error).__name__
