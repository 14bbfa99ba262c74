"""Fuzzing the packet path: hostile datagrams against the running router, and
the wire parsers under atheris (tests/fuzz_wire.py).

The contract checked for every datagram (docs/operating.md, "Answers the router
makes itself"):

* at most one answer per query, and exactly one unless the table says the
  query is dropped (fewer than 12 bytes, or QR set);
* the router's own answers follow the table (REFUSED for a NOTIFY, FORMERR
  without one question; NOTIMP for an opcode other than
  QUERY and for AXFR/IXFR, FORMERR for QDCOUNT != 1 or a question that does
  not parse, SERVFAIL for a name no route matches or a backend that does not
  answer), echo the ID, opcode, RD and the question, carry an OPT record
  exactly when the query had one, and fit what the client can take (512
  bytes without EDNS, the EDNS payload size otherwise);
* a query for a routed name is forwarded: the answer is the backend's (with
  the client's ID), or SERVFAIL when the backend does not answer it (the
  fake backend ignores what dnspython cannot parse);
* after every batch the router still answers a well-formed query correctly,
  with the same worker processes (none crashed and was replaced).

Where the table leaves the order open (an UPDATE with two questions is both
"OPCODE other than QUERY" and "QDCOUNT not 1"), either answer is accepted.
"""
from __future__ import annotations

import os
import random
import re
import selectors
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from support.fake_backend import ANSWER_ADDRESS, FakeBackend
from support.net import HOST, ask, wait_until

pytestmark = pytest.mark.system

FORWARD_TIMEOUT = 0.15  # what a batch with a query the fake ignores waits for (50 batches a run)
ROUTE = re.compile(r"\.test\.$")  # the route's regexp, applied as RE2 would (search)
NOERROR, FORMERR, SERVFAIL, NOTIMP, REFUSED = (dns.rcode.NOERROR, dns.rcode.FORMERR, dns.rcode.SERVFAIL,
                                               dns.rcode.NOTIMP, dns.rcode.REFUSED)
NOTIFY = 4  # the opcode
QR, TC, RD = 0x8000, 0x0200, 0x0100
AXFR, IXFR, OPT = 252, 251, 41
EXAMPLES = int(os.environ.get("DNSROUTER_FUZZ_EXAMPLES", "50"))
ATHERIS_SECONDS = int(os.environ.get("DNSROUTER_FUZZ_SECONDS", "15"))


# -- what the contract says about one datagram ---------------------------------

