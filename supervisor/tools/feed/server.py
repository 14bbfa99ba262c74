"""The feeder's DNS side on ``[feed] listen``: primary for each shard, and
where the zone's primary sends NOTIFY.

A request signed with a shard's key gets that shard: SOA (UDP or TCP), AXFR
and IXFR (TCP; an IXFR over UDP gets the current SOA, which tells the
secondary to come back over TCP, RFC 1995 section 2). A request with no key
is REFUSED, one with an unknown key or a bad signature NOTAUTH. Transfers
out stream from the store: records go into messages of about 16 KB as they
are read, each message signed in turn (RFC 8945, section 5.3.1).
"""
from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from typing import Callable, Iterable, Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.tsig

from dnsrouter.address import Address

from .settings import TsigKey
from .store import Store
from .tcp import framed, read_message

log = logging.getLogger("dnsrouter.feed.server")

MESSAGE_BYTES = 16384  # records per transfer message, about: small enough for any client's buffer
CONNECTIONS = 64  # TCP connections served at once; more are closed (a few secondaries per shard need few)
IDLE = 30.0  # seconds a TCP connection may stay silent
Count = Callable[..., None]  # count(metric, *labels)


class Server:
    """Serves the shards of ``store`` to the holders of ``keys`` (one per
    shard, by index); calls ``notified()`` on a NOTIFY from ``primary``."""

    def __init__(self, listen: Address, store: Store, keys: list[TsigKey], primary: Address,
                 primary_key: TsigKey | None, notified: Callable[[], None], count: Count,
                 expired: Callable[[], bool]) -> None:
        self.store = store
        self.expired = expired
        self.served: dict[int, int] = {}  # shard -> the serial of its last transfer out
        self.origin = store.origin
        self.primary = primary
        self.primary_key = primary_key
        self.notified = notified
        self.count = count
        self.shard_of = {key.name: index for index, key in enumerate(keys)}
        self.keyring = {key.name: key.key() for key in keys}
        if primary_key is not None:
            self.keyring[primary_key.name] = primary_key.key()
        server = self

        slots = threading.BoundedSemaphore(CONNECTIONS)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if not slots.acquire(blocking=False):
                    server.count("refused", "connections")
                    return  # closed at once: a flood of connections cannot take every thread
                try:
                    server._serve_tcp(self.request, self.client_address)
                finally:
                    slots.release()

        class TCPServer(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = listen.family

        self.udp = socket.socket(listen.family, socket.SOCK_DGRAM)
        self.udp.bind(listen.sockaddr)
        self.tcp = TCPServer(listen.sockaddr, TCPHandler)
        self.address = listen
        self._threads = [threading.Thread(target=self._serve_udp, name="feed-udp", daemon=True),
                         threading.Thread(target=self.tcp.serve_forever, name="feed-tcp", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("serving the shards of %s on %s", self.origin, self.address)

    def close(self) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()
        self.udp.close()

    # -- transports ----------------------------------------------------------------------
    def _serve_udp(self) -> None:
        while True:
            try:
                wire, peer = self.udp.recvfrom(65535)
            except OSError:
                return  # closed
            try:
                for reply in self._answer(wire, peer, tcp=False):
                    self.udp.sendto(reply, peer)
            except Exception:  # one bad request never stops the server
                log.exception("request from %s", peer[0])

    def _serve_tcp(self, sock: socket.socket, peer: tuple) -> None:
        sock.settimeout(IDLE)
        try:
            while (wire := read_message(sock)) is not None:
                for reply in self._answer(wire, peer, tcp=True):
                    sock.sendall(framed(reply))
        except OSError:
            return  # the secondary went away or stalled; it will ask again
        except Exception:
            log.exception("request from %s", peer[0])

    # -- requests ----------------------------------------------------------------------------
    def _answer(self, wire: bytes, peer: tuple, tcp: bool) -> Iterator[bytes]:
        try:
            query = dns.message.from_wire(wire, keyring=self.keyring)
        except (dns.message.UnknownTSIGKey, dns.tsig.BadSignature, dns.tsig.BadTime, dns.tsig.BadKey,
                dns.tsig.BadAlgorithm, dns.tsig.PeerError) as e:
            self.count("refused", "bad key")
            log.info("%s: %s", peer[0], e)
            yield from _error(wire, dns.rcode.NOTAUTH)
            return
        except dns.exception.DNSException:
            self.count("refused", "malformed")
            yield from _error(wire, dns.rcode.FORMERR)
            return
        if query.flags & dns.flags.QR:
            return
        if query.opcode() == dns.opcode.NOTIFY:
            yield self._notify(query, peer)
            return
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            yield _reply(query, dns.rcode.NOTIMP)
            return
        question = query.question[0]
        shard = self.shard_of.get(query.keyname) if query.had_tsig and query.keyname is not None else None
        if shard is None:
            self.count("refused", "no shard key")
            yield _reply(query, dns.rcode.REFUSED)
            return
        if question.name != self.origin or question.rdclass != dns.rdataclass.IN or \
                question.rdtype not in (dns.rdatatype.SOA, dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            yield _reply(query, dns.rcode.REFUSED)
            return
        soa = self.store.soa_record()
        if soa is None or self.expired():  # nothing loaded yet, or the primary gone past the SOA's expire
            yield _reply(query, dns.rcode.SERVFAIL)
            return
        if question.rdtype == dns.rdatatype.SOA or (question.rdtype == dns.rdatatype.IXFR and not tcp):
            yield from _messages(query, [soa])
            return
        if question.rdtype == dns.rdatatype.AXFR and not tcp:
            yield _reply(query, dns.rcode.FORMERR)
            return
        kind = "axfr"
        records: Iterable[bytes] | None = None
        if question.rdtype == dns.rdatatype.IXFR:
            serial = next((r[0].serial for r in query.authority if r.rdtype == dns.rdatatype.SOA), None)
            if serial is None:
                yield _reply(query, dns.rcode.FORMERR)
                return
            records = self.store.ixfr(shard, serial)
            kind = "ixfr" if records is not None else "axfr"  # the journal does not reach back: all of it
        if records is None:
            records = self.store.axfr(shard)
        serial = _serial(soa)
        log.info("%s to %s for shard %d at serial %d", kind.upper(), peer[0], shard, serial)
        yield from _messages(query, records)
        self.count("transfers_out", str(shard), kind)
        self.served[shard] = serial

    def _notify(self, query: dns.message.Message, peer: tuple) -> bytes:
        from_primary = peer[0] == self.primary.host and (
            self.primary_key is None or (query.had_tsig and query.keyname == self.primary_key.name))
        if not from_primary or not query.question or query.question[0].name != self.origin:
            self.count("refused", "notify")
            log.info("NOTIFY from %s refused: not the primary %s or not for %s", peer[0], self.primary, self.origin)
            return _reply(query, dns.rcode.REFUSED)
        self.notified()
        return _reply(query, dns.rcode.NOERROR)


def _serial(soa: bytes) -> int:
    return struct.unpack("!I", soa[-20:-16])[0]


def _reply(query: dns.message.Message, rcode: int) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.Rcode.make(rcode))
    if rcode == dns.rcode.NOERROR:
        response.flags |= dns.flags.AA
    return response.to_wire()


def _error(wire: bytes, rcode: int) -> Iterator[bytes]:
    """An unsigned error for a request that did not parse or verify: its ID,
    opcode, RD and question echoed (RFC 8945, 5.3.2: no MAC for a bad key)."""
    if len(wire) < 12:
        return
    ident, flags, count = struct.unpack("!HHH", wire[:6])
    if flags & dns.flags.QR:
        return
    question = b""
    if count == 1:
        try:
            end = dns.name.from_wire(wire, 12)[1] + 12 + 4
            question = wire[12:end] if len(wire) >= end else b""
        except dns.exception.DNSException:
            pass
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | rcode  # 0x7800: the opcode
    yield struct.pack("!HHHHHH", ident, flags, 1 if question else 0, 0, 0, 0) + question


def _messages(query: dns.message.Message, records: Iterable[bytes]) -> Iterator[bytes]:
    """The answer to ``query``, records in wire format, in as many messages as
    it takes, each signed with the query's key (the first with its MAC)."""
    question = query.question[0]
    key = query.keyring if query.had_tsig else None
    context = None
    first = True
    batch: list[bytes] = []
    size = 0

    def render() -> bytes:
        nonlocal context, first
        renderer = dns.renderer.Renderer(query.id, dns.flags.QR | dns.flags.AA | (query.flags & dns.flags.RD))
        if first:
            renderer.add_question(question.name, question.rdtype, question.rdclass)
        renderer.output.write(b"".join(batch))  # records in wire format already, uncompressed
        renderer.counts[dns.renderer.ANSWER] += len(batch)
        renderer.write_header()
        if isinstance(key, dns.tsig.Key):
            context = renderer.add_multi_tsig(context, key.name, key, 300, query.id, 0, b"",
                                              query.mac if first else b"", key.algorithm)
        first = False
        return renderer.get_wire()

    for record in records:
        if batch and size + len(record) > MESSAGE_BYTES:
            yield render()
            batch, size = [], 0
        batch.append(record)
        size += len(record)
    if batch or first:
        yield render()
