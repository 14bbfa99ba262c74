"""The packet-path wire helpers, checked against dnspython."""
from __future__ import annotations

import struct

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import pytest
from hypothesis import assume, event, given, settings, strategies as st

from dnsrouter import wire
from dnsrouter.errors import WireError
from support.mutations import mutate, mutations

FAST = settings(max_examples=300, deadline=None)

# -- strategies -----------------------------------------------------------------

_SPECIAL = b'.\\ "()@$;\x00\x01\x7f\x80\xff\tAZaz09-_*'
_label = st.one_of(
    st.binary(min_size=1, max_size=63),
    st.lists(st.sampled_from(list(_SPECIAL)), min_size=1, max_size=63).map(bytes),
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
            min_size=1, max_size=20).map(str.encode),
)


@st.composite
def names(draw) -> dns.name.Name:
    labels = draw(st.lists(_label, max_size=8))
    assume(sum(len(label) + 1 for label in labels) + 1 <= 255)
    return dns.name.Name(labels + [b""])


_rdtypes = st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.TXT,
                            dns.rdatatype.ANY, dns.rdatatype.AXFR, 65280, 0])
_rdclasses = st.sampled_from([dns.rdataclass.IN, dns.rdataclass.CH, dns.rdataclass.ANY])


_KEYRING = dns.tsigkeyring.from_text({"k.": "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="})
_options = st.lists(st.builds(dns.edns.GenericOption, st.sampled_from([65001, 65002]), st.binary(max_size=16)),
                    max_size=2)


@st.composite
def _rrsets(draw, qname: dns.name.Name) -> dns.rrset.RRset:
    owner = draw(st.one_of(st.just(qname), names()))  # the question's name: compressed to a pointer
    rdtype, text = draw(st.sampled_from([("A", "192.0.2.1"), ("TXT", '"x"'), ("NS", "ns.example.com.")]))
    return dns.rrset.from_text(owner, draw(st.integers(0, 86400)), "IN", rdtype, text)


