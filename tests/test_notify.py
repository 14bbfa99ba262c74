"""NOTIFY at a worker (RFC 1996: [cache] notify_allow purges, elsewhere
REFUSED) and POST /purge at the supervisor's listener: the two ways a purge
enters the log every worker's cache reads."""
from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import pytest

from dnsrouter.address import Address, parse_address
from dnsrouter.config import defaults
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.purges import PurgeLog
from dnsrouter.supervisor.metrics import Metrics
from dnsrouter.workers import mmsg
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from support.net import HOST, free_port


class Client:
    """Where the forwarder's answers go: kept here."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, addr: bytes | None, outbox=None) -> None:
        self.sent.append(data)

    def host(self, addr: bytes | None) -> str:
        assert addr is not None
        return mmsg.host(addr)


def notify(zone: str = "example.com.", questions: int = 1) -> bytes:
    q = dns.message.make_query(zone, "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    q.flags |= dns.flags.AA
    wire = bytearray(q.to_wire())
    wire[5] = questions  # QDCOUNT as sent, right or wrong
    return bytes(wire)


def answer(forwarder: Forwarder, query: bytes, source: str) -> dns.message.Message:
    client = Client()
    forwarder.handle(query, mmsg.raw_address(Address(source, 5353)), client, Stats().for_thread())
    (reply,) = client.sent
    return dns.message.from_wire(reply)


def forwarder(purges: PurgeLog, allow: str = "127.0.0.1/32") -> Forwarder:
    networks = tuple(ipaddress.ip_network(n) for n in allow.split()) if allow else ()
    return Forwarder(defaults(cache_size=10, cache_notify_allow=networks), Stats(), purges=purges)


def test_notify_from_notify_allow_purges_the_zone_and_is_answered_noerror_with_aa():
    log = PurgeLog()
    reply = answer(forwarder(log), notify("Example.COM."), "127.0.0.1")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA and reply.flags & dns.flags.QR
    assert reply.opcode() == dns.opcode.NOTIFY and str(reply.question[0].name) == "Example.COM."
    seq, (purge,) = log.since(0)
    assert (seq, purge.name, purge.subtree, purge.cause) == (1, dns.name.from_text("example.com.").to_wire(),
                                                             True, "notify")


@pytest.mark.parametrize("source, allow", [("127.0.0.2", "127.0.0.1/32"), ("127.0.0.1", "")],
                         ids=["outside notify_allow", "notify_allow empty"])
def test_notify_from_elsewhere_is_refused_and_purges_nothing(source, allow):
    log = PurgeLog()
    reply = answer(forwarder(log, allow), notify(), source)
    assert reply.rcode() == dns.rcode.REFUSED and not reply.flags & dns.flags.AA
    assert log.seq == 0


def test_a_notify_without_one_question_is_formerr():
    log = PurgeLog()
    client = Client()
    forwarder(log).handle(notify(questions=2), mmsg.raw_address(Address(HOST, 5353)), client, Stats().for_thread())
    assert client.sent[0][3] & 0xF == dns.rcode.FORMERR and log.seq == 0


def test_other_opcodes_are_still_notimp():
    q = dns.message.make_query("example.com.", "SOA")
    q.set_opcode(dns.opcode.UPDATE)
    assert answer(forwarder(PurgeLog()), q.to_wire(), HOST).rcode() == dns.rcode.NOTIMP


def _post(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{HOST}:{port}{path}", data=b""),
                                    timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_post_purge_hands_the_name_to_the_supervisor_and_says_what_is_wrong():
    asked: list[tuple[str, bool]] = []

    def purge(name: str, subtree: bool) -> dict:
        if name == "bad":
            raise ValueError("'bad' is not a domain name: too bad")
        asked.append((name, subtree))
        return {"purged": name, "subtree": subtree, "sequence": len(asked)}

    metrics = Metrics(lambda: {}, LATENCY_BUCKETS)
    port = free_port()
    metrics.serve(parse_address(f"{HOST}:{port}"), lambda: {}, lambda: (True, "ok"), purge)
    try:
        assert _post(port, "/purge?name=www.example.com.") == (
            200, b'{"purged": "www.example.com.", "subtree": false, "sequence": 1}')
        assert _post(port, "/purge?name=example.com&subtree=1")[0] == 200
        assert asked == [("www.example.com.", False), ("example.com", True)]
        assert _post(port, "/purge?name=bad") == (400, b"'bad' is not a domain name: too bad\n")
        assert _post(port, "/purge")[0] == 400 and _post(port, "/purge?name=a&name=b")[0] == 400
        assert _post(port, "/metrics")[0] == 404
        assert len(asked) == 2
    finally:
        metrics.close()
