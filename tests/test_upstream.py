"""One upstream socket and its pending queries: first answer wins, early retry, ICMP, timeout."""
from __future__ import annotations

import select
import socket
import threading
import time

import dns.message
import pytest

from dnsrouter import proxy
from dnsrouter.address import Address
from dnsrouter.routes import Pool, Route
from dnsrouter.workers.stats import Stats
from dnsrouter.workers.upstream import Pending, Upstream
from support.net import HOST, free_port, wait_until


class Client:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, addr: bytes | None, outbox=None) -> None:
        self.sent.append(data)


class Policy:
    """Records what the upstream decides, with fixed retry times."""

    def __init__(self, rto: float = 0.05, timeout: float = 1.0) -> None:
        self.timeout, self._rto = timeout, rto
        self.replies: list[tuple[Address, float]] = []  # who answered, when (time.monotonic())
        self.failed: list[float] = []
        self.unanswered_tries: list[Address] = []
        self.unreachable_tries: list[Address] = []
        self.retried_to: list[Address] = []

    def rto(self, backend: Address) -> float:
        return self._rto

    def retry_target(self, entry: Pending) -> Address:
        target = entry.pool.other(entry.backend) or entry.backend
        self.retried_to.append(target)
        return target

    def answered(self, backend: Address, sent: float, rtt: float, counts) -> None:
        pass

    def reply(self, entry: Pending, data: bytes, counts, outbox) -> None:
        self.replies.append((entry.backend, time.monotonic()))

    def unanswered(self, backend: Address, sent: float, counts) -> None:
        self.unanswered_tries.append(backend)

    def unreachable(self, backend: Address, counts) -> None:
        self.unreachable_tries.append(backend)

    def fail(self, entry: Pending, counts) -> None:
        self.failed.append(time.monotonic() - entry.sent)


