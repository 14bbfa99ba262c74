"""Passive health evidence in a worker: unanswered tries "in a row" by send order."""
from __future__ import annotations

from dnsrouter.address import Address
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.config import defaults
from dnsrouter.workers.stats import Stats


def test_a_burst_of_lost_packets_from_a_live_backend_is_no_evidence():
    forwarder = Forwarder(defaults(forward_timeout=1.0), Stats())
    backend, counts = Address("127.0.0.1", 5300), Stats().for_thread()
    forwarder.answered(backend, 10.0, 0.001, counts)  # it answered a query sent at t=10
    for sent in (9.0, 9.1, 9.2, 9.3):  # four lost before that: a full buffer, not a dead server
        forwarder.unanswered(backend, sent, counts)
    assert forwarder.evidence == {}
    assert counts["backend_timeouts", backend] == 4


def test_unanswered_tries_after_the_last_answer_count_in_a_row():
    forwarder = Forwarder(defaults(forward_timeout=1.0), Stats())
    backend, counts = Address("127.0.0.1", 5300), Stats().for_thread()
    forwarder.answered(backend, 10.0, 0.001, counts)
    forwarder.unanswered(backend, 10.5, counts)
    forwarder.unreachable(backend, counts)  # an ICMP error counts as much
    forwarder.unanswered(backend, 10.7, counts)
    # Coalesced: the supervisor hears the latest streak, once.
    assert forwarder.evidence == {backend: 3}


def test_the_retry_time_follows_the_round_trips_within_its_bounds():
    forwarder = Forwarder(defaults(forward_timeout=1.0, forward_retry_min=0.02), Stats())
    fast, slow, new = Address("127.0.0.1", 1), Address("127.0.0.1", 2), Address("127.0.0.1", 3)
    counts = Stats().for_thread()
    for _ in range(50):
        forwarder.answered(fast, 0.0, 0.0005, counts)
        forwarder.answered(slow, 0.0, 0.080, counts)
    assert forwarder.rto(fast) == 0.02  # retry_min
    assert 0.080 < forwarder.rto(slow) < 0.2  # SRTT + 4 x RTTVAR of a steady 80 ms
    forwarder.answered(slow, 0.0, 3.0, counts)
    assert forwarder.rto(slow) == 0.5  # never past half the timeout
    assert forwarder.rto(new) == 0.5  # nothing known yet
