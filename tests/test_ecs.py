"""EDNS Client Subnet: what the router adds to a query and takes out of the reply,
with dnspython as the oracle."""
from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import event, given, settings, strategies as st

from dnsrouter import ecs, wire
from dnsrouter.ecs import Added, Kind
from dnsrouter.errors import WireError

FAST = settings(max_examples=300, deadline=None)

ECS = dns.edns.OptionType.ECS
COOKIE, NSID, PADDING, EDE = (dns.edns.OptionType.COOKIE, dns.edns.OptionType.NSID,
                              dns.edns.OptionType.PADDING, dns.edns.OptionType.EDE)
_KEYRING = dns.tsigkeyring.from_text({"k.": "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI="})


# -- the oracle ---------------------------------------------------------------------

def network(client: str, v4: int, v6: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The client's network as RFC 7871 sends it (a v4-mapped address is IPv4)."""
    address = ipaddress.ip_address(client.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = v4 if address.version == 4 else v6
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def ecs_bytes(client: str, v4: int, v6: int) -> bytes:
    """The option (code, length, data) as dnspython writes it."""
    net = network(client, v4, v6)
    data = dns.edns.ECSOption(str(net.network_address), net.prefixlen).to_wire()
    return struct.pack("!HH", ECS, len(data)) + data


def option_bytes(option: dns.edns.Option) -> bytes:
    data = option.to_wire()
    return struct.pack("!HH", option.otype, len(data)) + data


def assert_ecs(option: dns.edns.Option, client: str, v4: int, v6: int) -> None:
    net = network(client, v4, v6)
    assert isinstance(option, dns.edns.ECSOption)
    assert option.family == (1 if net.version == 4 else 2)
    assert option.srclen == net.prefixlen
    assert option.scopelen == 0
    assert ipaddress.ip_address(option.address) == net.network_address


def assert_same(got: dns.message.Message, expected: dns.message.Message) -> None:
    """Equal as a client sees them: header, sections in order, and EDNS."""
    assert got.id == expected.id
    assert got.flags == expected.flags
    assert got.rcode() == expected.rcode()
    for a, b in zip(got.sections, expected.sections):
        assert list(a) == list(b)
    assert got.edns == expected.edns
    if expected.edns >= 0:
        assert got.ednsflags == expected.ednsflags
        assert got.payload == expected.payload
        assert [option_bytes(o) for o in got.options] == [option_bytes(o) for o in expected.options]


def end_of_question(packet: bytes) -> int:
    return wire.parse_question(packet)[3]


def send(query: bytes, client: str, v4: int = 24, v6: int = 56, override: bool = False
         ) -> tuple[bytes, Added | None]:
    return ecs.add(query, end_of_question(query), client, v4, v6, override)


# -- option ------------------------------------------------------------------------

@pytest.mark.parametrize("client, v4, v6, expected", [
    ("192.0.2.77", 24, 56, "0008 0007 0001 18 00 c00002"),
    ("192.0.2.77", 32, 56, "0008 0008 0001 20 00 c000024d"),
    ("192.0.2.255", 25, 56, "0008 0008 0001 19 00 c0000280"),  # bits past the prefix are zero
    ("192.0.2.77", 0, 56, "0008 0004 0001 00 00"),  # no address at all
    ("2001:db8:abcd:12ff::1", 24, 56, "0008 000b 0002 38 00 20010db8abcd12"),
    ("2001:db8:abcd:12ff::1", 24, 60, "0008 000c 0002 3c 00 20010db8abcd12f0"),
    ("2001:db8::1", 24, 128, "0008 0014 0002 80 00 20010db8000000000000000000000001"),
    ("::ffff:192.0.2.77", 24, 56, "0008 0007 0001 18 00 c00002"),  # a dual-stack socket's IPv4 client
    ("fe80::1234%eth0", 24, 16, "0008 0006 0002 10 00 fe80"),
])
def test_option_examples(client, v4, v6, expected):
    assert ecs.option(client, v4, v6) == bytes.fromhex(expected.replace(" ", ""))
    assert ecs.option(client, v4, v6) == ecs_bytes(client, v4, v6)


@pytest.mark.parametrize("client, v4, v6", [
    ("192.0.2.1", 33, 56), ("192.0.2.1", -1, 56), ("2001:db8::1", 24, 129), ("::ffff:192.0.2.1", 33, 56),
    ("example.com", 24, 56), ("192.0.2", 24, 56), ("", 24, 56),
])
def test_option_rejects(client, v4, v6):
    with pytest.raises(ValueError):
        ecs.option(client, v4, v6)


@FAST
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 32), st.integers(0, 128))
def test_option_matches_dnspython(address, v4, v6):
    client = str(address)
    assert ecs.option(client, v4, v6) == ecs_bytes(client, v4, v6)
    parsed = dns.edns.option_from_wire(ECS, ecs.option(client, v4, v6), 4, len(ecs.option(client, v4, v6)) - 4)
    assert_ecs(parsed, client, v4, v6)


