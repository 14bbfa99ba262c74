"""The packet cache's rules (dnsrouter/cache.py), checked against dnspython."""
from __future__ import annotations

import time
import tracemalloc

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import assume, event, given, settings, strategies as st

from dnsrouter import cache, purges, wire
from dnsrouter.purges import PurgeLog
from support.mutations import mutate, mutations

FAST = settings(max_examples=300, deadline=None)

# -- strategies -----------------------------------------------------------------

# Few names, types and options, so that two drawn queries often ask the same.
_labels = st.sampled_from([b"www", b"WWW", b"wWw", b"mail", b"a", b"\xc3\xa9"])
_zones = st.sampled_from([[b"example", b"com"], [b"Example", b"COM"], [b"example", b"org"]])
_KEYRING = dns.tsigkeyring.from_text({"k.": "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="})
_cookies = st.one_of(st.none(), st.binary(min_size=8, max_size=8),
                     st.tuples(st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=32)))
_others = st.lists(st.builds(dns.edns.GenericOption, st.sampled_from([65001, 65002]),
                             st.sampled_from([b"", b"x"])), max_size=2)


@st.composite
def names(draw) -> dns.name.Name:
    return dns.name.Name(draw(st.lists(_labels, max_size=2)) + draw(_zones) + [b""])


def _cookie_option(cookie) -> dns.edns.GenericOption:
    data = cookie if isinstance(cookie, bytes) else cookie[0] + cookie[1]
    return dns.edns.GenericOption(cache.OPTION_COOKIE, data)


@st.composite
def queries(draw, name: dns.name.Name | None = None) -> dns.message.Message:
    """A query as clients send them: with EDNS (options, a cookie) or not;
    with RD, CD, AD or not."""
    qname = name if name is not None else draw(names())
    query = dns.message.make_query(qname, draw(st.sampled_from(["A", "TXT", "MX"])),
                                   draw(st.sampled_from(["IN", "CH"])), use_edns=False)
    query.id = draw(st.integers(0, 0xFFFF))
    query.flags = draw(st.sampled_from([0, dns.flags.RD])) | draw(st.sampled_from([0, dns.flags.CD, dns.flags.AD]))
    if draw(st.booleans()):
        options = draw(_others)
        cookie = draw(_cookies)
        if cookie is not None:
            options.insert(draw(st.integers(0, len(options))), _cookie_option(cookie))
        query.use_edns(draw(st.sampled_from([0, 1])), draw(st.sampled_from([0, dns.flags.DO])),
                       draw(st.sampled_from([512, 1232, 4096, 100])), options=options)
    return query


