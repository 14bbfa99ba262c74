"""Clients that do not keep up never slow down the others: TCP clients that
never read their answers, and bursts of truncated answers fetched over TCP."""
from __future__ import annotations

import select
import socket
import struct
import threading
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from dnsrouter.workers.tcp_fetch import BACKLOG_PER_FETCH
from support.fake_backend import ANSWER_ADDRESS, FakeBackend
from support.knot import KnotServer
from support.metrics import samples, value
from support.net import HOST, free_port, routed, wait_until
from support.zones import zone_text

pytestmark = pytest.mark.system

# Five TXT strings of 200 characters: a 1.1 KB answer, under Knot's 1232-byte
# UDP limit, so it comes back over UDP and an upstream socket's thread relays
# it, the thread that also relays every other client's answers.
BIG = "big.slow.test."
# The UDP clients ask another Knot: a burst of pipelined queries overflows a
# backend's socket buffer now and then, and that loss is the backend's, not
# the router's. The router's threads are what both have in common.
SMALL = "h0001.fast.test."

_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info


@pytest.fixture(scope="module")
def two_knots():
    strings = [(f"s{j:02d}-" + "x" * 200)[:200] for j in range(5)]
    slow = zone_text("slow.test.", [f'big TXT "{s}"' for s in strings])
    fast = zone_text("fast.test.", ["h0001 A 192.0.2.10"])
    with KnotServer({"slow.test.": slow}, workers=2) as big, KnotServer({"fast.test.": fast}) as small:
        yield big, small


def configured(router, tmp_path, text: str):
    """A router with this INI text, one worker (every client shares it) and metrics."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(text)
    mport = free_port("tcp")
    r = router(workers=1, args=["--config", str(conf), "--metrics", f"{HOST}:{mport}"])
    r.mport = mport
    return r


def counter(r, name: str, **labels: str) -> float:
    return value(samples(r.mport), name, **labels)


def framed(query: bytes) -> bytes:
    return struct.pack("!H", len(query)) + query


class SlowReaders:
    """Connections that pipeline queries for the big answer and never read.

    A thread sends a few queries on each, round after round, until the
    router cuts it off: in small rounds, because a backend's socket buffer
    holds a few hundred queries, and a burst of thousands would lose
    queries there (and answers for the router to pass on) rather than here.
    """

    ROUND = 10  # queries per connection per round

    def __init__(self, port: int, n: int, query: bytes) -> None:
        self.conns: list[socket.socket] = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A tiny window and small segments: the kernel sizes the router's
            # send buffer by the MSS, so it fills after tens of answers, not thousands.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 200)
            self.conns.append(s)
            s.settimeout(5)
            s.connect((HOST, port))
        self.round = b"".join(framed(struct.pack("!H", i) + query[2:]) for i in range(self.ROUND))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        unsent = {s: bytearray() for s in self.conns}  # what a full send buffer did not take yet
        while unsent and not self.stop.is_set():
            for s, todo in list(unsent.items()):
                if len(todo) < len(self.round):
                    todo += self.round
                try:
                    del todo[:s.send(todo, socket.MSG_DONTWAIT)]
                except BlockingIOError:
                    pass
                except OSError:  # reset: cut off by the router
                    del unsent[s]
            self.stop.wait(0.005)  # the pace of the rounds

    def __enter__(self) -> "SlowReaders":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.conns:
            s.close()


def established(s: socket.socket) -> bool:
    """Whether the router has neither closed nor reset this connection (read without reading it)."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_ESTABLISHED


def udp_latencies(port: int, name: str, n: int, give_up_after: int = 5) -> tuple[list[float], int]:
    """n queries one after another, each waited for up to 1 s: (latencies, lost).
    Stops after ``give_up_after`` losses: a stalled router fails fast."""
    query = dns.message.make_query(name, "A").to_wire()
    latencies: list[float] = []
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((HOST, port))
        for i in range(n):
            qid = struct.pack("!H", i)
            started = time.monotonic()
            deadline = started + 1.0
            s.send(qid + query[2:])
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    lost += 1
                    break
                s.settimeout(remaining)
                try:
                    reply = s.recv(65535)
                except socket.timeout:
                    continue
                if reply[:2] == qid:  # not the late answer to a query already given up
                    latencies.append(time.monotonic() - started)
                    break
            if lost >= give_up_after:
                break
    return latencies, lost