@st.composite
def messages(draw) -> dns.message.Message:
    """A query, or a reply with records in each section; with EDNS (and
    options) or not, signed with a TSIG or not."""
    qname = draw(names())
    message = dns.message.make_query(qname, draw(_rdtypes), draw(_rdclasses), use_edns=False)
    message.id = draw(st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        message.use_edns(0, draw(st.integers(0, 1)) * dns.flags.DO, draw(st.integers(512, 65535)),
                         options=draw(_options))
    if draw(st.booleans()):
        message = dns.message.make_response(message)  # keeps the query's EDNS
        for section in message.sections[1:]:
            section.extend(draw(st.lists(_rrsets(qname), max_size=2)))
    if draw(st.booleans()):
        message.use_tsig(_KEYRING, keyname="k.")
    return message


# at (after the header), a value that is a label length's edge or type
_mutations = mutations([0, 1, 63, 64, 127, 191, 192, 255])


@st.composite
def mutated(draw) -> tuple[bytes, list[str]]:
    """(the wire form of messages(), changed by up to two mutations; what they were)."""
    return mutate(draw(messages()).to_wire(), draw(_mutations), set_after_header=True)


def _question_by_dnspython(packet: bytes) -> tuple[bytes, int, int, int] | None:
    """parse_question() as dnspython reads the question at 12, or None where
    the router refuses it: dnspython cannot read the name, it is compressed
    (a query's first name has nothing before it to point to), or the type
    and class are cut off."""
    try:
        name, used = dns.name.from_wire(packet, 12)
    except dns.exception.DNSException:
        return None
    raw = packet[12:12 + used]
    if raw != name.to_wire() or 12 + used + 4 > len(packet):
        return None
    qtype, qclass = struct.unpack_from("!HH", packet, 12 + used)
    return raw, qtype, qclass, 12 + used + 4


def _by_dnspython(packet: bytes) -> dns.message.Message | None:
    """The message as dnspython reads it (TSIG not verified), None if it cannot."""
    try:
        return dns.message.from_wire(packet, keyring=False)
    except Exception:  # any refusal: FormError, a bad rdata's ValueError...
        return None


def _header(qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def _question(name=b"\x03www\x07example\x03com\x00", qtype=1, qclass=1) -> bytes:
    return name + struct.pack("!HH", qtype, qclass)


# -- parse_question ---------------------------------------------------------------

@FAST
@given(mutated())
def test_parse_question_agrees_with_dnspython(case):
    packet, mutations = case
    for kind in mutations or ["none"]:
        event(f"mutation: {kind}")
    expected = _question_by_dnspython(packet)
    event("dnspython reads the question" if expected else "dnspython refuses the question")
    if expected is None:
        with pytest.raises(WireError):
            wire.parse_question(packet)
    else:
        assert wire.parse_question(packet) == expected
        lowered = expected[0].lower()
        assert wire.name_to_text(lowered) == dns.name.from_wire(lowered, 0)[0].to_text()


@FAST
@given(names(), _rdtypes, _rdclasses, st.integers(0, 0xFFFF))
def test_parse_question_round_trips_dnspython_query(name, rdtype, rdclass, qid):
    query = dns.message.make_query(name, rdtype, rdclass)
    query.id = qid
    packet = query.to_wire()
    qname, qtype, qclass, end = wire.parse_question(packet)
    assert qname == name.to_wire()
    assert (qtype, qclass) == (rdtype, rdclass)
    assert end == len(packet)


@FAST
@given(names())
def test_name_to_text_matches_dnspython(name):
    lowered = name.to_wire().lower()
    text = wire.name_to_text(lowered)
    assert text == name.canonicalize().to_text()
    assert text == name.to_text().lower()
    assert text == dns.name.from_wire(lowered, 0)[0].to_text()


@pytest.mark.parametrize("wire_name, text", [
    (b"\x00", "."),
    (b"\x03www\x07example\x03com\x00", "www.example.com."),
    (b"\x03a.b\x03com\x00", r"a\.b.com."),
    (b"\x03a b\x00", r"a\032b."),
    (b"\x02\\x\x00", r"\\x."),
    (b"\x01\xff\x00", r"\255."),
    (b"\x01@\x00", r"\@."),
    (b"\x01*\x03com\x00", "*.com."),
])
def test_name_to_text_examples(wire_name, text):
    assert wire.name_to_text(wire_name) == text


@pytest.mark.parametrize("packet, why", [
    (b"", "empty"),
    (_header()[:11], "short header"),
    (_header(), "no question"),
    (_header() + b"\x03www\x07exam", "name runs past the end"),
    (_header() + b"\x03www\x07example\x03com\x00\x00\x01\x00", "qclass cut"),
    (_header() + b"\xc0\x0c\x00\x01\x00\x01", "compression pointer"),
    (_header() + b"\x40abc\x00\x00\x01\x00\x01", "label type 01"),
    (_header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
     + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01", "name of 257 bytes"),
    (_header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
     + b"\x3e" + b"a" * 62 + b"\x00\x00\x01\x00\x01", "name of 256 bytes"),
    # A pointer whose target offset, read as a length, would land on a zero.
    (_header() + b"\xc0\x0c" + b"\x00" * 300, "compression pointer, long packet"),
    (_header() + b"\x80\x0c" + b"\x00" * 300, "label type 10, long packet"),
])
def test_parse_question_rejects(packet, why):
    with pytest.raises(WireError):
        wire.parse_question(packet)


def test_parse_question_longest_name():
    name = b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3d" + b"d" * 61 + b"\x00"
    assert len(name) == 255
    qname, qtype, qclass, end = wire.parse_question(_header() + _question(name, 28, 1))
    assert (qname, qtype, qclass, end) == (name, 28, 1, 12 + 255 + 4)


# -- find_opt / has_opt ---------------------------------------------------------------

@FAST
@given(mutated())
def test_find_opt_agrees_with_dnspython(case):
    packet, mutations = case
    assume(len(packet) >= 12)  # shorter packets are dropped before find_opt is asked
    for kind in mutations or ["none"]:
        event(f"mutation: {kind}")
    message = _by_dnspython(packet)
    try:
        found: tuple[int, int] | None | str = wire.find_opt(packet)
    except WireError:
        found = "malformed"
    if message is not None:
        event(f"dnspython reads it, {'with' if message.edns >= 0 else 'without'} EDNS")
        assert found != "malformed", "find_opt refused a message dnspython reads"
        assert (found is not None) == (message.edns >= 0)
        question = _question_by_dnspython(packet)
        if len(message.question) == 1 and question is not None:
            assert wire.has_opt(packet, question[3]) == (message.edns >= 0)
    else:
        event(f"dnspython refuses it; find_opt: {'no OPT' if found is None else found if found == 'malformed' else 'an OPT'}")
    if isinstance(found, tuple):
        # What find_opt found is an OPT record, whole, in the packet...
        start, end = found
        after_name = wire.skip_name(packet, start)
        assert packet[after_name:after_name + 2] == b"\x00\x29"
        assert end == after_name + 10 + int.from_bytes(packet[after_name + 8:after_name + 10], "big")
        assert end <= len(packet)
    if isinstance(found, tuple) and message is not None:
        # ...and in a message dnspython reads, its OPT: cut out, all else is kept.
        rest = dns.message.from_wire(wire.without_opt(packet), keyring=False)
        assert rest.edns == -1
        assert (rest.id, rest.flags, rest.sections, rest.keyname) == \
            (message.id, message.flags, message.sections, message.keyname)


@pytest.mark.parametrize("packet", [b"", b"\x00" * 11])
def test_has_opt_short_packet_is_false(packet):
    assert wire.has_opt(packet, 12) is False


def test_find_opt_short_packet_raises():
    # Documented behaviour: below 12 bytes find_opt raises struct.error (from
    # the header unpack), not WireError. Callers only pass >= 12 bytes, and
    # has_opt catches both.
    with pytest.raises((struct.error, WireError)):
        wire.find_opt(b"\x00" * 11)


def test_find_opt_and_has_opt_on_dnspython_messages():
    plain = dns.message.make_query("www.example.com.", "A").to_wire()
    assert wire.find_opt(plain) is None
    _, _, _, end = wire.parse_question(plain)
    assert wire.has_opt(plain, end) is False
    edns = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=4096).to_wire()
    _, _, _, end = wire.parse_question(edns)
    assert wire.find_opt(edns) == (end, len(edns))
    assert wire.find_opt(edns, end) == (end, len(edns))
    assert wire.has_opt(edns, end) is True
    # A malformed tail counts as no EDNS.
    broken = edns[:-3]
    assert wire.has_opt(broken, end) is False


def test_find_opt_skips_compressed_answer_records():
    query = dns.message.make_query("www.example.com.", "A", use_edns=0)
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"))
    reply.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "NS", "ns.example.com."))
    reply.additional.append(dns.rrset.from_text("ns.example.com.", 60, "IN", "A", "192.0.2.53"))
    packet = reply.to_wire()
    start, end = wire.find_opt(packet)
    assert packet[start:start + 3] == b"\x00\x00\x29"
    assert end == start + 11