def question_end(packet: bytes) -> int | None:
    """Where the (uncompressed, at most 255-byte) question at offset 12 ends, or None.

    A query's question is the first name of the message: a compression
    pointer there can only point into the header or at itself, so it never
    parses.
    """
    pos = 12
    while True:
        if pos >= len(packet):
            return None
        length = packet[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            return None
        pos += length + 1
    if pos - 12 > 255 or pos + 4 > len(packet):
        return None
    return pos + 4


def query_edns(packet: bytes) -> tuple[bool | None, int]:
    """(whether the query carries OPT, the payload it allows).

    None when dnspython cannot parse the whole message: then it is not clear
    whether the client "had" an OPT record, and the answer's OPT is not checked.
    """
    try:
        message = dns.message.from_wire(packet, question_only=False)
    except Exception:  # any refusal means "not a well-formed message"
        return None, 512
    if message.opt is None:
        return False, 512
    return True, max(512, int(message.payload))


@dataclass
class Expect:
    drop: bool = False
    forward: bool = False  # the backend's answer, or the router's SERVFAIL
    rcodes: frozenset = frozenset()  # for the router's own answer
    end: int | None = None  # where the question ends, when it parses
    question_required: bool = False  # the answer must echo the question
    edns: bool | None = None
    payload: int = 512


def expect(packet: bytes) -> Expect:
    if len(packet) < 12 or packet[2] & 0x80:
        return Expect(drop=True)
    opcode = (packet[2] >> 3) & 0xF
    qdcount = packet[4] << 8 | packet[5]
    end = question_end(packet)
    edns, payload = query_edns(packet)
    malformed = qdcount != 1 or end is None
    # Where the router cannot parse the question it cannot find the records
    # after it either: an OPT is only required in answers to queries it can.
    e = Expect(end=end, question_required=not malformed,
               edns=edns if qdcount == 1 and end is not None else None, payload=payload)
    rcodes = set()
    if opcode == NOTIFY:  # the cache's purge: refused here, this router has no [cache] notify_allow
        e.rcodes = frozenset({FORMERR if malformed else REFUSED})
        return e
    if opcode != 0:
        rcodes.add(NOTIMP)
    if malformed:
        rcodes.add(FORMERR)
    qtype = packet[end - 4] << 8 | packet[end - 3] if end else None
    if rcodes:
        if qtype in (AXFR, IXFR):
            rcodes.add(NOTIMP)
        e.rcodes = frozenset(rcodes)
        return e
    if qtype in (AXFR, IXFR):
        e.rcodes = frozenset({NOTIMP})
        return e
    name = dns.name.from_wire(packet[12:end - 4].lower(), 0)[0].to_text()
    if ROUTE.search(name):
        e.forward = True
        e.rcodes = frozenset({SERVFAIL})  # when the backend does not answer
    else:
        e.rcodes = frozenset({SERVFAIL})
    return e


def router_answer_problems(query: bytes, e: Expect, reply: bytes) -> list[str]:
    """What is wrong with the router's own answer to ``query``."""
    out = []
    if len(reply) < 12:
        return [f"answer of {len(reply)} bytes"]
    flags = reply[2] << 8 | reply[3]
    qflags = query[2] << 8 | query[3]
    rcode = flags & 0xF
    if rcode not in e.rcodes:
        out.append(f"rcode {dns.rcode.to_text(rcode)}, expected "
                   f"{'/'.join(sorted(dns.rcode.to_text(r) for r in e.rcodes))}")
    if not flags & QR:
        out.append("QR not set")
    if (flags >> 11) & 0xF != (qflags >> 11) & 0xF:
        out.append(f"opcode {(flags >> 11) & 0xF} instead of {(qflags >> 11) & 0xF}")
    if flags & RD != qflags & RD:
        out.append("RD not echoed")
    qd, an, ns, ar = (int.from_bytes(reply[i:i + 2], "big") for i in (4, 6, 8, 10))
    if an or ns or qd > 1:
        out.append(f"counts qd={qd} an={an} ns={ns}")
    pos = 12
    if qd == 1:
        if e.end is None:
            out.append("a question echoed for a query whose question does not parse")
        elif reply[12:e.end] != query[12:e.end]:
            out.append(f"question {reply[12:e.end].hex()} instead of {query[12:e.end].hex()}")
        pos = e.end or len(reply)
    elif e.question_required:
        out.append("question not echoed")
    has_opt = ar == 1 and reply[pos:pos + 3] == b"\x00\x00\x29"
    if ar and not has_opt:
        out.append(f"additional section ({ar} records) is not one OPT record")
    if e.edns is not None and has_opt != e.edns:
        out.append("OPT record " + ("missing" if e.edns else "added to a query without EDNS"))
    limit = e.payload if e.edns else 512
    if len(reply) > limit:
        out.append(f"answer of {len(reply)} bytes, the client takes {limit}")
    try:
        # The opcode cleared: dnspython reads an UPDATE's question as its zone
        # section, which must be of type SOA; the structure is what counts here.
        dns.message.from_wire(reply[:2] + bytes([reply[2] & 0x87]) + reply[3:])
    except Exception as exc:  # the router's answer must be a well-formed message
        out.append(f"dnspython cannot parse it: {exc!r}")
    return out


# -- sending batches -----------------------------------------------------------

@dataclass
class Probe:
    packet: bytes
    expect: Expect
    batch: int
    replies: list = field(default_factory=list)


class Prober:
    """Sends datagrams from a few client sockets (so SO_REUSEPORT spreads them
    over the workers) and attributes every reply to its query by ID."""

    def __init__(self, port: int, sockets: int = 4) -> None:
        self.addr = (HOST, port)
        self.sel = selectors.DefaultSelector()
        self.socks = []
        for _ in range(sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((HOST, 0))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
            self.socks.append(s)
        self.next_id = random.randrange(65536)
        self.probes: dict[int, Probe] = {}
        self.batches = 0
        self.sent = 0
        self.stray: list[bytes] = []

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.sel.close()

    def _receive(self, timeout: float) -> None:
        for key, _ in self.sel.select(max(0.0, timeout)):
            while True:
                try:
                    data = key.fileobj.recv(65535)
                except BlockingIOError:
                    break
                probe = self.probes.get(int.from_bytes(data[:2], "big")) if len(data) >= 2 else None
                if probe is None:
                    self.stray.append(data)
                else:
                    probe.replies.append(data)

    def run(self, packets: list[bytes]) -> list[str]:
        """Send one batch; return the contract violations seen."""
        if self.sent + len(packets) > 60000:
            raise RuntimeError("query IDs would repeat: use a fresh Prober")
        self.batches += 1
        batch = []
        for i, packet in enumerate(packets):
            if len(packet) >= 2:
                qid = self.next_id
                self.next_id = (self.next_id + 1) % 65536
                packet = qid.to_bytes(2, "big") + packet[2:]
                probe = self.probes[qid] = Probe(packet, expect(packet), self.batches)
            else:
                probe = Probe(packet, expect(packet), self.batches)
            batch.append(probe)
            self.socks[i % len(self.socks)].sendto(packet, self.addr)
            self.sent += 1
        last_send = time.monotonic()
        # A forwarded query the backend ignores is answered after the forward
        # timeout: wait that long (plus the timer's granularity and some
        # slack) for duplicates too. Answers the router makes at once come in
        # milliseconds; 0.15 s catches any second copy of those.
        grace = FORWARD_TIMEOUT + 0.25 if any(p.expect.forward for p in batch) else 0.15
        deadline = last_send + FORWARD_TIMEOUT + 3.0
        while True:
            now = time.monotonic()
            waiting = [p for p in batch if not p.expect.drop and not p.replies]
            if now >= deadline or (not waiting and now >= last_send + grace):
                break
            self._receive(min(deadline, last_send + grace if not waiting else deadline) - now)
        self._receive(0)
        return self.problems(batch)

    def problems(self, batch: list[Probe]) -> list[str]:
        out = []
        for p in batch:
            e = p.expect
            what = f"query {p.packet.hex()}"
            if e.drop:
                if p.replies:
                    out.append(f"{what}: should be dropped, got {len(p.replies)} answer(s): "
                               f"{[r.hex() for r in p.replies]}")
                continue
            if not p.replies:
                out.append(f"{what}: no answer (expected "
                           f"{'forwarding' if e.forward else sorted(map(dns.rcode.to_text, e.rcodes))})")
                continue
            if len(p.replies) > 1:
                out.append(f"{what}: {len(p.replies)} answers: {[r.hex() for r in p.replies]}")
            reply = p.replies[0]
            rcode = reply[3] & 0xF if len(reply) >= 4 else None
            if e.forward and rcode != SERVFAIL:
                if rcode != NOERROR or not reply[2] & 0x80:
                    out.append(f"{what}: forwarded, yet answered {reply.hex()}")
                continue
            issues = router_answer_problems(p.packet, e, reply)
            if issues:
                out.append(f"{what}: answer {reply.hex()}: {'; '.join(issues)}")
        for data in self.stray:
            out.append(f"an answer to no query of this batch: {data.hex()}")
        self.stray.clear()
        for p in self.probes.values():
            if p.batch < self.batches and len(p.replies) > (0 if p.expect.drop else 1):
                out.append(f"late extra answer to query {p.packet.hex()} of batch {p.batch}: "
                           f"{p.replies[-1].hex()}")
                p.replies.pop()
        return out


# -- packets -------------------------------------------------------------------

QTYPES = [1, 28, 16, 255, AXFR, IXFR, OPT, 0, 6, 15, 250, 254, 65535]
LABELS = [b"www", b"a", b"WWW", b"x" * 63, b"a.b", b"\x00", b"\\", b"\xff\xfe", b"-", b"*"]
SUFFIXES = [[b"test"], [b"TEST"], [b"TeSt"], [b"test", b"other"], [b"other"], [], [b"test", b"test"]]


@st.composite
def base_queries(draw) -> bytes:
    """A valid query built by dnspython, then given any header flags and type/class."""
    labels = draw(st.lists(st.sampled_from(LABELS) | st.binary(min_size=1, max_size=63), max_size=4))
    name = dns.name.Name(labels + draw(st.sampled_from(SUFFIXES)) + [b""])
    edns = draw(st.sampled_from([None, 0, 0, 1]))
    kw = {}
    if edns is not None:
        kw = dict(use_edns=edns, want_dnssec=draw(st.booleans()),
                  payload=draw(st.sampled_from([0, 1, 511, 512, 1232, 4096, 65535]) | st.integers(0, 65535)),
                  options=draw(st.lists(st.builds(dns.edns.GenericOption, st.integers(0, 65535),
                                                  st.binary(max_size=40)), max_size=2)))
    try:
        query = dns.message.make_query(name, "A", **kw)
    except dns.exception.DNSException:  # a name too long for DNS: use the root
        query = dns.message.make_query(".", "A", **kw)
    wire = bytearray(query.to_wire())
    end = question_end(bytes(wire))
    qtype = draw(st.sampled_from(QTYPES) | st.integers(0, 65535))
    qclass = draw(st.sampled_from([1, 3, 255, 254, 0]) | st.integers(0, 65535))
    wire[end - 4:end] = qtype.to_bytes(2, "big") + qclass.to_bytes(2, "big")
    # Mostly ordinary queries (QR clear, opcode QUERY), so that most packets
    # reach the deeper checks; every flag bit and opcode still comes up.
    flags = draw(st.integers(0, 0xFFFF))
    if draw(st.integers(0, 3)):
        flags &= ~QR
    if draw(st.integers(0, 2)):
        flags &= ~(0xF << 11)
    wire[2:4] = flags.to_bytes(2, "big")
    return bytes(wire)


def _mutation(draw, wire: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "pointer", "label_length", "count", "trailing",
                                 "overwrite", "insert", "cut"]))
    n = len(wire)
    if kind == "truncate":
        return wire[:draw(st.integers(0, n))]
    if kind == "pointer":
        # The question name, or its tail after some labels, becomes a
        # compression pointer: at itself (a loop), into the header, forward,
        # or two pointers at each other.
        end = question_end(wire) or n
        cut = draw(st.integers(12, max(12, end - 5)))
        target = draw(st.sampled_from([12, cut, 0, 4, cut + 2]) | st.integers(0, 0x3FFF))
        pointer = (0xC000 | target).to_bytes(2, "big")
        if draw(st.booleans()):
            pointer += (0xC000 | cut).to_bytes(2, "big")
        return wire[:cut] + pointer + wire[end - 4:]
    if kind == "label_length":
        end = question_end(wire)
        if end is None:
            return wire
        starts, pos = [], 12
        while wire[pos]:
            starts.append(pos)
            pos += wire[pos] + 1
        at = draw(st.sampled_from(starts + [pos]))
        value = draw(st.integers(64, 255) | st.integers(0, 63))
        return wire[:at] + bytes([value]) + wire[at + 1:]
    if kind == "count":
        which = draw(st.sampled_from([4, 6, 8, 10]))
        value = draw(st.sampled_from([0, 2, 3, 0xFFFF, 0x8000]) | st.integers(0, 0xFFFF))
        return wire[:which] + value.to_bytes(2, "big") + wire[which + 2:]
    if kind == "trailing":
        return wire + draw(st.binary(min_size=1, max_size=64))
    if kind == "overwrite":
        at = draw(st.integers(0, max(0, n - 1)))
        return wire[:at] + bytes([draw(st.integers(0, 255))]) + wire[at + 1:]
    if kind == "insert":
        at = draw(st.integers(0, n))
        return wire[:at] + draw(st.binary(min_size=1, max_size=16)) + wire[at:]
    at = draw(st.integers(0, n))
    return wire[:at] + wire[at + draw(st.integers(1, 16)):]