def p99(latencies: list[float]) -> float:
    if not latencies:
        return float("inf")
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_tcp_clients_that_never_read_do_not_slow_down_udp_clients(router, tmp_path, two_knots):
    # 16 KiB queued past what the kernel holds: each slow reader passes it
    # after some tens of answers, and is cut off long before its idle timeout.
    r = configured(router, tmp_path, "[server]\ntcp_output_limit = 16384\ntcp_idle_timeout = 10\n")
    big_knot, small_knot = two_knots
    r.route("slow", rf"{big_knot.addr},\.slow\.test\.$")
    r.route("fast", rf"{small_knot.addr},\.fast\.test\.$")
    wait_until(lambda: routed(r, SMALL) and routed(r, BIG, timeout=1), 5, message="routes not loaded")
    baseline, _ = udp_latencies(r.port, SMALL, 100)
    big = dns.message.make_query(BIG, "TXT")
    with SlowReaders(r.port, 16, big.to_wire()) as slow:
        latencies, lost = udp_latencies(r.port, SMALL, 500)
        measured = (f"UDP while 16 TCP clients do not read: {lost} lost, p99 {p99(latencies) * 1000:.1f} ms, "
                    f"max {max(latencies, default=0) * 1000:.1f} ms (before them: p99 {p99(baseline) * 1000:.1f} ms)")
        print(measured)
        assert lost == 0, measured
        assert p99(latencies) < 0.020, measured
        # Cut off by the router (a reset), well before their 10 s idle timeout.
        wait_until(lambda: not any(established(s) for s in slow.conns), 5,
                   message="slow readers still connected")
    wait_until(lambda: counter(r, "dnsrouter_dropped_total", reason="tcp_slow_reader") == 16, 5,
               interval=0.2, message="slow readers not counted")
    # And the router still serves TCP clients that read.
    answer = dns.query.tcp(big, HOST, port=r.port, timeout=3)
    assert answer.rcode() == dns.rcode.NOERROR and len(answer.answer[0]) == 5


def fetch_router(router, tmp_path, fake: FakeBackend):
    """Two TCP fetches at a time; health checks far apart, so that the only
    TCP queries the backend sees during a test are the router's fetches."""
    r = configured(router, tmp_path, "[forward]\ntcp_fetches = 2\ntimeout = 5\n[health]\ninterval = 600\n")
    r.route("fake", rf"{fake.addr},\.test\.$")
    wait_until(lambda: routed(r, "ready.test."), 5, message="route not loaded")
    fake.mode = "truncate"  # UDP answers TC at once; TCP answers .delay seconds later
    fake.clear()
    return r


def test_truncated_answers_are_fetched_by_a_bounded_pool(router, tmp_path):
    with FakeBackend("ok", delay=0.2) as fake:
        r = fetch_router(router, tmp_path, fake)
        conns = [socket.create_connection((HOST, r.port), timeout=10) for _ in range(12)]
        try:
            queries = [dns.message.make_query(f"q{i}.test.", "A") for i in range(len(conns))]
            for conn, q in zip(conns, queries):  # all at once: twelve truncated answers together
                conn.sendall(framed(q.to_wire()))
            for conn, q in zip(conns, queries):
                reply, _ = dns.query.receive_tcp(conn, time.time() + 10)
                assert reply.id == q.id and reply.rcode() == dns.rcode.NOERROR
                assert reply.answer[0][0].address == ANSWER_ADDRESS
        finally:
            for conn in conns:
                conn.close()
        assert fake.count("tcp") == 12  # every one fetched over TCP...
        assert fake.tcp_peak == 2  # ...two at a time, never a connection per answer


def test_truncated_answers_beyond_the_pools_backlog_get_servfail(router, tmp_path):
    # Fetches that take 2 s: nothing leaves the pool while the burst arrives.
    with FakeBackend("ok", delay=2.0) as fake:
        r = fetch_router(router, tmp_path, fake)
        room = 2 + BACKLOG_PER_FETCH * 2  # running, and waiting their turn
        extra = 10
        conns = [socket.create_connection((HOST, r.port), timeout=10) for _ in range(room + extra)]
        rcodes: list[int] = []
        try:
            for i, conn in enumerate(conns):
                conn.sendall(framed(dns.message.make_query(f"q{i}.test.", "A").to_wire()))
            waiting = list(conns)

            def servfails() -> bool:
                for conn in select.select(waiting, [], [], 0.05)[0]:
                    waiting.remove(conn)
                    rcodes.append(dns.query.receive_tcp(conn, time.time() + 1)[0].rcode())
                return len(rcodes) >= extra

            wait_until(servfails, 1.5, interval=0, message="no SERVFAIL for the fetches the pool has no room for")
            assert rcodes == [dns.rcode.SERVFAIL] * extra  # at once, long before any fetch is done
        finally:
            for conn in conns:
                conn.close()
        wait_until(lambda: counter(r, "dnsrouter_dropped_total", reason="tcp_fetch_queue") == extra, 5,
                   interval=0.2, message="fetches beyond the backlog not counted")
        assert fake.tcp_peak <= 2