# -- add: examples --------------------------------------------------------------------

def test_add_to_a_query_without_opt():
    query = dns.message.make_query("www.example.com.", "A").to_wire()
    sent, added = send(query, "192.0.2.77")
    assert added == Added(Kind.OPT, 512)
    opt = b"\x00" + b"\x00\x29" + struct.pack("!H", ecs.ADDED_PAYLOAD) + b"\x00\x00\x00\x00" + \
        struct.pack("!H", 11) + ecs_bytes("192.0.2.77", 24, 56)
    assert sent == query[:10] + b"\x00\x01" + query[12:] + opt
    view = dns.message.from_wire(sent)
    assert view.edns == 0 and view.ednsflags == 0 and view.payload == ecs.ADDED_PAYLOAD
    [option] = view.options
    assert_ecs(option, "192.0.2.77", 24, 56)


def test_add_to_a_query_with_opt_keeps_options_in_order():
    options = [dns.edns.GenericOption(COOKIE, b"12345678"), dns.edns.GenericOption(NSID, b""),
               dns.edns.GenericOption(PADDING, b"\x00" * 7)]
    message = dns.message.make_query("www.example.com.", "AAAA", use_edns=0, payload=1400, want_dnssec=True,
                                     options=options)
    query = message.to_wire()
    sent, added = send(query, "2001:db8:abcd:12ff::1")
    assert added == Added(Kind.OPTION, 1400)
    start, end = wire.find_opt(query)
    option = ecs_bytes("2001:db8:abcd:12ff::1", 24, 56)
    assert sent == query[:start + 9] + struct.pack("!H", end - start - 11 + len(option)) + \
        query[start + 11:end] + option
    view = dns.message.from_wire(sent)
    assert [option_bytes(o) for o in view.options[:3]] == [option_bytes(o) for o in options]
    assert_ecs(view.options[3], "2001:db8:abcd:12ff::1", 24, 56)
    assert view.payload == 1400 and view.ednsflags & dns.flags.DO


def test_client_ecs_is_kept_without_override():
    query = dns.message.make_query("www.example.com.", "A", use_edns=0,
                                   options=[dns.edns.ECSOption("203.0.113.0", 24)]).to_wire()
    assert send(query, "192.0.2.77") == (query, None)


def test_client_ecs_is_replaced_with_override():
    theirs = dns.edns.ECSOption("203.0.113.0", 24)
    cookie = dns.edns.GenericOption(COOKIE, b"12345678")
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=1232,
                                   options=[cookie, theirs, dns.edns.GenericOption(NSID, b"")]).to_wire()
    sent, added = send(query, "192.0.2.77", override=True)
    assert added == Added(Kind.REPLACED, 1232, option_bytes(theirs))
    view = dns.message.from_wire(sent)
    assert [o.otype for o in view.options] == [COOKIE, ECS, NSID]
    assert_ecs(view.options[1], "192.0.2.77", 24, 56)
    start, end = wire.find_opt(query)
    assert sent == query[:start + 9] + struct.pack("!H", 12 + 11 + 4) + option_bytes(cookie) + \
        ecs_bytes("192.0.2.77", 24, 56) + query[end - 4:]


