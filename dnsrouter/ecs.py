"""EDNS Client Subnet (RFC 7871): the client's network, for the backend.

With ``client_address = ecs`` the router puts an ECS option with the
client's address, cut to ``ecs_ipv4_prefix`` / ``ecs_ipv6_prefix`` bits,
into every query it forwards, and takes out of the reply what it put in, so
the client never sees an option it did not send.

Like the rest of the packet path this works on the client's bytes and
changes only what it must (RDLENGTH and the options of the OPT record, and
ARCOUNT when it adds an OPT): dnspython would cost a worker 10 MB and a full
parse per packet (see wire.py). What ``add`` did is returned as ``Added``,
and ``restore`` undoes exactly that:

* ``Kind.OPT``: the query had no OPT record. One is added (EDNS version 0,
  no flags, a buffer of ``ADDED_PAYLOAD``, the ECS option alone) and the
  reply's OPT record is removed whole, with everything in it.
* ``Kind.OPTION``: the query had an OPT record without ECS. The option is
  appended to its options; every ECS option is removed from the reply's.
* ``Kind.REPLACED``: the query carried its own ECS and ``ecs_override`` is
  set (the operator does not let clients choose the subnet the backend
  sees). The first ECS option is replaced by the router's, in its place, and
  any further one (RFC 7871 allows only one) is dropped. If the reply echoes
  ECS, the client gets back the option it sent, as it sent it, but for
  SCOPE PREFIX-LENGTH: 0 when the backend's echo says 0 (the answer is the
  same for every address, so it is for the client's subnet too), otherwise
  the client's own SOURCE PREFIX-LENGTH. The backend's scope is about the
  router's idea of the client, not the subnet the client asked about; the
  client's source length lets a resolver cache the answer for the subnet it
  asked about only and spread it no further. A reply without ECS (a backend
  that ignores it) stays without: that is true of the answer.

Unchanged, with None for what was added: a query with a TSIG or SIG(0)
record last (the signature covers the whole message), a query whose OPT has
an EDNS version other than 0 (the backend answers BADVERS, and ECS is
defined for version 0), and a query that carries its own ECS without
``ecs_override``. Its reply is relayed as it comes.

A query whose records do not parse, with two OPT records, or with an OPT not
owned by the root, raises WireError: the backend would answer FORMERR, and
forwarding it unchanged would let a client's own ECS past ``ecs_override``.

The reply the client gets must fit what it can take (``Added.payload`` over
UDP: its EDNS buffer, at least 512, or 512 without OPT; 65535 over TCP). If
the backend's reply minus what the router added does not, the client gets
what a DNS server sends when an answer does not fit: the header with TC set,
the question, and its OPT record, so that it asks again over TCP.

``add`` and ``wire.with_large_buffer`` (for TCP clients) compose in either
order: whichever adds the OPT, ``restore`` and ``wire.without_opt`` take out
what each added.
"""
from __future__ import annotations

import enum
import functools
import socket
import struct
from typing import NamedTuple

from . import wire
from .errors import WireError

OPTION_CODE = 8  # EDNS0 option code of Client Subnet (RFC 7871, section 6)
FAMILY_IPV4, FAMILY_IPV6 = 1, 2  # address family numbers (IANA)
TYPE_SIG, TYPE_TSIG = 24, 250  # SIG(0) and TSIG sign everything before them
NO_EDNS_PAYLOAD = 512  # what a client without OPT can take (RFC 1035), and the floor for one with

# The buffer size in an OPT the router adds for a client without one. More
# than the client's 512: the OPT and ECS the backend echoes are removed
# before the reply reaches the client, and a reply that still exceeds 512 is
# truncated here. With 512 the backend would truncate an answer that fits
# the client once the router's ~25 bytes are gone.
ADDED_PAYLOAD = wire.ANSWER_PAYLOAD

_CACHED = 4096  # client addresses; a resolver in front asks from a few
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_U16 = struct.Struct("!H")
_OPTION_HEAD = struct.Struct("!HHHBB")  # code, length, family, source prefix, scope prefix
_OPT_FIXED = struct.Struct("!BHHIH")  # root name, type, class (the buffer size), ttl, rdlength

