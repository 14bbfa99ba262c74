"""The rate limits' accounts (dnsrouter/ratelimit.py) and their compiled
twins (workers/_fastpath.pyx): what a limit lets through over time, what an
RRL account is for, the memory bound, and the twins' agreement with the
reference byte for byte and charge for charge."""
from __future__ import annotations

import ipaddress
import socket
import struct

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import event, given, settings, strategies as st

from dnsrouter import ratelimit
from dnsrouter.ratelimit import KINDS, QueryLimit, RateTable, ResponseLimit
from dnsrouter.workers import fastpath
from support.mutations import mutate, mutations

SECOND = 1_000_000_000


def _compiled():
    module, why = fastpath.load()
    assert module is not None, f"the compiled path is not built: {why}"  # CI builds it: a failure, never a skip
    return module


def v4(address: str, port: int = 5353) -> bytes:
    """A raw struct sockaddr_in, as recvmmsg gives it."""
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(address) + bytes(8)


def v6(address: str, port: int = 5353) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, address) + bytes(4))


def _reply(name: str, rcode: int = 0, soa: str | None = None, txt: bool = False) -> bytes:
    message = dns.message.make_response(dns.message.make_query(name, "TXT" if txt else "A"))
    message.set_rcode(rcode)
    if txt:
        message.answer.append(dns.rrset.from_text(name, 300, "IN", "TXT", '"' + "x" * 200 + '"'))
    if soa:
        message.authority.append(dns.rrset.from_text(soa, 300, "IN", "SOA", f"ns.{soa} h.{soa} 1 2 3 4 5"))
    return message.to_wire()


LIMITS = ["python", "compiled"]


def _query_limit(path: str, table: RateTable, qps: int, burst: int = 0, exempt=()):
    cls = QueryLimit if path == "python" else _compiled().QueryLimit
    return cls(table, qps, burst, 24, 56, exempt)


def _response_limit(path: str, table: RateTable, rates=(5, 5, 5), slip: int = 2, window: int = 15, exempt=()):
    cls = ResponseLimit if path == "python" else _compiled().ResponseLimit
    return cls(table, rates, slip, window, 24, 56, exempt)