@st.composite
def packets(draw) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=80))  # pure noise now and then
    wire = draw(base_queries())
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        wire = _mutation(draw, wire)
    return wire


# -- the router under test ---------------------------------------------------

@pytest.fixture
def fuzz_router(router, tmp_path):
    """Two workers, route \\.test\\.$ to a fake backend; a short forward timeout
    keeps batches fast, and fall is high so that the fake ignoring what it
    cannot parse never takes it down (which would change nothing in the
    contract, only make the check after each batch wait for it to come back)."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(f"[forward]\ntimeout = {FORWARD_TIMEOUT}\n[health]\nfall = 1000000\n")
    with FakeBackend("ok") as fake:
        r = router(workers=2, args=["--config", str(conf)])
        r.route("test", rf"{fake.addr},\.test\.$")
        wait_until(lambda: well_formed_ok(r), 5, message="route never applied")
        prober = Prober(r.port)
        try:
            yield r, prober, r.worker_pids()
        finally:
            prober.close()


def well_formed_ok(r) -> bool:
    reply = ask(r, "check.test.", timeout=2)
    if reply is None:
        return False
    return reply.rcode() == NOERROR and [rr.address for rr in reply.answer[0]] == [ANSWER_ADDRESS]


def check_batch(r, prober, pids, batch: list[bytes]) -> None:
    problems = prober.run(batch)
    assert r.proc.poll() is None, f"router exited with {r.proc.returncode}:\n{r.log()[-3000:]}"
    assert r.worker_pids() == pids, f"a worker was replaced (crashed):\n{r.log()[-3000:]}"
    assert well_formed_ok(r), "a well-formed query is no longer answered correctly"
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"


@pytest.mark.usefixtures("packet_path")  # both UDP paths, compiled and Python (conftest.PACKET_PATHS)
def test_hostile_datagrams(fuzz_router):
    r, prober, pids = fuzz_router

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: each step is a batch on the wire
              suppress_health_check=list(HealthCheck))
    @given(st.lists(packets(), min_size=10, max_size=30))
    def batches(batch):
        check_batch(r, prober, pids, batch)

    batches()
    # The router saw every kind of input: the counts are a guard against a
    # generator that silently produced only one kind.
    kinds = defaultdict(int)
    for p in prober.probes.values():
        e = p.expect
        if e.forward:  # the backend's answer, or SERVFAIL after the forward timeout
            kind = "forward, backend answered" if p.replies and p.replies[0][3] & 0xF == NOERROR \
                else "forward, SERVFAIL"
        else:
            kind = "drop" if e.drop else "/".join(sorted(map(dns.rcode.to_text, e.rcodes)))
        kinds[kind] += 1
    print(f"\n{prober.sent} datagrams in {prober.batches} batches: {dict(kinds)}")
    assert all(kinds[k] for k in ("drop", "forward, backend answered", "FORMERR", "SERVFAIL", "NOTIMP"))


def every_opcode_flag_and_qtype() -> list[bytes]:
    """The systematic part: each opcode, each flag bit, each special type,
    with and without EDNS, and the classic malformed questions."""
    out = []
    for edns in (-1, 0):
        base = bytearray(dns.message.make_query("sys.test.", "A", use_edns=edns, payload=1232).to_wire())
        for opcode in range(16):
            p = bytearray(base)
            p[2] = (p[2] & 0x87) | opcode << 3
            out.append(bytes(p))
        for bit in range(16):
            p = bytearray(base)
            flags = (p[2] << 8 | p[3]) | 1 << bit
            p[2:4] = flags.to_bytes(2, "big")
            out.append(bytes(p))
        end = question_end(bytes(base))
        for qtype in (AXFR, IXFR, OPT, 0, 255, 65535):
            p = bytearray(base)
            p[end - 4:end - 2] = qtype.to_bytes(2, "big")
            out.append(bytes(p))
        for payload in (0, 511, 512, 513, 4096, 65535):
            out.append(dns.message.make_query("pay.test.", "A", use_edns=0, payload=payload).to_wire())
            out.append(dns.message.make_query("pay.other.", "A", use_edns=0, payload=payload).to_wire())
        header = bytes(base[:12])
        tail = bytes(base[end - 4:])
        out += [
            header + b"\xc0\x0c" + tail,                      # pointer to itself
            header + b"\x03www\xc0\x0c" + tail,               # loop through a label
            header + b"\xc0\x04" + tail,                      # into the header
            header + b"\xc0\x0e\xc0\x0c" + tail,              # two pointers at each other
            header + b"\x40" + b"a" * 64 + b"\x00" + tail,   # label of 64
            header + b"\x3f" + b"a" * 10,                     # label past the end
            header + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + tail,  # name of 257 bytes
            header + b"\x04test\x00\x00",                     # type and class cut
            header,                                           # nothing after the header
            header[:11],
            b"",
        ]
        for offset in (4, 6, 8, 10):
            for count in (0, 2, 0xFFFF):
                p = bytearray(base)
                p[offset:offset + 2] = count.to_bytes(2, "big")
                out.append(bytes(p))
    return out


@pytest.mark.usefixtures("packet_path")
def test_every_opcode_flag_bit_and_special_type(fuzz_router):
    r, prober, pids = fuzz_router
    systematic = every_opcode_flag_and_qtype()
    for i in range(0, len(systematic), 25):
        check_batch(r, prober, pids, systematic[i:i + 25])


# -- atheris -------------------------------------------------------------------

def test_wire_parsers_under_atheris(tmp_path):
    """tests/fuzz_wire.py for a bounded time (DNSROUTER_FUZZ_SECONDS, default 15):
    any exception other than WireError/ValueParseError is a crash."""
    harness = Path(__file__).with_name("fuzz_wire.py")
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    subprocess.run([sys.executable, str(harness), "--write-seeds", str(corpus)], check=True,
                   capture_output=True, timeout=60)
    proc = subprocess.run(
        [sys.executable, str(harness), f"-max_total_time={ATHERIS_SECONDS}", "-timeout=10",
         "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=ATHERIS_SECONDS + 120,
    )
    output = proc.stdout + proc.stderr
    crashes = sorted(artifacts.iterdir())
    assert proc.returncode == 0 and not crashes, (
        f"atheris found a crash (exit {proc.returncode}); inputs: "
        f"{[(c.name, c.read_bytes().hex()) for c in crashes]}\n{output[-6000:]}")
    runs = re.search(r"Done (\d+) runs", output)
    assert runs and int(runs.group(1)) > 1000, f"the fuzzer hardly ran:\n{output[-3000:]}"
