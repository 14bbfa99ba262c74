"""Floods for tests and benches (issue 28): junk, blasters, spoofed sources.

Who a flood reaches (a victim, a paced client) and what the kernel dropped: support/flood_watch.py.

Everything here sends to 127.0.0.0/8 only: ``loopback`` refuses any other
destination or forged source, so a typo cannot flood a real network.
Linux answers every address of 127/8 on lo without configuration, so a
"network" of clients is a source address like 127.0.3.1, and a victim is a
socket bound to 127.0.7.7.

The senders run in processes of their own (multiprocessing, forked, dying
with their parent): a flood sent from the test's process would share its
GIL with the threads that measure (flood_watch.py's victim and paced client) and slow
both. Datagrams leave in batches through sendmmsg(2), so one process sends
tens of thousands a second.
"""
from __future__ import annotations

import ctypes
import functools
import ipaddress
import multiprocessing
import multiprocessing.sharedctypes
import random
import select
import socket
import struct
import time
from typing import Callable, Sequence

import dns.flags
import dns.message
import dns.rcode

from dnsrouter.workers import mmsg

from support.net import HOST
from support.processes import die_with_parent

BATCH = 64  # datagrams per sendmmsg call

_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


def loopback(address: str) -> str:
    """address, if it is in 127.0.0.0/8; ValueError otherwise (never flood anything else)."""
    if ipaddress.IPv4Address(address) not in ipaddress.IPv4Network("127.0.0.0/8"):
        raise ValueError(f"{address} is not in 127.0.0.0/8: floods stay on loopback")
    return address


# -- junk ----------------------------------------------------------------------

JUNK_KINDS = ("random", "bitflip", "loop", "truncated", "qr", "qdcount", "axfr", "label")


@functools.lru_cache(maxsize=8192)
def _template(name: str, rdtype: str) -> bytes:
    return dns.message.make_query(name, rdtype).to_wire()


def _question(name: str, rdtype: str = "A", qid: int = 0) -> bytes:
    """dnspython's query for name, with qid for the random ID it draws (the seed must decide)."""
    return struct.pack("!H", qid) + _template(name, rdtype)[2:]