# Owner name (root), type, buffer size, TTL (extended RCODE 0, version 0, no
# flags), then RDLENGTH and the options.
_OPT_HEAD = b"\x00" + _U16.pack(wire.TYPE_OPT) + _U16.pack(ADDED_PAYLOAD) + b"\x00" * 4

# Where the names are in the RDATA of the types whose names may be compressed
# (RFC 1035's, and those RFC 3597 section 4 says were compressed in the
# wild): bytes before the first name, number of names in a row.
_RDATA_NAMES = {
    2: (0, 1), 3: (0, 1), 4: (0, 1), 5: (0, 1), 7: (0, 1), 8: (0, 1), 9: (0, 1), 12: (0, 1), 39: (0, 1),
    6: (0, 2), 14: (0, 2), 17: (0, 2),  # SOA, MINFO, RP
    15: (2, 1), 18: (2, 1), 21: (2, 1), 36: (2, 1),  # MX, AFSDB, RT, KX
    26: (2, 2),  # PX
    33: (6, 1),  # SRV
}


class Kind(enum.Enum):
    """What the router added to a query."""

    OPT = "opt"  # a whole OPT record, with the ECS option alone
    OPTION = "option"  # an ECS option, to the client's OPT record
    REPLACED = "replaced"  # the router's ECS in place of the client's


class Added(NamedTuple):
    """What ``add`` put into a query, for ``restore`` to take out of the reply.

    A named tuple, as address.Address: immutable and compared by value, and
    made for every query, where a frozen dataclass costs three times as much.
    """

    kind: Kind
    payload: int  # what the client can take over UDP: its EDNS buffer (at least 512), or 512
    original: bytes = b""  # REPLACED: the client's ECS option as it sent it (code, length, data)


# The packet path reads these per query: a module global, not an Enum
# attribute look-up.
_OPT, _OPTION, _REPLACED = Kind.OPT, Kind.OPTION, Kind.REPLACED
_ADDED_OPT = Added(_OPT, NO_EDNS_PAYLOAD)