def test_override_drops_a_second_client_ecs():
    first, second = dns.edns.ECSOption("203.0.113.0", 24), dns.edns.ECSOption("2001:db8::", 48)
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, options=[first, second]).to_wire()
    sent, added = send(query, "192.0.2.77", override=True)
    assert added is not None and added.original == option_bytes(first)
    [option] = dns.message.from_wire(sent).options
    assert_ecs(option, "192.0.2.77", 24, 56)


@pytest.mark.parametrize("use_edns", [False, 0])
def test_signed_query_is_unchanged(use_edns):
    for options in ([], [dns.edns.ECSOption("203.0.113.0", 24)]):
        message = dns.message.make_query("www.example.com.", "A", use_edns=use_edns,
                                         options=options if use_edns is not False else None)
        message.use_tsig(_KEYRING, keyname="k.")
        query = message.to_wire()
        for override in (False, True):
            assert send(query, "192.0.2.77", override=override) == (query, None)
        dns.message.from_wire(query, keyring=_KEYRING)


def test_sig0_query_is_unchanged():
    # SIG(0) (RFC 2931): a SIG record last in the additional section, over the whole message.
    message = dns.message.make_query("www.example.com.", "A")
    query = message.to_wire()
    sig = b"\x00" + struct.pack("!HHIH", 24, 255, 0, 4) + b"\x00\x00\x00\x00"
    query = query[:10] + b"\x00\x01" + query[12:] + sig
    assert send(query, "192.0.2.77") == (query, None)


def test_edns_version_1_is_unchanged():
    query = dns.message.make_query("www.example.com.", "A", use_edns=1).to_wire()
    assert send(query, "192.0.2.77") == (query, None)


def test_opt_is_added_after_other_additional_records():
    message = dns.message.make_query("www.example.com.", "A")
    message.additional.append(dns.rrset.from_text("x.example.", 0, "IN", "TXT", '"hi"'))
    query = message.to_wire()
    sent, added = send(query, "192.0.2.77")
    assert added is not None and added.kind is Kind.OPT
    assert sent[:len(query)] == query[:10] + b"\x00\x02" + query[12:]
    view = dns.message.from_wire(sent)
    assert list(view.additional) == list(message.additional)
    assert_ecs(view.options[0], "192.0.2.77", 24, 56)


def _opt(options: bytes, owner: bytes = b"\x00", version: int = 0) -> bytes:
    return owner + struct.pack("!HHIH", 41, 1232, version << 16, len(options)) + options


_Q = dns.message.make_query("www.example.com.", "A").to_wire()


def _with_additional(*records: bytes) -> bytes:
    return _Q[:10] + struct.pack("!H", len(records)) + _Q[12:] + b"".join(records)


@pytest.mark.parametrize("query, why", [
    (_with_additional(_opt(b""), _opt(b"")), "two OPT records"),
    (_with_additional(_opt(b"\x00\x0a\x00\x08abc")), "an option past the end of the OPT"),
    (_with_additional(_opt(b"\x00\x0a\x00")), "half an option header"),
    (_with_additional(_opt(b"", owner=b"\x01a\x00")), "an OPT not owned by the root"),
    (_with_additional(_opt(b"")[:-1]), "an OPT cut short"),
    (_Q[:10] + b"\x00\x02" + _Q[12:] + _opt(b""), "one record of two"),
])
def test_add_rejects_malformed_queries(query, why):
    for override in (False, True):
        with pytest.raises(WireError):
            send(query, "192.0.2.77", override=override)


def test_trailing_bytes_stay_after_the_added_opt():
    query = _Q + b"junk"
    sent, added = send(query, "192.0.2.77")
    assert sent.endswith(b"junk")
    assert dns.message.from_wire(sent[:-4]).options[0].otype == ECS