def junk(count: int, seed: int, names: Sequence[str]) -> list[bytes]:
    """count datagrams of the issue's junk mix, the same ones for the same seed.

    Kinds in turn (JUNK_KINDS): random bytes (0 to 600 of them, a third
    shorter than a DNS header's 12), a valid query (dnspython, for one of
    names) with 1-3 bits flipped, a question whose name is a compression
    pointer to itself, a valid query cut short, a query with QR set (a
    "response" to nothing), QDCOUNT 0 or 2, an AXFR query over UDP, and a
    label whose length byte is reserved (64-191) or runs past the end.
    """
    if not names:
        raise ValueError("junk needs names to make queries of")
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(count):
        kind = JUNK_KINDS[i % len(JUNK_KINDS)]
        name = rng.choice(names)
        qid = rng.getrandbits(16)
        header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD, one question
        if kind == "random":
            size = rng.randrange(12) if rng.random() < 0.35 else rng.randrange(12, 600)
            out.append(rng.randbytes(size))
        elif kind == "bitflip":
            wire = bytearray(_question(name, rng.choice(("A", "AAAA", "TXT", "MX")), qid))
            for _ in range(rng.randint(1, 3)):
                bit = rng.randrange(len(wire) * 8)
                wire[bit // 8] ^= 1 << (bit % 8)
            out.append(bytes(wire))
        elif kind == "loop":
            # The name at offset 12 points at offset 12 (itself), or a label then back to 12.
            body = b"\xc0\x0c" if rng.random() < 0.5 else b"\x03abc\xc0\x0c"
            out.append(header + body + b"\x00\x01\x00\x01")
        elif kind == "truncated":
            wire = _question(name, "A", qid)
            out.append(wire[:rng.randrange(1, len(wire))])
        elif kind == "qr":
            wire = bytearray(_question(name, "A", qid))
            wire[2] |= 0x80
            out.append(bytes(wire))
        elif kind == "qdcount":
            wire = bytearray(_question(name, "A", qid))
            if rng.random() < 0.5:
                wire[4:6] = b"\x00\x00"
            else:
                wire[4:6] = b"\x00\x02"
                if rng.random() < 0.5:  # with a second question, or announcing one that is missing
                    wire += _question(rng.choice(names), "A", qid)[12:]
            out.append(bytes(wire))
        elif kind == "axfr":
            out.append(_question(name, "AXFR", qid))
        else:  # "label"
            if rng.random() < 0.5:
                body = bytes([rng.randrange(64, 192)]) + b"abc\x00"  # the reserved label types
            else:
                body = b"\x3fabc\x00"  # 63 bytes announced, 4 there
            out.append(header + body + b"\x00\x01\x00\x01")
    return out


# -- sendmmsg ------------------------------------------------------------------

def _headers(n: int, name: ctypes.Array) -> tuple[ctypes.Array, ctypes.Array]:
    """n message headers to ``name`` (a sockaddr buffer), each over its own iovec (base and length unset)."""
    iov = (mmsg.Iovec * n)()
    hdrs = (mmsg.Mmsghdr * n)()
    for i in range(n):
        hdr = hdrs[i].hdr
        hdr.name = ctypes.addressof(name)
        hdr.namelen = len(name)
        hdr.iov = ctypes.addressof(iov[i])
        hdr.iovlen = 1
    return iov, hdrs


def _sockaddr_in(host: str, port: int) -> bytes:
    """struct sockaddr_in (16 bytes) for host:port."""
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


class _Ring:
    """Message headers over a fixed list of datagrams, built once: datagram
    i is entry i, and entries len..len+BATCH-1 repeat the first ones, so any
    BATCH consecutive datagrams from any start are one sendmmsg call with
    nothing copied."""

    def __init__(self, datagrams: Sequence[bytes], destination: bytes) -> None:
        n = len(datagrams) + BATCH
        self.count = len(datagrams)
        self._buffers = [ctypes.create_string_buffer(d, max(1, len(d))) for d in datagrams]
        self._name = ctypes.create_string_buffer(destination, len(destination))
        self._iov, self._hdrs = _headers(n, self._name)
        for i in range(n):
            j = i % self.count
            self._iov[i].base = ctypes.addressof(self._buffers[j])
            self._iov[i].len = len(datagrams[j])
        self._base = ctypes.addressof(self._hdrs)
        self._size = ctypes.sizeof(mmsg.Mmsghdr)

    def send(self, fd: int, start: int, n: int) -> int:
        """Send datagrams start..start+n-1 (n <= BATCH) on fd; how many went (a refused one counts as gone)."""
        done = 0
        while done < n:
            got = _sendmmsg(fd, self._base + (start + done) * self._size, n - done, 0)
            if got <= 0:
                # Nothing sent: an error the socket had pending (an ICMP
                # error) or a full buffer; this datagram is lost, as any may be.
                got = 1
            done += got
        return done


class _Payloads:
    """sendmmsg of datagrams made on the fly (a spoofer's, each with its own header)."""

    def __init__(self, destination: bytes, size: int = 2048) -> None:
        self._room = size
        self._buffer = ctypes.create_string_buffer(BATCH * size)
        self._name = ctypes.create_string_buffer(destination, len(destination))
        self._iov, self._hdrs = _headers(BATCH, self._name)
        for i in range(BATCH):
            self._iov[i].base = ctypes.addressof(self._buffer) + i * size
        self._size = ctypes.sizeof(mmsg.Mmsghdr)

    def send(self, fd: int, datagrams: Sequence[bytes]) -> int:
        for i, d in enumerate(datagrams):
            ctypes.memmove(ctypes.addressof(self._buffer) + i * self._room, d, len(d))
            self._iov[i].len = len(d)
        done = 0
        while done < len(datagrams):
            got = _sendmmsg(fd, ctypes.addressof(self._hdrs) + done * self._size, len(datagrams) - done, 0)
            done += got if got > 0 else 1
        return done


# -- senders in processes -------------------------------------------------------

def _pace(started: float, sent: int, rate: float | None) -> None:
    """Sleep until sent datagrams are due at rate (nothing when rate is None: as fast as possible)."""
    if rate:
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _Sender:
    """A flood in a forked process: start(), then wait() or stop(); ``sent`` is live.

    The child dies with the test's process (PR_SET_PDEATHSIG), and stop()
    ends it by its own id, so nothing keeps flooding after a failed test.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._sent = ctx.Value(ctypes.c_longlong, 0, lock=False)
        self._received = ctx.Value(ctypes.c_longlong, 0, lock=False)
        self._received_bytes = ctx.Value(ctypes.c_longlong, 0, lock=False)
        self._sent_bytes = ctx.Value(ctypes.c_longlong, 0, lock=False)
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._proc = ctx.Process(target=self._child, daemon=True)

    @property
    def sent(self) -> int:
        """Datagrams sent so far."""
        return int(self._sent.value)

    @property
    def sent_bytes(self) -> int:
        """UDP payload bytes sent so far."""
        return int(self._sent_bytes.value)

    @property
    def received(self) -> int:
        """Replies that came back to the sending sockets (when the sender listens for them)."""
        return int(self._received.value)

    def _child(self) -> None:
        die_with_parent()
        try:
            self.run()
        finally:
            self._ready.set()

    def run(self) -> None:
        raise NotImplementedError

    def start(self) -> "_Sender":
        self._proc.start()
        if not self._ready.wait(10):
            self.stop()
            raise RuntimeError(f"{type(self).__name__} did not start sending")
        return self

    def running(self) -> bool:
        return self._proc.is_alive()

    def wait(self, timeout: float) -> int:
        """Until it has sent all it was asked to (at most timeout seconds); how many it sent."""
        self._proc.join(timeout)
        if self._proc.is_alive():
            self.stop()
            raise AssertionError(f"{type(self).__name__} still sending after {timeout:g}s "
                                 f"({self.sent} sent)")
        return self.sent

    def stop(self) -> int:
        """Stop it now (SIGKILL if it does not stop in 3 s); how many it sent."""
        self._stop.set()
        if self._proc.pid is not None:
            self._proc.join(3)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(3)
        return self.sent

    def __enter__(self) -> "_Sender":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Blaster(_Sender):
    """Sends a list of datagrams round robin to 127.0.0.1:port from K UDP sockets.

    rate: datagrams a second in all (None: as fast as it can); it stops
    after duration seconds or count datagrams (whichever is given first;
    one of them must be). sources: addresses the sockets bind to, in turn
    (127.0.5.1, ...: the "network" the router sees). listen: also read the
    replies coming back (``received``), e.g. to count how many of a
    network's queries a limit lets through.
    """

    def __init__(self, port: int, datagrams: Sequence[bytes], *, sockets: int = 4,
                 sources: Sequence[str] = (), rate: float | None = None, duration: float | None = None,
                 count: int | None = None, listen: bool = False, host: str = HOST) -> None:
        if not datagrams:
            raise ValueError("nothing to send")
        if duration is None and count is None:
            raise ValueError("a Blaster needs a duration or a count")
        super().__init__()
        self.port, self.host = port, loopback(host)
        self.datagrams = list(datagrams)
        self.sockets = sockets
        self.sources = [loopback(s) for s in sources]
        self.rate, self.duration, self.count, self.listen = rate, duration, count, listen

    def run(self) -> None:
        socks = []
        for k in range(self.sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            if self.sources:
                s.bind((self.sources[k % len(self.sources)], 0))
            socks.append(s)
        fds = [s.fileno() for s in socks]
        ring = _Ring(self.datagrams, _sockaddr_in(self.host, self.port))
        sizes = [len(d) for d in self.datagrams]
        limit = self.count if self.count is not None else 1 << 62
        started = time.monotonic()
        ends = started + self.duration if self.duration is not None else float("inf")
        self._ready.set()
        sent = batches = sent_bytes = 0
        at = 0
        n_data = len(self.datagrams)
        while sent < limit and not self._stop.is_set():
            now = time.monotonic()
            if now >= ends:
                break
            n = min(BATCH, limit - sent)
            if self.rate:
                # Smaller batches at low rates, so the datagrams are spread over time.
                n = max(1, min(n, int(self.rate / 200) or 1))
            done = ring.send(fds[batches % len(fds)], at, n)
            batches += 1
            sent += done
            sent_bytes += sum(sizes[(at + i) % n_data] for i in range(done))
            at = (at + done) % n_data
            self._sent.value = sent
            self._sent_bytes.value = sent_bytes
            if self.listen:
                self._drain(socks)
            _pace(started, sent, self.rate)
        if self.listen:
            # The last replies: until nothing came for half a second.
            quiet_until = time.monotonic() + 0.5
            while time.monotonic() < quiet_until and not self._stop.is_set():
                if self._drain(socks):
                    quiet_until = time.monotonic() + 0.5
                else:  # until a reply is there (or the quiet half second is up)
                    select.select(socks, [], [], max(0.0, quiet_until - time.monotonic()))
        for s in socks:
            s.close()

    def _drain(self, socks: list[socket.socket]) -> int:
        got = 0
        for s in socks:
            while True:
                try:
                    data = s.recv(65535, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # an ICMP error the socket had pending
                got += 1
                self._received_bytes.value += len(data)
        if got:
            self._received.value += got
        return got


_IP_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")


def ip_udp(source: tuple[str, int], destination: tuple[str, int], payload: bytes, ident: int = 0) -> bytes:
    """An IPv4 + UDP datagram carrying payload, for a raw socket with IP_HDRINCL.

    The IP checksum is left 0: Linux always fills it in on such a socket
    (raw(7)). The UDP checksum is 0 too: "none", which IPv4 allows.
    """
    return _IP_UDP.pack(0x45, 0, 28 + len(payload), ident & 0xFFFF, 0x4000, 64, socket.IPPROTO_UDP, 0,
                        socket.inet_aton(source[0]), socket.inet_aton(destination[0]),
                        source[1], destination[1], 8 + len(payload), 0) + payload


def many_sources(i: int) -> str:
    """The i-th of 15,605,760 distinct addresses of 127/8 outside 127.0.0.0/12 (where the
    tests' fixed clients and victims live). Consecutive numbers change the /24 first:
    i = 0..61,439 are 61,440 distinct /24 networks, so a flood of them fills any
    per-network table, and a million of them are each ~16 hosts of those networks."""
    if not 0 <= i < 61440 * 254:
        raise ValueError(f"source number {i} out of range")
    net = i % 61440
    return f"127.{16 + net // 256}.{net % 256}.{1 + i // 61440}"


class Spoofer(_Sender):
    """Sends one payload to 127.0.0.1:port over a raw socket with forged sources (needs root).

    source: one (address, port) every datagram claims to come from (a
    victim: the replies go there), or a function of the datagram's number
    giving its (address, port) (many_sources for a flood from a million
    addresses). rate: datagrams a second (None: as fast as it can), for
    duration seconds or count datagrams.
    """

    def __init__(self, port: int, payload: bytes | Callable[[int], bytes], *,
                 source: tuple[str, int] | Callable[[int], tuple[str, int]],
                 rate: float | None = None, duration: float | None = None, count: int | None = None,
                 host: str = HOST) -> None:
        if duration is None and count is None:
            raise ValueError("a Spoofer needs a duration or a count")
        super().__init__()
        self.port, self.host = port, loopback(host)
        self.payload, self.source = payload, source
        if not callable(source):
            loopback(source[0])
        self.rate, self.duration, self.count = rate, duration, count

    def run(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        out = _Payloads(_sockaddr_in(self.host, 0))
        destination = (self.host, self.port)
        fixed = None
        if not callable(self.source) and not callable(self.payload):
            fixed = ip_udp(self.source, destination, self.payload)
        limit = self.count if self.count is not None else 1 << 62
        started = time.monotonic()
        ends = started + self.duration if self.duration is not None else float("inf")
        self._ready.set()
        sent = sent_bytes = 0
        checked: set[str] = set()
        while sent < limit and not self._stop.is_set() and time.monotonic() < ends:
            n = min(BATCH, limit - sent)
            if self.rate:
                n = max(1, min(n, int(self.rate / 200) or 1))
            if fixed is not None:
                batch = [fixed] * n
            else:
                batch = []
                for i in range(sent, sent + n):
                    src = self.source(i) if callable(self.source) else self.source
                    if src[0] not in checked and len(checked) < 4:  # sample the generator
                        checked.add(loopback(src[0]))
                    payload = self.payload(i) if callable(self.payload) else self.payload
                    batch.append(ip_udp(src, destination, payload, i))
            sent += out.send(s.fileno(), batch)
            sent_bytes += sum(len(d) - 28 for d in batch)
            self._sent.value = sent
            self._sent_bytes.value = sent_bytes
            _pace(started, sent, self.rate)
        s.close()