@pytest.mark.parametrize("path", LIMITS)
def test_a_network_over_its_rate_gets_the_rate(path):
    """5,000 queries a second from one /24 at client_qps 2,000 (burst 0: a
    second's worth): 2,000 a second get through once the burst is spent,
    whichever address of the network asks; another network is untouched."""
    limit = _query_limit(path, RateTable(4096), 2000)
    assert type(limit).__module__.endswith("_fastpath" if path == "compiled" else "ratelimit")
    now = 100 * SECOND
    allowed = [0] * 4
    for n in range(20000):  # 4 s at 5,000 a second, from 127.0.1.0/24's addresses in turn
        allowed[n // 5000] += limit.allow(v4(f"127.0.1.{n % 250}"), now + n * SECOND // 5000)
    assert abs(allowed[0] - (2000 + 2000)) <= 1  # the burst (2,000) then the rate: the edges fall either way
    assert all(abs(n - 2000) <= 1 for n in allowed[1:]), allowed
    assert all(limit.allow(v4("127.0.2.1"), now + 4 * SECOND + k) for k in range(100))


@pytest.mark.parametrize("path", LIMITS)
def test_burst_and_prefixes(path):
    table = RateTable(4096)
    limit = _query_limit(path, table, 10, burst=3)
    now = 5 * SECOND
    assert [limit.allow(v4("10.0.0.1"), now) for _ in range(5)] == [True] * 3 + [False] * 2
    assert limit.allow(v4("10.0.0.1"), now + SECOND // 10)  # one interval later: one more
    assert not limit.allow(v4("10.0.0.200"), now + SECOND // 10)  # the same /24
    assert limit.allow(v4("10.0.1.1"), now)  # another /24
    # IPv6: a /56 is one network, the next /56 another
    assert [limit.allow(v6("2001:db8:0:ff::1"), now) for _ in range(4)] == [True] * 3 + [False]
    assert not limit.allow(v6("2001:db8:0:ff:1::9"), now)
    assert limit.allow(v6("2001:db8:0:100::1"), now)
    # exempt addresses are never charged
    exempt = _query_limit(path, table, 1, exempt=(ipaddress.ip_network("10.9.9.9/32"),
                                                  ipaddress.ip_network("2001:db8:9::/48")))
    assert all(exempt.allow(v4("10.9.9.9"), now) for _ in range(50))
    assert all(exempt.allow(v6("2001:db8:9:1::5"), now) for _ in range(50))
    assert [exempt.allow(v4("10.9.9.8"), now) for _ in range(2)] == [True, False]


@pytest.mark.parametrize("path", LIMITS)
def test_rrl_limits_a_reflected_flood_and_slips_every_second(path):
    """BIND's RRL: 2,000 identical answers a second to one network at
    responses_per_second 5: the first 5 (a second's worth) go out, then every
    answer is limited while the flood goes on (its account is charged to the
    window's end), every second limited one slipped as TC with no records;
    another name, and another network, have accounts of their own."""
    rrl = _response_limit(path, RateTable(4096))
    reply = _reply("big.example.", txt=True)
    victim = v4("127.0.7.7")
    now = 50 * SECOND
    out = [rrl.check(reply, victim, now + n * SECOND // 2000) for n in range(10000)]  # 5 s
    sent = [r for r, kind in out if kind < 0]
    slipped = [r for r, kind in out if kind >= 0 and r is not None]
    dropped = [r for r, kind in out if r is None]
    assert sent == [reply] * 5
    assert (len(slipped), len(dropped)) == (9995 // 2, 9995 - 9995 // 2)
    tc = dns.message.from_wire(slipped[0])
    assert tc.flags & dns.flags.TC and not tc.answer and str(tc.question[0].name) == "big.example."
    assert all(kind == KINDS.index("responses") for _, kind in out[5:])
    assert len(slipped[0]) < len(reply) // 5
    assert rrl.check(_reply("other.example."), victim, now + 5 * SECOND)[1] == -1
    assert rrl.check(reply, v4("127.0.8.7"), now + 5 * SECOND)[1] == -1
    # window: the flood's account stays limited until its charges are past (15 s ahead of the last)
    assert rrl.check(reply, victim, now + 10 * SECOND)[1] >= 0
    assert rrl.check(reply, victim, now + 5 * SECOND + 15 * SECOND)[1] == -1


@pytest.mark.parametrize("path", LIMITS)
def test_rrl_accounts(path):
    """NXDOMAIN is accounted by zone (the SOA's owner), errors together, and
    a rate of 0 for a kind is no limit."""
    rrl = _response_limit(path, RateTable(4096), rates=(100, 2, 3))
    client, now = v4("192.0.2.1"), 7 * SECOND
    nx = [rrl.check(_reply(f"n{k}.zone.example.", 3, soa="zone.example."), client, now)[1] for k in range(4)]
    assert nx == [-1, -1, 1, 1]  # two names of one zone, one account
    assert rrl.check(_reply("n9.other.example.", 3, soa="other.example."), client, now)[1] == -1
    errors = [rrl.check(_reply(f"e{k}.example.", rcode), client, now)[1]
              for k, rcode in enumerate([2, 5, 1, 4, 2])]
    assert errors == [-1, -1, -1, 2, 2]
    unlimited = _response_limit(path, RateTable(4096), rates=(1, 0, 0))
    assert all(unlimited.check(_reply("x.example.", 2), client, now)[1] == -1 for _ in range(20))


def test_memory_is_bounded_whatever_the_sources():
    """A million distinct networks (/32s) in a second into a table of 4,096
    slots: it tracks at most 4,096, and its mapping does not grow. (Each of
    them is a new account, so each gets its first query through: a limit per
    network cannot stop a flood from more networks than it tracks; RRL and
    the other networks' limits still hold.)"""
    table = RateTable(4096)
    compiled = _compiled().QueryLimit(table, 10, 1, 32, 64, ())
    size = table.size
    now = 10 * SECOND
    first = 0
    for n in range(1_000_000):
        first += compiled.allow(v4(socket.inet_ntoa(struct.pack("!I", 0x7F000000 + n + 1))), now + n * 1000)
    assert first == 1_000_000
    assert table.size == size == ratelimit.HEAD + 4096 * 16
    assert 1000 < table.tracked(now + 1_000_000 * 1000) <= table.slots == 4096


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.integers(0, SECOND // 3)), max_size=120))
def test_compiled_query_limit_charges_as_the_reference(ops):
    """The same charges, in the same order, on two tables with one seed:
    the same answers and the same bytes in the table (8 slots: evictions)."""
    compiled = _compiled()
    a, b = RateTable(8, seed=12345), RateTable(8, seed=12345)
    python = QueryLimit(a, 7, 2, 24, 56, ())
    twin = compiled.QueryLimit(b, 7, 2, 24, 56, ())
    now = SECOND
    for network, host, step in ops:
        now += step
        addr = v4(f"10.{network}.0.{host}") if network % 5 else v6(f"2001:db8:{network}::{host}")
        assert python.allow(addr, now) == twin.allow(addr, now)
    event(f"{len(ops) // 40 * 40}+ charges")
    assert bytes(a._memory) == bytes(b._memory)


_BASE_REPLIES = [_reply("a.example."), _reply("b.example.", txt=True), _reply("n.zone.example.", 3, "zone.example."),
                 _reply("n.zone.example.", 3), _reply("x.example.", 2), _reply("Mixed.Example.", 3, "EXAMPLE.")]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(_BASE_REPLIES), mutations([0, 1, 3, 6, 63, 64, 0xC0, 0xC0 | 0x0C]), st.binary(max_size=24))
def test_compiled_account_and_hash_are_the_references(reply, changes, data):
    """ratelimit.account, network and hash64 and their C twins agree on
    mutated replies (compression loops, cut records, bad labels)."""
    compiled = _compiled()
    mutated, kinds = mutate(reply, changes)
    assert compiled.rate_hash(99, data) == ratelimit.hash64(99, data)
    if len(mutated) < 12:
        event("shorter than a header")
        return
    kind, detail = ratelimit.account(mutated)
    assert compiled.rate_account(mutated) == bytes((kind,)) + detail
    event(f"kind {KINDS[kind]}")
    for addr in (v4("198.51.100.77"), v6("2001:db8:aa:bbcc::1"), mutated[:16]):
        for prefixes in ((24, 56), (32, 64), (0, 0), (17, 33)):
            assert compiled.rate_network(addr, *prefixes) == ratelimit.network(addr, *prefixes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_BASE_REPLIES), st.integers(0, 2), st.integers(0, SECOND // 4)),
                max_size=80), st.integers(0, 3))
def test_compiled_rrl_is_the_reference(ops, slip):
    """Whole ResponseLimit.check: the same answer (as is, slipped, dropped),
    kind and table bytes for the same replies at the same times."""
    compiled = _compiled()
    a, b = RateTable(16, seed=777), RateTable(16, seed=777)
    python = _response_limit("python", a, rates=(3, 2, 1), slip=slip, window=2)
    twin = compiled.ResponseLimit(b, (3, 2, 1), slip, 2, 24, 56, ())
    now, limited = SECOND, 0
    for reply, network, step in ops:
        now += step
        addr = v4(f"10.0.{network}.1")
        expected = python.check(reply, addr, now)
        assert twin.check(reply, addr, now) == expected
        limited += expected[1] >= 0
    event("some limited" if limited else "none limited")
    assert bytes(a._memory) == bytes(b._memory)
    assert python.limited == twin.limited == limited


def test_truncated_keeps_only_the_question():
    reply = _reply("big.example.", txt=True)
    slip = dns.message.from_wire(ratelimit.truncated(reply))
    assert slip.flags & dns.flags.TC and slip.flags & dns.flags.QR
    assert (slip.answer, slip.authority, slip.additional) == ([], [], [])
    assert slip.id == dns.message.from_wire(reply).id and slip.rcode() == dns.rcode.NOERROR
    assert ratelimit.truncated(reply[:12] + b"\xff")[4:6] == b"\x00\x00"  # no question that parses: none