# -- restore: examples --------------------------------------------------------------------

def _reply_to(sent: bytes, options: list[dns.edns.Option] | None, answers: int = 1) -> dns.message.Message:
    view = dns.message.from_wire(sent)
    reply = dns.message.make_response(view)
    for i in range(answers):
        reply.answer.append(dns.rrset.from_text(view.question[0].name, 60, "IN", "A", f"192.0.2.{i % 250}"))
    if options is not None:
        reply.use_edns(0, 0, 1232, options=options)
    return reply


def test_restore_removes_the_added_opt_byte_for_byte():
    query = dns.message.make_query("www.example.com.", "A")
    sent, added = send(query.to_wire(), "192.0.2.77")
    view = dns.message.from_wire(sent)
    reply = _reply_to(sent, [dns.edns.ECSOption("192.0.2.0", 24, 24), dns.edns.EDEOption(3)])
    back = ecs.restore(reply.to_wire(), added, added.payload)
    reply.use_edns(False)
    assert back == reply.to_wire()
    assert back == wire.without_opt(_reply_to(sent, view.options).to_wire())


def test_restore_removes_the_added_option_only():
    cookie = dns.edns.CookieOption(b"12345678", b"")
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, options=[cookie])
    sent, added = send(query.to_wire(), "192.0.2.77")
    server_cookie = dns.edns.CookieOption(b"12345678", b"abcdefgh")
    reply = _reply_to(sent, [server_cookie, dns.edns.ECSOption("192.0.2.0", 24, 20), dns.edns.EDEOption(3)])
    back = ecs.restore(reply.to_wire(), added, added.payload)
    reply.use_edns(0, 0, 1232, options=[server_cookie, dns.edns.EDEOption(3)])
    assert back == reply.to_wire()


@pytest.mark.parametrize("backend_scope, client_scope", [(0, 0), (16, 24), (24, 24), (32, 24)])
def test_restore_gives_back_the_clients_ecs(backend_scope, client_scope):
    theirs = dns.edns.ECSOption("203.0.113.0", 24)
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, options=[theirs])
    sent, added = send(query.to_wire(), "192.0.2.77", override=True)
    reply = _reply_to(sent, [dns.edns.ECSOption("192.0.2.0", 24, backend_scope)])
    got = dns.message.from_wire(ecs.restore(reply.to_wire(), added, added.payload))
    [option] = got.options
    assert isinstance(option, dns.edns.ECSOption)
    assert (option.address, option.srclen, option.scopelen) == ("203.0.113.0", 24, client_scope)


def test_restore_without_echo_adds_nothing():
    theirs = dns.edns.ECSOption("203.0.113.0", 24)
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, options=[theirs])
    sent, added = send(query.to_wire(), "192.0.2.77", override=True)
    reply = _reply_to(sent, [dns.edns.EDEOption(3)]).to_wire()
    assert ecs.restore(reply, added, added.payload) == reply


def test_restore_of_a_reply_without_opt_is_unchanged():
    for query in (dns.message.make_query("a.example.", "A"),
                  dns.message.make_query("a.example.", "A", use_edns=0)):
        sent, added = send(query.to_wire(), "192.0.2.77")
        assert added is not None
        reply = _reply_to(sent, None)
        reply.use_edns(False)
        assert ecs.restore(reply.to_wire(), added, added.payload) == reply.to_wire()


def test_restore_truncates_what_the_client_cannot_take():
    query = dns.message.make_query("www.example.com.", "A")
    query.id = 0xBEEF
    sent, added = send(query.to_wire(), "192.0.2.77")
    reply = _reply_to(sent, [dns.edns.ECSOption("192.0.2.0", 24, 24)], answers=40)
    reply.flags |= dns.flags.AA
    wire_reply = reply.to_wire()
    assert 512 < len(wire_reply) - 11 - 11 <= 1232  # fits the backend's buffer, not the client's
    back = ecs.restore(wire_reply, added, added.payload)
    got = dns.message.from_wire(back)
    assert got.id == 0xBEEF
    assert got.flags == reply.flags | dns.flags.TC
    assert got.question == query.question
    assert not got.answer and not got.authority and not got.additional and got.edns == -1
    question = query.to_wire()[12:]
    assert back == b"\xbe\xef" + bytes((back[2], back[3])) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
    # The same reply fits a TCP client.
    reply.use_edns(False)
    assert ecs.restore(wire_reply, added, 65535) == reply.to_wire()