# -- make_answer -------------------------------------------------------------------

def _answer(query: dns.message.Message, rcode: int, edns: bool, question=True) -> dns.message.Message:
    packet = query.to_wire()
    q = None
    if question:
        name, qtype, qclass, _ = wire.parse_question(packet)
        q = (name, qtype, qclass)
    return dns.message.from_wire(wire.make_answer(packet, rcode, q, edns))


@pytest.mark.parametrize("rd", [True, False])
@pytest.mark.parametrize("edns", [True, False])
def test_make_answer_echoes(rd, edns):
    query = dns.message.make_query("WWW.Example.com.", "AAAA", use_edns=0 if edns else False)
    query.id = 0xBEEF
    if not rd:
        query.flags &= ~dns.flags.RD
    answer = _answer(query, dns.rcode.SERVFAIL, edns)
    assert answer.id == 0xBEEF
    assert answer.flags & dns.flags.QR
    assert bool(answer.flags & dns.flags.RD) == rd
    assert not answer.flags & (dns.flags.AA | dns.flags.TC | dns.flags.RA)
    assert answer.opcode() == dns.opcode.QUERY
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert len(answer.question) == 1
    assert answer.question[0].name.to_wire() == query.question[0].name.to_wire()  # case kept
    assert answer.question[0].rdtype == dns.rdatatype.AAAA
    assert answer.question[0].rdclass == dns.rdataclass.IN
    assert not answer.answer and not answer.authority and not answer.additional
    if edns:
        assert answer.edns == 0
        assert answer.payload == wire.ANSWER_PAYLOAD
    else:
        assert answer.edns == -1


def test_make_answer_echoes_opcode():
    query = dns.message.make_query("example.com.", "SOA")
    query.set_opcode(dns.opcode.NOTIFY)
    query.id = 7
    answer = _answer(query, dns.rcode.NOTIMP, False)
    assert answer.id == 7
    assert answer.opcode() == dns.opcode.NOTIFY
    assert answer.rcode() == dns.rcode.NOTIMP
    assert answer.question[0].name == dns.name.from_text("example.com.")


def test_make_answer_without_question():
    query = dns.message.make_query("example.com.", "A")
    query.id = 99
    answer = _answer(query, dns.rcode.FORMERR, False, question=False)
    assert answer.id == 99
    assert answer.rcode() == dns.rcode.FORMERR
    assert len(answer.question) == 0


# -- with_large_buffer / without_opt ------------------------------------------------

def _end(packet: bytes) -> int:
    return wire.parse_question(packet)[3]


