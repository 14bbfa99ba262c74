"""Passive health evidence in a worker: timeouts "in a row" by send order."""
from __future__ import annotations

import dns.message

from dnsrouter.address import Address
from dnsrouter.routes import Pool, Route
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from dnsrouter.workers.upstream import Pending


class Client:
    def __init__(self):
        self.sent = []

    def send(self, data, addr):
        self.sent.append(data)


def make_entry(backend: Address, sent: float, client: Client) -> Pending:
    query = dns.message.make_query("x.test.", "A").to_wire()
    pool = Pool(Route(r"\.test\.$", (backend,)), [backend])
    entry = Pending(client, None, query, query[12:], pool, backend, False, False)
    entry.sent = sent
    return entry


def test_a_burst_of_lost_packets_from_a_live_backend_is_no_evidence():
    reports = []
    forwarder = Forwarder(1.0, Stats(), lambda b, streak: reports.append((b, streak)))
    backend, client, counts = Address("127.0.0.1", 5300), Client(), {}
    counts = Stats().for_thread()
    forwarder.answered[backend] = 10.0  # it answered a query sent at t=10
    for sent in (9.0, 9.1, 9.2, 9.3):  # four lost before that: a full buffer, not a dead server
        forwarder._expired(make_entry(backend, sent, client), counts)
    assert reports == []
    assert len(client.sent) == 4  # each lost query still got its SERVFAIL


def test_timeouts_after_the_last_answer_count_in_a_row():
    reports = []
    forwarder = Forwarder(1.0, Stats(), lambda b, streak: reports.append((b, streak)))
    backend, client = Address("127.0.0.1", 5300), Client()
    counts = Stats().for_thread()
    forwarder.answered[backend] = 10.0
    for sent in (10.5, 10.6, 10.7):
        forwarder._expired(make_entry(backend, sent, client), counts)
    assert reports == [(backend, 1), (backend, 2), (backend, 3)]