def test_truncated_reply_keeps_the_clients_opt():
    cookie = dns.edns.CookieOption(b"12345678", b"")
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=600, options=[cookie])
    sent, added = send(query.to_wire(), "192.0.2.77")
    assert added is not None and added.payload == 600
    server_cookie = dns.edns.CookieOption(b"12345678", b"abcdefgh")
    reply = _reply_to(sent, [server_cookie, dns.edns.ECSOption("192.0.2.0", 24, 24)], answers=40)
    got = dns.message.from_wire(ecs.restore(reply.to_wire(max_size=65535), added, added.payload))
    assert got.flags & dns.flags.TC and not got.answer
    assert [option_bytes(o) for o in got.options] == [option_bytes(server_cookie)]


def test_small_payloads_count_as_512():
    query = dns.message.make_query("www.example.com.", "A", use_edns=0, payload=100).to_wire()
    _, added = send(query, "192.0.2.77")
    assert added is not None and added.payload == 512


def test_add_composes_with_with_large_buffer_either_way():
    query = dns.message.make_query("www.example.com.", "A").to_wire()
    end = end_of_question(query)
    # ECS first: the OPT is the router's (Kind.OPT); with_large_buffer widens it.
    sent, added = send(query, "192.0.2.77")
    sent, added_opt = wire.with_large_buffer(sent, end)
    assert added is not None and added.kind is Kind.OPT and not added_opt
    reply = _reply_to(sent, [dns.edns.ECSOption("192.0.2.0", 24, 24)])
    expected = _reply_to(sent, None)
    expected.use_edns(False)
    assert ecs.restore(reply.to_wire(), added, 65535) == expected.to_wire()
    # with_large_buffer first: ECS goes into its OPT (Kind.OPTION); without_opt removes the OPT.
    widened, added_opt = wire.with_large_buffer(query, end)
    sent, added = ecs.add(widened, end, "192.0.2.77", 24, 56, False)
    assert added is not None and added.kind is Kind.OPTION and added_opt
    reply = _reply_to(sent, [dns.edns.ECSOption("192.0.2.0", 24, 24)])
    assert wire.without_opt(ecs.restore(reply.to_wire(), added, 65535)) == expected.to_wire()


def _render(message: dns.message.Message, opt_at: int) -> bytes:
    """``message`` as a server that writes the OPT record ``opt_at`` records
    into the additional section, not last, would: names after it compress
    to names after it."""
    r = dns.renderer.Renderer(message.id, message.flags, 65535)
    for rrset in message.question:
        r.add_question(rrset.name, rrset.rdtype, rrset.rdclass)
    for rrset in message.answer:
        r.add_rrset(dns.renderer.ANSWER, rrset)
    for rrset in message.authority:
        r.add_rrset(dns.renderer.AUTHORITY, rrset)
    for rrset in message.additional[:opt_at]:
        r.add_rrset(dns.renderer.ADDITIONAL, rrset)
    assert message.opt is not None
    r.add_opt(message.opt)
    for rrset in message.additional[opt_at:]:
        r.add_rrset(dns.renderer.ADDITIONAL, rrset)
    r.write_header()
    return r.get_wire()