def test_with_large_buffer_adds_opt():
    query = dns.message.make_query("www.example.com.", "A")
    packet = query.to_wire()
    out, added = wire.with_large_buffer(packet, _end(packet))
    assert added is True
    assert out[:10] == packet[:10]
    assert out[10:12] == b"\x00\x01"
    parsed = dns.message.from_wire(out)
    assert parsed.id == query.id
    assert parsed.question == query.question
    assert parsed.edns == 0
    assert parsed.payload == 65535
    assert parsed.ednsflags == 0
    assert not parsed.options


def test_with_large_buffer_patches_existing_opt():
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=1232,
                                   want_dnssec=True,
                                   options=[dns.edns.GenericOption(dns.edns.COOKIE, b"12345678")])
    packet = query.to_wire()
    out, added = wire.with_large_buffer(packet, _end(packet))
    assert added is False
    assert len(out) == len(packet)
    parsed = dns.message.from_wire(out)
    assert parsed.payload == 65535
    assert parsed.edns == 0
    assert parsed.ednsflags & dns.flags.DO
    assert [o.to_wire() for o in parsed.options] == [o.to_wire() for o in query.options]
    assert parsed.question == query.question
    assert parsed.id == query.id


def test_with_large_buffer_leaves_tsig_query_alone():
    query = dns.message.make_query("www.example.com.", "A")
    query.use_tsig(_KEYRING, keyname="k.")
    packet = query.to_wire()
    out, added = wire.with_large_buffer(packet, _end(packet))
    assert (out, added) == (packet, False)


def test_with_large_buffer_leaves_non_opt_additional_alone():
    query = dns.message.make_query("www.example.com.", "A")
    query.additional.append(dns.rrset.from_text("x.example.", 0, "IN", "TXT", '"hi"'))
    packet = query.to_wire()
    out, added = wire.with_large_buffer(packet, _end(packet))
    assert (out, added) == (packet, False)


def test_with_large_buffer_keeps_tsig_with_opt_verifiable():
    # The TSIG MAC covers the whole message, OPT included: patching the OPT of
    # a signed query makes the backend reject it (BADSIG). A signed query
    # must be forwarded as it came.
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=1232)
    query.use_tsig(_KEYRING, keyname="k.")
    packet = query.to_wire()
    out, added = wire.with_large_buffer(packet, _end(packet))
    assert added is False
    dns.message.from_wire(out, keyring=_KEYRING)  # raises BadSignature if broken


@FAST
@given(names(), st.binary(max_size=60), st.integers(0, 3))
def test_with_large_buffer_never_raises(name, tail, ar):
    packet = _header(ar=ar) + name.to_wire() + b"\x00\x01\x00\x01" + tail
    out, added = wire.with_large_buffer(packet, _end(packet))
    if added:
        assert ar == 0
        assert out == packet[:10] + b"\x00\x01" + packet[12:] + b"\x00\x00\x29\xff\xff" + b"\x00" * 6


def _reply(query: dns.message.Message) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
    reply.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "NS", "ns.example.com."))
    reply.additional.append(dns.rrset.from_text("ns.example.com.", 60, "IN", "A", "192.0.2.53"))
    return reply


def test_without_opt_removes_opt():
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=65535)
    packet = _reply(query).to_wire()
    assert packet[10:12] == b"\x00\x02"
    out = wire.without_opt(packet)
    assert out[10:12] == b"\x00\x01"
    assert len(out) == len(packet) - 11
    before, after = dns.message.from_wire(packet), dns.message.from_wire(out)
    assert after.edns == -1
    assert after.id == before.id
    assert after.flags == before.flags
    assert after.rcode() == before.rcode()
    assert after.question == before.question
    assert after.answer == before.answer
    assert after.authority == before.authority
    assert after.additional == before.additional
    assert wire.find_opt(out) is None


def test_without_opt_without_opt_is_unchanged():
    query = dns.message.make_query("www.example.com.", "A")
    packet = _reply(query).to_wire()
    assert wire.without_opt(packet) == packet


def test_added_opt_removed_from_reply_round_trip():
    # What the TCP path does: add the OPT, the backend echoes EDNS, strip it.
    query = dns.message.make_query("www.example.com.", "A")
    sent, added = wire.with_large_buffer(query.to_wire(), _end(query.to_wire()))
    assert added
    backend_view = dns.message.from_wire(sent)
    reply = _reply(backend_view)
    assert reply.edns == 0
    out = dns.message.from_wire(wire.without_opt(reply.to_wire()))
    assert out.edns == -1
    assert out.answer == reply.answer