class Backend:
    """A UDP socket that answers (or not) queries, in a thread."""

    def __init__(self, answer: bool = True, delay: float = 0.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.address = Address(HOST, self.sock.getsockname()[1])
        self.answer, self.delay, self.received = answer, delay, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                continue
            self.received += 1
            if self.answer:
                query = dns.message.from_wire(data)
                if self.delay:
                    self.stop.wait(self.delay)
                self.sock.sendto(dns.message.make_response(query).to_wire(), peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def upstream_for():
    made = []

    def make(policy: Policy) -> Upstream:
        upstream = Upstream(socket.AF_INET, policy, Stats().for_thread())
        threading.Thread(target=upstream.serve, daemon=True).start()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()
    wait_until(lambda: all(u.sock.fileno() == -1 for u in made), 2, message="upstream threads did not stop")


def entry_for(*backends: Address) -> Pending:
    query = dns.message.make_query("www.test.", "A").to_wire()
    pool = Pool(Route(r"\.test\.$", backends), backends)
    return Pending(Client(), None, query, query[12:], pool, backends[0], False, False)


def test_a_silent_backend_is_retried_on_the_other_member_after_the_retry_time(upstream_for):
    silent, alive = Backend(answer=False), Backend()
    try:
        policy = Policy(rto=0.05)
        upstream = upstream_for(policy)
        start = time.monotonic()
        assert upstream.send(entry_for(silent.address, alive.address))
        wait_until(lambda: policy.replies, 2, message="no answer")
        (who, when), = policy.replies
        assert who == alive.address and 0.05 <= when - start < 0.5  # the retry, long before the 1 s timeout
        assert policy.retried_to == [alive.address] and policy.failed == []
        # The silent try stays open until the timeout, then counts against its backend.
        wait_until(lambda: policy.unanswered_tries, 3, message="the silent try never expired")
        assert policy.unanswered_tries == [silent.address] and policy.failed == []
        assert upstream.pending == {}
    finally:
        silent.close()
        alive.close()


def test_a_backend_that_answers_in_time_is_not_asked_twice(upstream_for):
    one, two = Backend(), Backend()
    try:
        policy = Policy(rto=0.5)
        upstream = upstream_for(policy)
        for _ in range(20):
            assert upstream.send(entry_for(one.address, two.address))
        wait_until(lambda: len(policy.replies) == 20, 2, message="not every query answered")
        assert policy.retried_to == [] and two.received == 0
    finally:
        one.close()
        two.close()


def test_the_first_answer_wins_and_the_late_one_is_counted(upstream_for):
    slow, fast = Backend(delay=0.2), Backend()
    try:
        policy = Policy(rto=0.02)
        upstream = upstream_for(policy)
        upstream.send(entry_for(slow.address, fast.address))
        wait_until(lambda: upstream.counts.get(("late_replies", slow.address)), 2, message="no late reply")
        assert [who for who, _ in policy.replies] == [fast.address]  # answered once
    finally:
        slow.close()
        fast.close()


def test_a_pool_of_one_asks_the_same_member_once_more(upstream_for):
    lossy = Backend(answer=False)
    try:
        policy = Policy(rto=0.02, timeout=0.3)
        upstream = upstream_for(policy)
        upstream.send(entry_for(lossy.address))
        wait_until(lambda: policy.failed, 2, message="no SERVFAIL")
        assert policy.retried_to == [lossy.address] and lossy.received == 2
        assert 0.3 <= policy.failed[0] < 0.5  # SERVFAIL at the timeout, not before
        assert policy.unanswered_tries == [lossy.address, lossy.address]
    finally:
        lossy.close()


def test_port_unreachable_sends_the_query_on_at_once(upstream_for):
    gone = Address(HOST, free_port("udp"))  # nothing listens: the kernel answers ICMP
    alive = Backend()
    try:
        policy = Policy(rto=0.4)  # the retry time is long: only the ICMP error can be this fast
        upstream = upstream_for(policy)
        start = time.monotonic()
        upstream.send(entry_for(gone, alive.address))
        wait_until(lambda: policy.replies, 2, message="no answer")
        (who, when), = policy.replies
        assert who == alive.address and when - start < 0.2
        assert policy.unreachable_tries == [gone]
        assert upstream.counts["backend_icmp_errors", gone] == 1
    finally:
        alive.close()


def test_every_try_unreachable_is_servfail_at_once(upstream_for):
    gone = Address(HOST, free_port("udp"))
    policy = Policy(rto=0.4)
    upstream = upstream_for(policy)
    upstream.send(entry_for(gone))
    wait_until(lambda: policy.failed, 2, message="no SERVFAIL")
    assert policy.failed[0] < 0.2 and policy.unreachable_tries == [gone, gone]


def test_an_entry_has_its_times_before_the_owner_thread_can_see_it():
    # The owner thread may scan the table at any moment; here it scans right
    # after the entry went in, the worst moment.
    policy = Policy(timeout=0.5)
    upstream = Upstream(socket.AF_INET, policy, Stats().for_thread())
    seen = []

    class ScannedOnInsert(dict):
        def setdefault(self, key, value):
            result = super().setdefault(key, value)
            seen.append((value.sent, value.retry_at))
            upstream._timeouts(time.monotonic(), upstream.counts)
            return result

    upstream.pending = ScannedOnInsert()
    try:
        assert upstream.send(entry_for(Address(HOST, 9)))
        assert policy.failed == [] and len(upstream.pending) == 1
        assert all(sent > 0 and retry_at > sent for sent, retry_at in seen)
    finally:
        upstream.sock.close()


def test_the_retry_never_shares_its_first_try_s_id():
    # The ID source may repeat: the retry must then draw again, or the two
    # tries would be one table entry (and the first one's reply taken for
    # the retry's backend).
    policy = Policy(rto=0.01)
    upstream = Upstream(socket.AF_INET, policy, Stats().for_thread())
    ids = iter([1234, 1234, 1234, 4321])
    upstream._ids.next = lambda: next(ids)
    try:
        entry = entry_for(Address(HOST, 9), Address(HOST, 10))
        assert upstream.send(entry)
        upstream.retry(entry, time.monotonic(), upstream.counts, _NoOutbox())
        assert (entry.uid, entry.retry_uid) == (1234, 4321)
        assert set(upstream.pending) == {1234, 4321}
    finally:
        upstream.sock.close()


class _NoOutbox:
    pick = 0

    def add(self, fd: int, payload: bytes, name: bytes) -> None:
        pass

    def flush(self) -> None:
        pass


def test_a_send_that_takes_an_earlier_icmp_error_still_goes_and_the_error_is_still_read():
    """With IP_RECVERR, an ICMP error is also the socket's pending error, and
    the next send from ANY thread takes it and fails: a query on its way to a
    live member was lost, and the owner thread, never woken, left the dead
    member's query to wait for its retry time."""
    gone = Address(HOST, free_port("udp"))
    alive = Backend()
    policy = Policy(rto=10.0)  # no retry by the clock within this test
    upstream = Upstream(socket.AF_INET, policy, Stats().for_thread())
    thread = threading.Thread(target=upstream.serve, daemon=True)
    try:
        upstream.send(entry_for(gone, alive.address))
        poller = select.poll()
        poller.register(upstream.fd, select.POLLERR)
        wait_until(lambda: poller.poll(0), 2, message="no ICMP error came back")
        start = time.monotonic()
        upstream.send(entry_for(alive.address, gone))  # takes the pending error: must still be sent
        thread.start()  # only now: the owner had no chance to take the error first
        wait_until(lambda: len(policy.replies) == 2, 2, message=f"answered: {policy.replies}")
        assert sorted(when - start < 1.0 for _, when in policy.replies) == [True, True]
        assert [who for who, _ in policy.replies] == [alive.address, alive.address]
        assert policy.unreachable_tries == [gone]
        assert alive.received == 2
    finally:
        upstream.close()
        if thread.is_alive():
            thread.join(2)
        else:
            upstream.sock.close()
        alive.close()


def test_an_icmp_error_for_a_query_behind_a_proxy_header_names_its_query(upstream_for):
    gone = Address(HOST, free_port("udp"))
    alive = Backend()
    try:
        policy = Policy(rto=10.0)
        upstream = upstream_for(policy)
        entry = entry_for(gone, alive.address)
        entry.variants = {gone: (proxy.header(("127.0.0.9", 5353), (HOST, 53)), entry.query)}
        start = time.monotonic()
        upstream.send(entry)
        wait_until(lambda: policy.replies, 2, message="the ICMP error did not send the query on")
        (who, when), = policy.replies
        assert who == alive.address and when - start < 1.0
        assert policy.unreachable_tries == [gone]
    finally:
        alive.close()