def test_names_after_a_removed_opt_still_point_at_their_targets():
    query = dns.message.make_query("www.example.com.", "MX")
    sent, added = send(query.to_wire(), "192.0.2.77")
    reply = _reply_to(sent, [dns.edns.ECSOption("192.0.2.0", 24, 24)], answers=0)
    reply.additional.append(dns.rrset.from_text("a.example.com.", 60, "IN", "A", "192.0.2.1"))
    reply.additional.append(dns.rrset.from_text("mx.other.example.", 60, "IN", "MX", "10 a.example.com."))
    reply.additional.append(dns.rrset.from_text("x.other.example.", 60, "IN", "SOA",
                                                "mx.other.example. a.example.com. 1 2 3 4 5"))
    reply.additional.append(dns.rrset.from_text("mx.other.example.", 60, "IN", "AAAA", "2001:db8::1"))
    packet = _render(reply, 1)
    start, end = wire.find_opt(packet)
    assert end < len(packet)  # records follow the OPT
    assert any(b & 0xC0 == 0xC0 and (b & 0x3F) << 8 | packet[i + 1] >= end
               for i, b in enumerate(packet[end:-1], end))  # and point past it
    got = dns.message.from_wire(ecs.restore(packet, added, 65535))
    reply.use_edns(False)
    assert_same(got, reply)


_EVERY_KIND = (Added(Kind.OPT, 512), Added(Kind.OPTION, 1232), Added(Kind.REPLACED, 1232, b"\x00\x08\x00\x00"))


@pytest.mark.parametrize("reply, kinds, why", [
    (b"\x00" * 11, _EVERY_KIND, "short header"),
    (_Q[:-1], _EVERY_KIND, "question cut"),
    (_Q[:6] + b"\x00\x01" + _Q[8:], _EVERY_KIND, "an answer that is not there"),
    (_with_additional(_opt(b""), _opt(b"")), _EVERY_KIND, "two OPT records"),
    (_with_additional(_opt(b"", owner=b"\x01a\x00")), _EVERY_KIND, "an OPT not owned by the root"),
    (_Q[:10] + b"\x00\x02" + _Q[12:] + _opt(b"\x00\x08\x00\x00") + b"\xc0\x0c\x00\x01", _EVERY_KIND,
     "an additional record cut"),
    # The options of an OPT the router removes whole are not read.
    (_with_additional(_opt(b"\x00\x08\x00\x08abc")), _EVERY_KIND[1:], "an option past the end of the OPT"),
    (_with_additional(_opt(b"\x00\x08")), _EVERY_KIND[1:], "half an option header"),
])
def test_restore_rejects_malformed_replies(reply, kinds, why):
    for added in kinds:
        with pytest.raises(WireError):
            ecs.restore(reply, added, added.payload)


def test_restore_refuses_to_drop_an_extended_rcode():
    reply = _with_additional(b"\x00" + struct.pack("!HHIH", 41, 1232, 1 << 24, 0))  # BADVERS high bits
    with pytest.raises(WireError):
        ecs.restore(reply, Added(Kind.OPT, 512), 512)


def test_restore_refuses_a_name_pointing_into_the_opt():
    opt = _opt(b"")
    record = b"\xc0" + bytes((len(_Q),)) + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x00" * 4
    reply = _with_additional(opt, record)
    dns.message.from_wire(reply)  # a pointer at the OPT's root name: odd, but well-formed
    with pytest.raises(WireError):
        ecs.restore(reply, Added(Kind.OPT, 512), 512)


# -- round trips under hypothesis ----------------------------------------------------

_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_names = st.lists(_label, min_size=1, max_size=4).map(lambda labels: dns.name.from_text(".".join(labels) + "."))
_clients = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                     st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"))
_client_ecs = st.one_of(
    st.builds(lambda a, p: dns.edns.ECSOption(str(a), p), st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, p: dns.edns.ECSOption(str(a), p), st.ip_addresses(v=6), st.integers(0, 128)),
)
_other_options = st.lists(st.one_of(
    st.binary(min_size=8, max_size=8).map(lambda c: dns.edns.CookieOption(c, b"")),
    st.just(dns.edns.GenericOption(NSID, b"")),
    st.integers(0, 40).map(lambda n: dns.edns.GenericOption(PADDING, b"\x00" * n)),
    st.binary(max_size=20).map(lambda b: dns.edns.GenericOption(65001, b)),
), max_size=4)


