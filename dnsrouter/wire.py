"""Just enough of the DNS wire format for the packet path.

A worker must not pay for a full dnspython parse per packet: it reads the
header and the question straight from the bytes and forwards the bytes it
got. dnspython builds the answers the router makes itself (rare, so cost is
no concern there, and correctness is dnspython's job).
"""
from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rrset

from .errors import WireError

HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength

QR = 0x8000
TC = 0x0200
RD = 0x0100
OPCODE_SHIFT = 11
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252

# The router answers with this EDNS buffer size (the DNS flag day 2020 value).
ANSWER_PAYLOAD = 1232

# Bytes that appear in a name's presentation format as they are; any other
# byte is escaped by dnspython (\. \\ \DDD ...), which the slow path does.
_PLAIN = bytes(c for c in range(0x21, 0x7F) if chr(c) not in '"().;\\@$')


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
    if not b"".join(labels).translate(None, _PLAIN):
        return b".".join(labels).decode("ascii") + "."
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
                edns: bool) -> bytes:
    """The router's own answer: the ID, opcode, RD and question echoed.

    ``question`` is (name in wire format, qtype, qclass), or None when the
    question did not parse; ``edns`` adds an OPT record.
    """
    qid, flags = query[0] << 8 | query[1], query[2] << 8 | query[3]
    message = dns.message.Message(id=qid)
    message.flags = dns.flags.QR | (flags & RD)
    message.set_opcode((flags >> OPCODE_SHIFT) & 0xF)
    message.set_rcode(rcode)
    if question is not None:
        name, qtype, qclass = question
        message.question.append(
            dns.rrset.RRset(dns.name.from_wire(name, 0)[0], qclass, qtype))
    if edns:
        message.use_edns(0, payload=ANSWER_PAYLOAD)
    return message.to_wire()