@functools.lru_cache(maxsize=_CACHED)
def option(client_ip: str, ipv4_prefix: int, ipv6_prefix: int) -> bytes:
    """The ECS option (code, length, data) for ``client_ip``, cut to the
    prefix of its family; ValueError for an address or prefix out of range.

    A dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``: it is
    an IPv4 client, and sent as one, cut to ``ipv4_prefix``. Cached: clients
    (resolvers, mostly) ask again and again from the same address.
    """
    host = client_ip.partition("%")[0]  # a link-local peer's zone is local to this machine
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError(f"{client_ip!r} is not an IP address") from None
    if packed[:12] == _V4_MAPPED:
        packed = packed[12:]
    family, prefix = (FAMILY_IPV4, ipv4_prefix) if len(packed) == 4 else (FAMILY_IPV6, ipv6_prefix)
    if not 0 <= prefix <= len(packed) * 8:
        raise ValueError(f"prefix length {prefix} out of range for {client_ip!r}")
    # RFC 7871 section 6: the address is cut to whole bytes of the prefix,
    # and the bits past the prefix in the last one are zero.
    address = bytearray(packed[:(prefix + 7) // 8])
    if prefix % 8:
        address[-1] &= 0xFF << (8 - prefix % 8) & 0xFF
    return _OPTION_HEAD.pack(OPTION_CODE, 4 + len(address), family, prefix, 0) + address


def add(query: bytes, question_end: int, client_ip: str, ipv4_prefix: int, ipv6_prefix: int,
        override: bool) -> tuple[bytes, Added | None]:
    """The query to send to the backend, and what was added to it (None when
    nothing was: see the module's docstring for when). ``question_end`` is
    where the question ends (wire.parse_question's last value). Raises
    WireError for a query whose additional section does not parse, and
    ValueError for a bad ``client_ip`` or prefix."""
    _, _, _, an, ns, ar = wire.HEADER.unpack_from(query)
    end, opt_start, opt_end, _, last = _walk(query, question_end, an + ns, ar)
    if ar and last in (TYPE_TSIG, TYPE_SIG):
        return query, None
    if opt_start < 0:
        # After the last record (ahead of any trailing bytes, which stay
        # where a backend would see them anyway: after everything it parses).
        ecs = option(client_ip, ipv4_prefix, ipv6_prefix)
        return (query[:10] + _U16.pack(ar + 1) + query[12:end] + _OPT_HEAD + _U16.pack(len(ecs)) + ecs
                + query[end:], _ADDED_OPT)
    if query[opt_start]:
        raise WireError("OPT record not owned by the root")
    _, _, buffer, ttl, _ = _OPT_FIXED.unpack_from(query, opt_start)
    if ttl >> 16 & 0xFF:
        return query, None  # EDNS version 1 or later: BADVERS, and ECS has no meaning there
    payload = max(buffer, NO_EDNS_PAYLOAD)
    rdata = opt_start + 11
    options = _options(query, rdata, opt_end)
    theirs = [(start, stop) for code, start, stop in options if code == OPTION_CODE]
    if theirs and not override:
        return query, None
    ecs = option(client_ip, ipv4_prefix, ipv6_prefix)
    if not theirs:
        body = query[rdata:opt_end] + ecs
        added = Added(_OPTION, payload)
    else:
        first = theirs[0][0]
        body = b"".join(ecs if start == first else query[start:stop]
                        for code, start, stop in options if code != OPTION_CODE or start == first)
        added = Added(_REPLACED, payload, query[first:theirs[0][1]])
    if len(body) > 0xFFFF:
        raise WireError("no room for ECS in the OPT record")
    return query[:rdata - 2] + _U16.pack(len(body)) + body + query[opt_end:], added


def restore(reply: bytes, added: Added, client_payload: int) -> bytes:
    """The backend's ``reply`` without what ``add`` put into the query (see
    the module's docstring), truncated to a TC reply if it is still larger
    than ``client_payload`` bytes. Raises WireError for a reply that does not
    parse, or whose removal would change what it says (a name compressed to
    a pointer into the OPT record; an extended RCODE in an OPT the client
    never sent)."""
    if len(reply) < 12:
        raise WireError("reply shorter than a DNS header")
    _, _, qd, an, ns, ar = wire.HEADER.unpack_from(reply)
    pos = 12
    for _ in range(qd):
        pos = wire.skip_name(reply, pos) + 4
    if pos > len(reply):
        raise WireError("question runs past the end of the reply")
    question_end = pos
    _, opt_start, opt_end, after, _ = _walk(reply, pos, an + ns, ar)
    opt = b""
    if opt_start >= 0:
        if reply[opt_start]:
            raise WireError("OPT record not owned by the root")
        if added.kind is _OPT:
            if reply[opt_start + 5]:
                raise WireError("extended RCODE in the OPT record the router added")
            reply = _splice(reply, opt_start, opt_end, b"", after, ar - 1)
        else:
            rdata = opt_start + 11
            options = _options(reply, rdata, opt_end)
            echoed = [(start, stop) for code, start, stop in options if code == OPTION_CODE]
            opt = reply[opt_start:opt_end]
            if echoed:
                first = echoed[0][0]
                back = _echo(added.original, reply[first:echoed[0][1]]) if added.kind is _REPLACED else b""
                body = b"".join(back if start == first else reply[start:stop]
                                for code, start, stop in options if code != OPTION_CODE or start == first)
                opt = reply[opt_start:rdata - 2] + _U16.pack(len(body)) + body
                reply = _splice(reply, opt_start, opt_end, opt, after, ar)
    if len(reply) <= client_payload:
        return reply
    # As a server truncates: TC set, the question, and the OPT record if the
    # client sent one (unless even that would not fit).
    if question_end + len(opt) > client_payload:
        opt = b""
    flags = bytes((reply[2] | 0x02, reply[3]))
    return reply[:2] + flags + reply[4:6] + b"\x00\x00\x00\x00" + _U16.pack(1 if opt else 0) + \
        reply[12:question_end] + opt


def _walk(packet: bytes, pos: int, an_ns: int, ar: int) -> tuple[int, int, int, int, int]:
    """Walk the records from ``pos``: (where they end, OPT start, OPT end,
    records after the OPT, type of the last record); the OPT's are -1 when
    there is none in the additional section."""
    size = len(packet)
    opt_start = opt_end = -1
    after = rtype = 0
    total = an_ns + ar
    for index in range(total):
        start = pos
        pos = wire.skip_name(packet, pos)
        if pos + 10 > size:
            raise WireError("record runs past the end of the message")
        rtype = packet[pos] << 8 | packet[pos + 1]
        pos += 10 + (packet[pos + 8] << 8 | packet[pos + 9])
        if pos > size:
            raise WireError("record data runs past the end of the message")
        if rtype == wire.TYPE_OPT and index >= an_ns:
            if opt_start >= 0:
                raise WireError("more than one OPT record")
            opt_start, opt_end, after = start, pos, total - index - 1
    return pos, opt_start, opt_end, after, rtype


def _options(packet: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """The options in the OPT RDATA from ``pos`` to ``end``: (code, start, end) each."""
    options = []
    while pos < end:
        if pos + 4 > end:
            raise WireError("EDNS option runs past the end of the OPT record")
        stop = pos + 4 + (packet[pos + 2] << 8 | packet[pos + 3])
        if stop > end:
            raise WireError("EDNS option runs past the end of the OPT record")
        options.append((packet[pos] << 8 | packet[pos + 1], pos, stop))
        pos = stop
    return options


def _echo(original: bytes, echoed: bytes) -> bytes:
    """The client's own ECS option as the reply's, with the scope decided in
    the module's docstring."""
    if len(original) < 8:  # not an ECS option the client could read a scope from: as it sent it
        return original
    scope = original[6] if len(echoed) >= 8 and echoed[7] else 0
    return original[:7] + bytes((scope,)) + original[8:]


def _splice(packet: bytes, start: int, end: int, new: bytes, after: int, ar: int) -> bytes:
    """``packet`` with the record at ``start:end`` replaced by ``new`` and
    ARCOUNT set to ``ar``.

    A name after the record may be compressed to a pointer at a name that is
    also after it (a server may write the OPT record anywhere in the
    additional section): such pointers move with what they point at. Only
    the names of the ``after`` records that follow are read, owner names and
    the RDATA names of the types that may be compressed; pointers point back
    (dnspython rejects any other), so nothing before ``end`` points past it.
    """
    delta = len(new) - (end - start)
    out = bytearray(packet[:10])
    out += _U16.pack(ar)
    out += packet[12:start]
    out += new
    out += packet[end:]
    if not delta or not after:
        return bytes(out)
    pos = end
    for _ in range(after):
        pos = _move_pointer(packet, pos, len(packet), start, end, delta, out)
        rtype = packet[pos] << 8 | packet[pos + 1]
        rdata = pos + 10
        pos = rdata + (packet[pos + 8] << 8 | packet[pos + 9])
        names = _RDATA_NAMES.get(rtype)
        if names is not None:
            at = rdata + names[0]
            for _ in range(names[1]):
                if at >= pos:
                    raise WireError("RDATA shorter than its names")
                at = _move_pointer(packet, at, pos, start, end, delta, out)
    return bytes(out)


def _move_pointer(packet: bytes, pos: int, limit: int, start: int, end: int, delta: int, out: bytearray) -> int:
    """Where the name at ``pos`` ends. If it ends in a pointer past ``end``,
    the pointer is rewritten in ``out`` (where the name now is ``delta``
    bytes away) to where its target moved."""
    while True:
        if pos >= limit:
            raise WireError("name runs past the end of its record")
        length = packet[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > limit:
                raise WireError("name runs past the end of its record")
            target = (length & 0x3F) << 8 | packet[pos + 1]
            if target >= end:
                target += delta
                if target > 0x3FFF:
                    raise WireError("a moved name is out of a pointer's reach")
                out[pos + delta] = 0xC0 | target >> 8
                out[pos + delta + 1] = target & 0xFF
            elif target >= start:
                raise WireError("a name points into the OPT record")
            return pos + 2
        if length > 63:
            raise WireError("invalid label type")
        pos += length + 1