@st.composite
def queries(draw) -> tuple[dns.message.Message, list[dns.edns.ECSOption]]:
    name = draw(_names)
    rdtype = draw(st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX, dns.rdatatype.TXT]))
    edns = draw(st.booleans())
    if not edns:
        return dns.message.make_query(name, rdtype), []
    others = draw(_other_options)
    theirs = draw(st.lists(_client_ecs, max_size=1))
    options = list(others)
    if theirs:
        options.insert(draw(st.integers(0, len(options))), theirs[0])
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=draw(st.integers(0, 65535)),
                                   want_dnssec=draw(st.booleans()), options=options)
    query.id = draw(st.integers(0, 0xFFFF))
    return query, theirs


@FAST
@given(queries(), _clients, st.integers(0, 32), st.integers(0, 128), st.booleans())
def test_add_changes_only_what_it_must(drawn, client, v4, v6, override):
    message, theirs = drawn
    query = message.to_wire()
    sent, added = send(query, client, v4, v6, override)
    mine = ecs_bytes(client, v4, v6)
    if theirs and not override:
        assert (sent, added) == (query, None)
        return
    assert added is not None
    view = dns.message.from_wire(sent)
    assert view.id == message.id and view.flags == message.flags and view.question == message.question
    assert [o.otype for o in view.options].count(ECS) == 1
    assert_ecs(next(o for o in view.options if o.otype == ECS), client, v4, v6)
    if message.edns < 0:
        assert added == Added(Kind.OPT, 512)
        assert sent == query[:10] + b"\x00\x01" + query[12:] + b"\x00\x00\x29" + \
            struct.pack("!HIH", ecs.ADDED_PAYLOAD, 0, len(mine)) + mine
        return
    start, end = wire.find_opt(query)
    assert added.payload == max(message.payload, 512)
    assert view.payload == message.payload and view.ednsflags == message.ednsflags
    if theirs:
        assert added == Added(Kind.REPLACED, added.payload, option_bytes(theirs[0]))
        body = b"".join(mine if o.otype == ECS else option_bytes(o) for o in message.options)
    else:
        assert added == Added(Kind.OPTION, added.payload)
        body = b"".join(option_bytes(o) for o in message.options) + mine
    assert sent == query[:start + 9] + struct.pack("!H", len(body)) + body + query[end:]


# Names from a small pool too, so that records after the OPT compress to each other.
_pooled = st.one_of(_names, st.sampled_from([dns.name.from_text(n) for n in (
    "example.com.", "ns1.example.com.", "a.example.com.", "mx.other.example.", "other.example.")]))
_additional = st.lists(st.one_of(
    st.builds(lambda n, a: dns.rrset.from_text(n, 60, "IN", "A", str(a)), _pooled, st.ip_addresses(v=4)),
    st.builds(lambda n, a: dns.rrset.from_text(n, 60, "IN", "AAAA", str(a)), _pooled, st.ip_addresses(v=6)),
    st.builds(lambda n, t: dns.rrset.from_text(n, 60, "IN", "MX", f"10 {t}"), _pooled, _pooled),
    st.builds(lambda n, t: dns.rrset.from_text(n, 60, "IN", "NS", str(t)), _pooled, _pooled),
    st.builds(lambda n, t: dns.rrset.from_text(n, 60, "IN", "SRV", f"0 0 53 {t}"), _pooled, _pooled),
    st.builds(lambda n, t: dns.rrset.from_text(n, 60, "IN", "SOA", f"{t} {n} 1 2 3 4 5"), _pooled, _pooled),
), max_size=5)


@FAST
@given(queries(), _clients, st.booleans(), st.booleans(), st.integers(0, 128), st.booleans(),
       st.integers(0, 60), _additional, st.data())