def _rrset(owner: dns.name.Name, ttl: int, rdtype: str) -> dns.rrset.RRset:
    text = {"A": "192.0.2.1", "TXT": '"' + "x" * 200 + '"', "NS": "ns.example.com.",
            "CNAME": "there.example.com.",
            "SOA": "ns.example.com. admin.example.com. 1 2 3 4 {}"}[rdtype]
    return dns.rrset.from_text(owner, ttl, "IN", rdtype, text.format(ttl // 2 + 1))


_ttls = st.one_of(st.integers(0, 86400), st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))


@st.composite
def replies(draw, query: dns.message.Message | None = None, cacheable: bool | None = None) -> dns.message.Message:
    """A backend's reply to ``query`` (or to a drawn one): any rcode, TC or
    not, records with any TTL in every section, SOAs in the authority
    section, a cookie with a server cookie, a BADVERS, a TSIG. ``cacheable``
    (drawn when None): one lifetime() takes, NOERROR or NXDOMAIN with an
    answer and an SOA, every TTL above 0."""
    if query is None:
        query = draw(queries())
    if cacheable is None:
        cacheable = draw(st.booleans())
    ttls = st.integers(1, 86400) if cacheable else _ttls
    reply = dns.message.make_response(query)
    reply.set_rcode(draw(st.sampled_from([dns.rcode.NOERROR] * 3 + [dns.rcode.NXDOMAIN] * 2
                                         + [dns.rcode.SERVFAIL, dns.rcode.REFUSED])))
    if draw(st.integers(0, 9)) == 0:
        reply.flags |= dns.flags.TC
    qname = query.question[0].name
    owners = st.one_of(st.just(qname), names())
    # One SOA at most: dnspython keeps the last of two SOAs with one owner
    # (a singleton type), where the cache takes the least of them.
    for section, types in ((reply.answer, ["A", "TXT", "CNAME"]),
                           (reply.authority, ["SOA", "SOA", "NS"]),
                           (reply.additional, ["A"])):
        for _ in range(draw(st.integers(0, 2))):
            rdtype = draw(st.sampled_from(types))
            if rdtype == "SOA" and any(rrset.rdtype == dns.rdatatype.SOA for rrset in section):
                rdtype = "NS"
            section.append(_rrset(draw(owners), draw(ttls), rdtype))
    if cacheable:
        reply.flags &= ~dns.flags.TC
        reply.set_rcode(draw(st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN])))
        reply.answer.append(_rrset(qname, draw(st.integers(1, 86400)), "A"))
        if not any(rrset.rdtype == dns.rdatatype.SOA for rrset in reply.authority):
            reply.authority.append(_rrset(qname.parent(), draw(st.integers(1, 86400)), "SOA"))
    if reply.edns >= 0:
        options = [option for option in reply.options if option.otype != cache.OPTION_COOKIE]
        if draw(st.booleans()):
            options.append(dns.edns.GenericOption(cache.OPTION_COOKIE, draw(st.binary(min_size=24, max_size=24))))
        reply.use_edns(0, reply.ednsflags, 1232, options=options)
        if not cacheable and draw(st.integers(0, 9)) == 0:
            reply.set_rcode(dns.rcode.BADVERS)
    if not cacheable and draw(st.integers(0, 9)) == 0:
        reply.use_tsig(_KEYRING, keyname="k.")
    return reply


def _wire(message: dns.message.Message) -> bytes:
    return message.to_wire(max_size=65535)


_mutations = mutations([0, 1, 6, 41, 63, 64, 192, 255])
_mutate = mutate


def _end(packet: bytes) -> int:
    return wire.parse_question(packet)[3]


