"""Just enough of the DNS wire format for the packet path.

A worker must not pay for a full dnspython parse per packet: it reads the
header and the question straight from the bytes and forwards the bytes it
got. Its own answers echo the query's ID, opcode, RD and question bytes and
add a fixed OPT record, so they are written directly too: importing
dnspython's message module for that would cost every worker about 10 MB,
a quarter of its memory budget. The tests check them with dnspython.
"""
from __future__ import annotations

import struct

from .errors import WireError

HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
RR_FIXED = _RR_FIXED  # for the modules that walk records themselves (cache.py)

# Response codes the router answers with itself.
FORMERR, SERVFAIL, NOTIMP, REFUSED = 1, 2, 4, 5
OPCODE_NOTIFY = 4

TYPE_SOA = 6
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252

# The router answers with this EDNS buffer size (the DNS flag day 2020 value).
ANSWER_PAYLOAD = 1232

# Bytes that appear in a name's presentation format as they are; any other
# byte is escaped by dnspython (\. \\ \DDD ...), which the slow path does.
# The compiled packet path builds its table of them from this one.
PLAIN = bytes(c for c in range(0x21, 0x7F) if chr(c) not in '"().;\\@$')


def parse_question(packet: bytes, offset: int = 12) -> tuple[bytes, int, int, int]:
    """The question at ``offset``: (name in wire format, qtype, qclass, end).

    The name must be uncompressed: a query's question is the first name of
    the message, so there is nothing earlier it could point to.
    """
    end = len(packet)
    start = pos = offset
    while True:
        if pos >= end:
            raise WireError("question name runs past the end of the packet")
        length = packet[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            raise WireError("compressed or invalid label in the question name")
        pos += length + 1
    if pos - start > 255:
        raise WireError("question name longer than 255 bytes")
    if pos + 4 > end:
        raise WireError("question type and class run past the end of the packet")
    qtype, qclass = _TYPE_CLASS.unpack_from(packet, pos)
    return packet[start:pos], qtype, qclass, pos + 4


def check_query(packet: bytes) -> tuple[int, tuple[bytes, int, int] | None, int, bytes]:
    """What the router makes of a query (at least 12 bytes, QR clear).

    For one it routes: (0, (qname, qtype, qclass), end of the question,
    key), where the key is the question as replies are checked against it
    and routes are cached by: the name lower-cased, type and class as they
    came. For one it answers itself: (the rcode, the question to echo or
    None, end or 0, b""). The compiled path takes exactly the queries this
    routes (``_fastpath.classify``, tested against this function).
    """
    question = None
    try:
        qname, qtype, qclass, end = parse_question(packet)
        question = (qname, qtype, qclass)
    except WireError:
        end = 0
    if (packet[2] >> 3) & 0xF:  # opcode
        return NOTIMP, question, end, b""
    if packet[4] or packet[5] != 1 or question is None:  # QDCOUNT must be 1
        return FORMERR, question if packet[5] == 1 and not packet[4] else None, end, b""
    if qtype == TYPE_AXFR or qtype == TYPE_IXFR:
        return NOTIMP, question, end, b""
    # The name's case is the client's; its type is not: 65 is no 97.
    return 0, question, end, packet[12:end - 4].lower() + packet[end - 4:end]


def name_to_text(wire: bytes) -> str:
    """Presentation format with the trailing dot, escaped as dnspython does."""
    labels = []
    pos = 0
    while wire[pos]:
        length = wire[pos]
        labels.append(wire[pos + 1:pos + 1 + length])
        pos += length + 1
    if not labels:
        return "."
    if not b"".join(labels).translate(None, PLAIN):
        return b".".join(labels).decode("ascii") + "."
    import dns.name  # only for names that need escaping: rare, and dnspython knows the rules

    return dns.name.Name(labels + [b""]).to_text()


def skip_name(packet: bytes, pos: int) -> int:
    """The offset after the (possibly compressed) name at ``pos``."""
    end = len(packet)
    while pos < end:
        length = packet[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length > 63:
            raise WireError("invalid label type")
        pos += length + 1
    raise WireError("name runs past the end of the packet")


def find_opt(packet: bytes, offset: int | None = None) -> tuple[int, int] | None:
    """(start, end) of the OPT record in the additional section, or None.

    ``offset`` is where the question ends, when the caller knows it.
    """
    _, _, qd, an, ns, ar = HEADER.unpack_from(packet)
    if not ar:
        return None
    pos = 12
    if offset is None:
        for _ in range(qd):
            pos = skip_name(packet, pos) + 4
    else:
        pos = offset
    for index in range(an + ns + ar):
        start = pos
        pos = skip_name(packet, pos)
        if pos + 10 > len(packet):
            raise WireError("record runs past the end of the packet")
        rtype, _, _, rdlength = _RR_FIXED.unpack_from(packet, pos)
        pos += 10 + rdlength
        if pos > len(packet):
            raise WireError("record data runs past the end of the packet")
        if index >= an + ns and rtype == TYPE_OPT:
            return start, pos
    return None


def has_opt(packet: bytes, offset: int) -> bool:
    """Whether the query carries EDNS (a malformed tail counts as no)."""
    try:
        return find_opt(packet, offset) is not None
    except (WireError, struct.error):
        return False


_OPT_65535 = b"\x00\x00\x29\xff\xff\x00\x00\x00\x00\x00\x00"


def with_large_buffer(query: bytes, offset: int) -> tuple[bytes, bool]:
    """The query with an EDNS buffer of 65535, and whether an OPT was added.

    Used for TCP clients, whose answer may be as large as DNS allows. An OPT
    is only appended to a query without additional records: anything there
    (a TSIG) must stay last.
    """
    ar = query[10] << 8 | query[11]
    if ar == 0:
        return query[:10] + b"\x00\x01" + query[10 + 2:] + _OPT_65535, True
    if ar > 1:
        return query, False  # OPT and a TSIG: the signature covers the buffer size
    try:
        opt = find_opt(query, offset)
    except (WireError, struct.error):
        return query, False
    if opt is None:
        return query, False
    start = opt[0] + 3  # root name, type: the class field is the buffer size
    return query[:start] + b"\xff\xff" + query[start + 2:], False


def without_opt(reply: bytes) -> bytes:
    """The reply without its OPT record (the one the router added)."""
    opt = find_opt(reply)
    if opt is None:
        return reply
    ar = (reply[10] << 8 | reply[11]) - 1
    return reply[:10] + bytes((ar >> 8, ar & 0xFF)) + reply[12:opt[0]] + reply[opt[1]:]


def make_answer(query: bytes, rcode: int, question: tuple[bytes, int, int] | None,
                edns: bool, authoritative: bool = False) -> bytes:
    """The router's own answer: the ID, opcode, RD and question echoed.

    ``question`` is (name in wire format, qtype, qclass), or None when the
    question did not parse; ``edns`` adds an OPT record; ``authoritative``
    sets AA (the answer to a NOTIFY, RFC 1996 section 4.7).
    """
    flags = 0x80 | (query[2] & 0x79) | (0x04 if authoritative else 0)  # QR, the opcode, RD; TC clear
    counts = HEADER.pack(0, 0, question is not None, 0, 0, edns)[4:]
    body = b"" if question is None else question[0] + _TYPE_CLASS.pack(question[1], question[2])
    return query[:2] + bytes((flags, rcode & 0xF)) + counts + body + (_OPT_ANSWER if edns else b"")


_OPT_ANSWER = b"\x00\x00\x29" + ANSWER_PAYLOAD.to_bytes(2, "big") + b"\x00" * 6