def test_restore_takes_out_what_add_put_in(drawn, client, override, echo, scope, ede, answers, additional,
                                           data):
    message, theirs = drawn
    query = message.to_wire()
    sent, added = send(query, client, 24, 56, override)
    view = dns.message.from_wire(sent)
    # The backend: answers, and echoes EDNS as a server does: ECS with a
    # scope (or not at all), a server cookie, an NSID; an extended error
    # of its own; nothing for padding or unknown options.
    reply = dns.message.make_response(view)
    for i in range(answers):
        reply.answer.append(dns.rrset.from_text(view.question[0].name, 60, "IN", "A", f"192.0.2.{i}"))
    for rrset in additional:
        reply.additional.append(rrset)
    server_options: list[dns.edns.Option] = []
    if view.edns >= 0:
        for option in view.options:
            if isinstance(option, dns.edns.ECSOption) and echo:
                limit = 32 if option.family == 1 else 128
                server_options.append(dns.edns.ECSOption(option.address, option.srclen, min(scope, limit)))
            elif isinstance(option, dns.edns.CookieOption):
                server_options.append(dns.edns.CookieOption(option.client, b"server-cookie"))
            elif option.otype == NSID:
                server_options.append(dns.edns.GenericOption(NSID, b"backend-1"))
        if ede:
            server_options.append(dns.edns.EDEOption(dns.edns.EDECode.STALE_ANSWER))
        reply.use_edns(0, view.ednsflags & dns.flags.DO, 1232, options=server_options)
    opt_at = data.draw(st.integers(0, len(reply.additional))) if reply.opt is not None else 0
    backend = _render(reply, opt_at) if opt_at < len(reply.additional) else reply.to_wire(max_size=65535)

    if added is None:  # the client's own ECS went through: the reply comes back as it is
        assert theirs and not override and sent == query
        return
    got_bytes = ecs.restore(backend, added, added.payload)
    got = dns.message.from_wire(got_bytes)
    event(f"{added.kind.name}{', OPT not last' if opt_at < len(reply.additional) else ''}")

    # The oracle: the backend's reply minus what the router added.
    expected = dns.message.from_wire(backend)
    removed = 0
    if added.kind is Kind.OPT:
        if expected.opt is not None:
            removed = 11 + sum(len(option_bytes(o)) for o in expected.options)  # the whole record
        expected.use_edns(False)
    elif expected.edns >= 0:
        options = []
        for option in expected.options:
            if option.otype != ECS:
                options.append(option)
                continue
            removed += len(option_bytes(option))
            if added.kind is Kind.REPLACED:
                # The client's own, with scope 0 if the backend's was 0, else the client's source length.
                original = theirs[0]
                back = dns.edns.ECSOption(original.address, original.srclen,
                                          0 if option.scopelen == 0 else original.srclen)
                options.append(back)
                removed -= len(option_bytes(back))
        expected.use_edns(expected.edns, expected.ednsflags, expected.payload, options=options)
    assert added.payload == (512 if message.edns < 0 else max(512, message.payload))
    if len(backend) - removed <= added.payload:
        assert len(got_bytes) == len(backend) - removed
        assert_same(got, expected)
        if opt_at >= len(reply.additional):
            # OPT last: the backend's message rendered without what the
            # router added is the same bytes, up to the OPT.
            if added.kind is Kind.OPT:
                reply.use_edns(False)
            elif reply.opt is not None:
                reply.use_edns(0, reply.ednsflags, reply.payload, options=expected.options)
            assert got_bytes == reply.to_wire(max_size=65535)
    else:
        event("truncated")
        assert got.flags == expected.flags | dns.flags.TC
        assert got.id == expected.id and got.rcode() == expected.rcode()
        assert got.question == expected.question
        assert not got.answer and not got.authority and not got.additional
        assert got.edns == expected.edns
        if expected.edns >= 0:
            assert [option_bytes(o) for o in got.options] == [option_bytes(o) for o in expected.options]
        assert len(got_bytes) <= added.payload