def _by_dnspython(packet: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(packet, keyring=False)
    except Exception:  # any refusal: FormError, a bad rdata's ValueError...
        return None


# -- key ------------------------------------------------------------------------------


def _reference_key(message: dns.message.Message) -> tuple | None:
    """What the key must tell apart, read by dnspython; None: not cacheable."""
    if (message.flags & dns.flags.QR or message.opcode() != dns.opcode.QUERY or len(message.question) != 1
            or message.answer or message.authority or message.additional or message.had_tsig):
        return None
    cookies = [option for option in message.options if option.otype == cache.OPTION_COOKIE]
    if len(cookies) > 1 or (cookies and not (len(cookies[0].to_wire()) == 8 or 16 <= len(cookies[0].to_wire()) <= 40)):
        return None
    question = message.question[0]
    edns = None
    if message.edns >= 0:
        edns = (message.edns, message.ednsflags,
                tuple((option.otype, option.to_wire()) for option in message.options
                      if option.otype != cache.OPTION_COOKIE))
    return (question.name.canonicalize(), question.rdtype, question.rdclass,
            message.flags & (dns.flags.RD | dns.flags.CD | dns.flags.AD), edns)


@FAST
@given(queries(), queries())
def test_key_tells_apart_what_dnspython_does(first, second):
    one, two = _wire(first), _wire(second)
    same = _reference_key(first) == _reference_key(second)
    event(f"same key: {same}")
    assert (cache.key(one, _end(one)) == cache.key(two, _end(two))) == same
    assert cache.key(one, _end(one)) is not None


@FAST
@given(queries(), st.integers(0, 0xFFFF), st.sampled_from([512, 1232, 65535]), _cookies)
def test_key_ignores_id_case_payload_and_cookie(query, qid, payload, cookie):
    packet = _wire(query)
    other = dns.message.from_wire(packet)
    other.id = qid
    other.question[0].name = dns.name.from_text(query.question[0].name.to_text().swapcase())
    if query.edns >= 0:
        options = [option for option in query.options if option.otype != cache.OPTION_COOKIE]
        if cookie is not None:
            options.append(_cookie_option(cookie))
        other.use_edns(query.edns, query.ednsflags, payload, options=options)
    changed = _wire(other)
    event(f"edns: {query.edns >= 0}")
    assert cache.key(changed, _end(changed)) == cache.key(packet, _end(packet))


def _query(edns: int | bool = False, **more) -> bytes:
    """www.example.com A; ``edns``: the EDNS version, and ``more`` make_query's EDNS arguments."""
    query = dns.message.make_query("www.example.com.", "A", use_edns=edns, **more)
    query.id = 7
    return _wire(query)


@pytest.mark.parametrize("change", [
    lambda q: q.replace(b"www", b"ww2"),
    lambda q: q.replace(b"\x00\x01\x00\x01", b"\x00\x10\x00\x01", 1),  # type TXT
    lambda q: q[:2] + bytes((q[2] ^ 0x01,)) + q[3:],  # RD
    lambda q: q[:3] + bytes((q[3] ^ 0x10,)) + q[4:],  # CD
])
def test_key_tells_apart_the_question_and_flags(change):
    query = _query()
    changed = change(query)
    assert cache.key(changed, _end(changed)) not in (None, cache.key(query, _end(query)))


def test_key_tells_apart_edns_presence_version_do_and_options():
    keys = [cache.key(query, _end(query)) for query in (
        _query(), _query(edns=0), _query(edns=1), _query(edns=0, ednsflags=dns.flags.DO),
        _query(edns=0, options=[dns.edns.GenericOption(65001, b"a")]),
        _query(edns=0, options=[dns.edns.GenericOption(65001, b"a"), dns.edns.GenericOption(65002, b"")]),
        _query(edns=0, options=[dns.edns.GenericOption(65002, b""), dns.edns.GenericOption(65001, b"a")]),
    )]
    assert None not in keys and len(set(keys)) == len(keys)


def _signed() -> bytes:
    query = dns.message.make_query("www.example.com.", "A")
    query.use_tsig(_KEYRING, keyname="k.")
    return _wire(query)


def _cookie_query(data: bytes) -> bytes:
    return _query(edns=0, options=[dns.edns.GenericOption(cache.OPTION_COOKIE, data)])


@pytest.mark.parametrize("packet, why", [
    (_signed(), "TSIG"),
    (_query()[:5] + b"\x02" + _query()[6:] + _query()[12:], "two questions"),
    (_query()[:7] + b"\x01" + _query()[8:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x01\x00\x04\x01\x02\x03\x04",
     "an answer record"),
    (_query()[:11] + b"\x01" + _query()[12:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x01\x00\x04\x01\x02\x03\x04",
     "an additional record that is no OPT"),
    (_query() + b"\x00", "a byte after the question"),
    (_query(edns=0) + b"\x00", "a byte after the OPT"),
    (_cookie_query(b"1234567"), "a client cookie of 7 bytes"),
    (_cookie_query(b"12345678" + b"x" * 7), "a server cookie of 7 bytes"),
    (_query(edns=0, options=[dns.edns.GenericOption(cache.OPTION_COOKIE, b"12345678")] * 2), "two cookies"),
    (_query()[:2] + b"\x81" + _query()[3:], "QR"),
    (_query()[:2] + b"\x21" + _query()[3:], "opcode NOTIFY"),
    (_wire(dns.message.make_query("example.com.", "AXFR", use_edns=False)), "AXFR"),
])
def test_key_refuses(packet, why):
    assert cache.key(packet, _end(packet)) is None, why


@FAST
@given(queries(), _mutations)
def test_key_of_a_mutated_query(query, mutations):
    packet, kinds = _mutate(_wire(query), mutations)
    event(f"mutations: {'+'.join(kinds) or 'none'}")
    try:
        end = _end(packet)
    except Exception:
        end = 0
    assume(end)
    result = cache.key(packet, end)
    message = _by_dnspython(packet)
    event(f"cacheable: {result is not None}")
    if result is not None:
        assert message is not None and _reference_key(message) is not None
    elif message is not None and _reference_key(message) is not None:
        # dnspython reads it as a plain query: only a zone transfer is not cached.
        assert message.question[0].rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR)


# -- lifetime ---------------------------------------------------------------------------


def _reference_lifetime(packet: bytes, max_ttl: float, max_negative_ttl: float) -> float | None:
    """lifetime(), as dnspython reads the reply."""
    message = _by_dnspython(packet)
    if (message is None or not message.flags & dns.flags.QR or message.flags & dns.flags.TC
            or message.opcode() != dns.opcode.QUERY or len(message.question) != 1 or message.had_tsig
            or message.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
            or any(rrset.rdtype == dns.rdatatype.SIG for rrset in message.additional)):
        return None
    ttls = [0 if rrset.ttl > 0x7FFFFFFF else rrset.ttl
            for section in (message.answer, message.authority, message.additional) for rrset in section]
    least = min(ttls, default=0x7FFFFFFF)
    if message.rcode() == dns.rcode.NXDOMAIN or not message.answer:
        soas = [rrset for rrset in message.authority if rrset.rdtype == dns.rdatatype.SOA]
        if not soas:
            return None
        value = min([least, max_negative_ttl] + [min(rdata.minimum for rdata in rrset) for rrset in soas])
    else:
        value = min(least, max_ttl)
    return float(value) if value > 0 else None


@FAST
@given(replies(), st.sampled_from([3600, 60, 0]), st.sampled_from([300, 5]))
def test_lifetime_is_dnspythons(reply, max_ttl, max_negative_ttl):
    packet = _wire(reply)
    expected = _reference_lifetime(packet, max_ttl, max_negative_ttl)
    event(f"rcode {dns.rcode.to_text(reply.rcode())}, cached: {expected is not None}")
    assert cache.lifetime(packet, max_ttl, max_negative_ttl) == expected


@settings(max_examples=600, deadline=None)
@given(replies(), _mutations)
def test_lifetime_of_a_mutated_reply(reply, mutations):
    packet, kinds = _mutate(_wire(reply), mutations)
    event(f"mutations: {'+'.join(kinds) or 'none'}")
    result = cache.lifetime(packet, 3600, 300)
    expected = _reference_lifetime(packet, 3600, 300)
    event(f"cached: {result is not None}")
    if result is not None and _by_dnspython(packet) is None:
        # The walker reads names, lengths and the SOA; a record whose
        # other data dnspython refuses is the backend's to send.
        event("cached, dnspython refuses the rdata")
        return
    assert result == expected


def _reply(rcode=dns.rcode.NOERROR, answer=(), authority=(), additional=(), edns=False) -> bytes:
    query = dns.message.make_query("www.example.com.", "A", use_edns=edns)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    reply.answer.extend(answer)
    reply.authority.extend(authority)
    reply.additional.extend(additional)
    return _wire(reply)


_NAME = dns.name.from_text("www.example.com.")
_ZONE = dns.name.from_text("example.com.")


def test_lifetime_examples():
    a_300 = _rrset(_NAME, 300, "A")
    soa = dns.rrset.from_text(_ZONE, 900, "IN", "SOA", "ns.example.com. admin.example.com. 1 2 3 4 60")
    assert cache.lifetime(_reply(answer=[a_300], edns=True), 3600, 300) == 300.0
    assert cache.lifetime(_reply(answer=[a_300]), 100, 300) == 100.0
    assert cache.lifetime(_reply(dns.rcode.NXDOMAIN, authority=[soa]), 3600, 300) == 60.0
    assert cache.lifetime(_reply(authority=[soa]), 3600, 30) == 30.0  # NODATA
    assert cache.lifetime(_reply(dns.rcode.NXDOMAIN), 3600, 300) is None  # no SOA
    assert cache.lifetime(_reply(authority=[_rrset(_ZONE, 300, "NS")]), 3600, 300) is None  # a referral
    assert cache.lifetime(_reply(dns.rcode.SERVFAIL, answer=[a_300]), 3600, 300) is None
    assert cache.lifetime(_reply(answer=[_rrset(_NAME, 0, "A")]), 3600, 300) is None
    truncated = bytearray(_reply(answer=[a_300]))
    truncated[2] |= 0x02
    assert cache.lifetime(bytes(truncated), 3600, 300) is None
    assert cache.lifetime(b"\x00" * 11, 3600, 300) is None


# -- answer ---------------------------------------------------------------------------


def _options(message: dns.message.Message) -> list[tuple[int, bytes]]:
    """The EDNS options as (code, data): dnspython reads a COOKIE as a CookieOption."""
    return [(option.otype, option.to_wire()) for option in message.options]


def _client(query: dns.message.Message, qid: int, swap: list[bool], cookie, payload: int) -> bytes:
    """The query as another client asks it: its ID, its spelling, its
    cookie (or none) and buffer size."""
    client = dns.message.from_wire(_wire(query))
    client.id = qid
    labels = [bytes(c ^ 0x20 if flip and chr(c).isascii() and chr(c).isalpha() else c for c in label)
              for label, flip in zip(query.question[0].name.labels, swap + [False] * 8)]
    client.question[0].name = dns.name.Name(labels)
    if query.edns >= 0:
        options = [option for option in query.options if option.otype != cache.OPTION_COOKIE]
        if cookie is not None:
            options.append(_cookie_option(cookie))
        client.use_edns(query.edns, query.ednsflags, payload, options=options)
    return _wire(client)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_cached_reply_is_the_backends_but_for_the_id_and_the_questions_case(data):
    backend_query = data.draw(queries())
    reply = data.draw(replies(backend_query, cacheable=True))
    backend = _wire(reply)
    assert cache.lifetime(backend, 3600, 300) is not None
    client = _client(backend_query, data.draw(st.integers(0, 0xFFFF)), data.draw(st.lists(st.booleans())),
                     data.draw(_cookies), data.draw(st.sampled_from([512, 1232, 4096, 100])))
    end = _end(client)
    assert cache.key(client, end) == cache.key(_wire(backend_query), _end(_wire(backend_query)))
    result = cache.answer(backend, client, end)
    sent = dns.message.from_wire(client)
    expected = dns.message.from_wire(backend)
    others = [option for option in _options(expected) if option[0] != cache.OPTION_COOKIE]
    cookies = [option[1] for option in _options(sent) if option[0] == cache.OPTION_COOKIE]
    taken = sum(4 + len(data) for code, data in _options(expected) if code == cache.OPTION_COOKIE)
    backend_cookie = taken > 0  # the backend does cookies: the client gets its own back, else none
    length = len(backend) - taken + (4 + 8 if cookies and backend_cookie else 0)
    fits = max(sent.payload, 512) if sent.edns >= 0 else 512
    if result is None:
        event("does not fit")
        assert length > fits
        return
    assert len(result) == length <= fits
    assert cache.answer(cache.storable(backend), client, end) == result  # as the cache keeps it
    assert result[:2] == client[:2] and result[12:end] == client[12:end]
    assert result[2:12] == backend[2:12]
    got = dns.message.from_wire(result)
    assert got.sections == expected.sections and got.flags == expected.flags and got.edns == expected.edns
    if expected.edns >= 0:
        event(f"client cookie: {bool(cookies)}, backend cookie: {backend_cookie}")
        assert _options(got) == others + [(cache.OPTION_COOKIE, cookie[:8]) for cookie in cookies
                                          if backend_cookie]
        if not cookies and len(others) == len(expected.options):
            assert result[end:] == backend[end:]  # byte for byte
    else:
        event("no EDNS")
        assert result[end:] == backend[end:]


def test_answer_gives_each_client_its_own_cookie():
    first = _cookie_query(b"AAAAAAAA" + b"s" * 16)
    backend = dns.message.make_response(dns.message.from_wire(first))
    backend.use_edns(0, 0, 1232, options=[dns.edns.GenericOption(cache.OPTION_COOKIE, b"AAAAAAAA" + b"s" * 16)])
    backend.answer.append(_rrset(_NAME, 300, "A"))
    cached = _wire(backend)
    assert b"s" * 16 in cached
    second = _cookie_query(b"BBBBBBBB")
    answered = cache.answer(cached, second, _end(second))
    assert b"BBBBBBBB" in answered and b"AAAAAAAA" not in answered and b"s" * 16 not in answered
    without = _query(edns=0)
    answered = cache.answer(cached, without, _end(without))
    assert not dns.message.from_wire(answered).options
    stored = cache.storable(cached)
    assert b"s" * 16 not in stored and b"AAAAAAAA" not in stored and stored.endswith(cache.COOKIE_MARK)
    assert cache.answer(stored, second, _end(second)) == cache.answer(cached, second, _end(second))
    # A backend that does not do cookies sent none: a client that sent one gets none from the cache either.
    plain = dns.message.make_response(dns.message.from_wire(first))
    plain.use_edns(0, 0, 1232)
    plain.answer.append(_rrset(_NAME, 300, "A"))
    assert not dns.message.from_wire(cache.answer(_wire(plain), second, _end(second))).options


def test_answer_is_none_when_it_does_not_fit():
    big = _reply(answer=[_rrset(_NAME, 300, "TXT")] * 1 + [dns.rrset.from_text(
        _NAME, 300, "IN", "TXT", *[f'"{"y" * 100}{n}"' for n in range(4)])], edns=True)
    assert len(big) > 512
    small, large = _query(), _query(edns=0, payload=4096)
    assert cache.answer(big, small, _end(small)) is None
    assert cache.answer(big, large, _end(large)) is not None


def test_answer_refuses_another_question():
    cached = _reply(answer=[_rrset(_NAME, 300, "A")])
    other = _wire(dns.message.make_query("ww2.example.com.", "A", use_edns=False))
    assert cache.answer(cached, other, _end(other)) is None


# -- Cache --------------------------------------------------------------------------


def _key(name: str, rdtype: str = "A") -> bytes:
    packet = _wire(dns.message.make_query(name, rdtype, use_edns=False))
    return cache.key(packet, _end(packet))


def test_get_put_expiry_and_counters():
    store = cache.Cache(10, 1 << 20)
    assert store.get(_key("a.example."), 0) is None
    assert store.put(_key("a.example."), b"reply", 0, 10)
    assert store.get(_key("a.example."), 9.9) == b"reply"
    assert store.get(_key("a.example."), 10) is None
    assert (store.expired, store.entries, store.bytes) == (1, 0, 0)
    store.put(_key("a.example."), b"one", 0, 10)
    store.put(_key("a.example."), b"two", 0, 10)
    assert store.get(_key("a.example."), 1) == b"two" and store.entries == 1
    assert store.bytes == len(_key("a.example.")) + 3 + cache.ENTRY_OVERHEAD


def test_clock_gives_a_hit_entry_a_second_chance():
    store = cache.Cache(3, 1 << 20)
    for name in ("a.", "b.", "c."):
        store.put(_key(name), name.encode(), 0, 100)
    store.get(_key("a."), 1)
    store.put(_key("d."), b"d", 1, 100)
    assert store.get(_key("a."), 1) == b"a." and store.get(_key("b."), 1) is None
    assert store.evictions == 1 and store.entries == 3


def test_the_byte_limit_evicts():
    reply = b"x" * 1000
    cost = len(_key("a.")) + len(reply) + cache.ENTRY_OVERHEAD
    store = cache.Cache(100, 3 * cost)
    for name in ("a.", "b.", "c.", "d."):
        assert store.put(_key(name), reply, 0, 100)
    assert store.entries == 3 and store.bytes == 3 * cost and store.evictions == 1
    assert not store.put(_key("e."), b"x" * (3 * cost), 0, 100)
    assert not cache.Cache(0, 1 << 20).put(_key("a."), reply, 0, 100)  # size 0: off


def test_purge_a_name_and_a_subtree():
    store = cache.Cache(100, 1 << 20)
    names = ["example.com.", "www.example.com.", "a.b.example.com.", "notexample.com.", "com."]
    for name in names:
        store.put(_key(name), b"r", 0, 100)
        store.put(_key(name, "TXT"), b"r", 0, 100)
    zone = dns.name.from_text("Example.COM.").canonicalize().to_wire()
    assert store.purge(dns.name.from_text("www.example.com.").to_wire(), subtree=False) == 2
    assert store.purge(zone, subtree=True, cause="notify") == 4
    assert sorted({cache.key_name(k) for k in store._slots}) == sorted(
        dns.name.from_text(n).to_wire() for n in ("notexample.com.", "com."))
    assert store.purge_all() == 4 and store.entries == 0 and store.bytes == 0
    assert store.purges == {"purge": 1, "notify": 1, "routes": 1}
    assert store.purged == {"purge": 2, "notify": 4, "routes": 4}
    store.put(_key("a."), b"r", 0, 100)
    assert store.get(_key("a."), 1) == b"r"
    assert store.purge(b"\x00", subtree=False) == 0 and store.purge(b"\x00", subtree=True) == 1  # the root's subtree: all


_ops = st.lists(st.tuples(st.sampled_from(["put", "get", "get", "purge"]), st.integers(0, 7),
                          st.integers(0, 300), st.integers(1, 30)), max_size=80)


@FAST
@given(st.integers(1, 6), st.integers(200, 1500), _ops)
def test_cache_against_a_model(size, max_bytes, ops):
    """Whatever is found is the last reply put under that key, alive; the
    bounds hold; the counted bytes are the entries'."""
    store = cache.Cache(size, max_bytes)
    model: dict[bytes, tuple[bytes, float]] = {}
    now = 0.0
    for op, index, length, ttl in ops:
        now += 1
        name_key = _key(f"n{index}.example.")
        if op == "put":
            reply = bytes([index]) * length
            if store.put(name_key, reply, now, ttl):
                model[name_key] = (reply, now + ttl)
            else:
                model.pop(name_key, None)
        elif op == "get":
            found = store.get(name_key, now)
            event(f"hit: {found is not None}")
            if found is not None:
                assert model[name_key][0] == found and now < model[name_key][1]
        else:
            store.purge(cache.key_name(name_key), subtree=False)
            model.pop(name_key, None)
        assert store.entries <= size and store.bytes <= max_bytes
        assert store.bytes == sum(len(k) + len(store._replies[s]) + cache.ENTRY_OVERHEAD
                                  for k, s in store._slots.items())
    event(f"evictions: {min(store.evictions, 3)}")


def test_bytes_per_entry():
    """The memory an entry takes, measured: a typical key (a 22-byte name
    with EDNS) and a 120-byte reply. ENTRY_OVERHEAD must stay close to what
    a Python entry costs beyond its key's and reply's bytes."""
    count = 20000
    store = cache.Cache(count, 1 << 30)
    template = _wire(dns.message.make_query("host000000.example.com.", "A", want_dnssec=True))
    packets = [template.replace(b"host000000", b"host%06d" % n) for n in range(count)]
    keys = [cache.key(packet, _end(packet)) for packet in packets]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(count):
        # Copies made here, so that the key's and reply's objects are measured too.
        store.put(keys[n][:-1] + keys[n][-1:], bytes([n & 0xFF]) * 120, 0, 100)
    measured = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    payload = len(keys[0]) + 120
    counted = store.bytes / count
    print(f"\nbytes per entry: {measured:.0f} measured ({payload} key and reply, "
          f"{measured - payload:.0f} beyond), {counted:.0f} counted")
    assert abs(measured - counted) / counted < 0.25


# -- PacketCache and the purge log --------------------------------------------------


def _packet_cache(purges: PurgeLog | None = None) -> cache.PacketCache:
    return cache.PacketCache(100, 1 << 20, 3600, 300, purges)


def _asked(name: str, qid: int = 7) -> bytes:
    query = dns.message.make_query(name, "A", use_edns=False)
    query.id = qid
    return _wire(query)


def _answered(name: str, ttl: int = 300) -> bytes:
    reply = dns.message.make_response(dns.message.from_wire(_asked(name)))
    reply.answer.append(_rrset(dns.name.from_text(name), ttl, "A"))
    return _wire(reply)


def test_packet_cache_answers_each_client_with_its_id_and_spelling():
    store = _packet_cache()
    query = _asked("www.example.com.")
    assert store.lookup(query, _end(query), False, 0) is None
    assert store.insert(query, _end(query), _answered("www.example.com."), 0, 0)
    other = _asked("WwW.ExAmple.com.", qid=99)
    got = store.lookup(other, _end(other), False, 1)
    assert got is not None and got[:2] == other[:2] and got[12:_end(other)] == other[12:_end(other)]
    assert store.lookup(other, _end(other), False, 300) is None  # the TTL is its lifetime
    assert (store.hits, store.misses) == (1, 2)
    assert store.snapshot() == {("cache_lookups", "hit"): 1, ("cache_lookups", "miss"): 2,
                                ("cache_evictions", "expired"): 1}


def test_packet_cache_takes_purges_from_the_log_and_refuses_replies_asked_before_them():
    log = PurgeLog()
    store = _packet_cache(log)
    names = ["www.example.com.", "a.b.example.com.", "example.com.", "www.example.org."]
    for name in names:
        assert store.insert(_asked(name), _end(_asked(name)), _answered(name), 0, 0)
    sent = time.monotonic()
    log.append(dns.name.from_text("b.example.com.").to_wire(), True, "ctl")  # at or below b.example.com.
    log.append(dns.name.from_text("example.com.").to_wire(), False, "notify")  # that name only
    present = [name for name in names if store.lookup(_asked(name), _end(_asked(name)), False, 1)]
    assert present == ["www.example.com.", "www.example.org."]
    assert store.snapshot()["cache_purged", "ctl"] == 1 and store.snapshot()["cache_purged", "notify"] == 1
    # A reply to a query sent before the purge may be the old zone's.
    name = "a.b.example.com."
    assert not store.insert(_asked(name), _end(_asked(name)), _answered(name), 2, sent - 1)
    assert store.insert(_asked(name), _end(_asked(name)), _answered(name), 2, time.monotonic())


def test_a_cache_that_missed_purges_forgets_everything():
    log = PurgeLog()
    store = _packet_cache(log)
    query = _asked("www.example.org.")
    store.insert(query, _end(query), _answered("www.example.org."), 0, 0)
    for _ in range(purges.CAPACITY + 1):
        log.append(dns.name.from_text("example.com.").to_wire(), True, "notify")
    assert store.lookup(query, _end(query), False, 1) is None
    assert store.snapshot()["cache_purges", "behind"] == 1 and store.entries == 0


def test_purge_log_reads_what_was_written_in_order():
    log = PurgeLog()
    assert log.since(0) == (0, [])
    for n in range(3):
        assert log.append(bytes([1, 97 + n, 0]), n % 2 == 1, purges.CAUSES[n]) == n + 1
    seq, items = log.since(1)
    assert seq == 3 and [(p.name, p.subtree, p.cause) for p in items] == [(b"\x01b\x00", True, "ctl"),
                                                                           (b"\x01c\x00", False, "routes")]
    with pytest.raises(ValueError):
        log.append(b"", False, "ctl")


def test_a_route_change_purges_all():
    store = _packet_cache()
    query = _asked("www.example.com.")
    store.insert(query, _end(query), _answered("www.example.com."), 0, 0)
    sent = time.monotonic()
    assert store.purge_all("routes") == 1 and store.entries == 0
    assert not store.insert(query, _end(query), _answered("www.example.com."), 0, sent - 1)
