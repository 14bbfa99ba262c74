"""Coverage-guided fuzzing (atheris/libFuzzer) of the parsers that see hostile bytes.

    .venv/bin/python tests/fuzz_wire.py -max_total_time=60 [CORPUS_DIR...]

Each input is fed to the wire-format helpers of the packet path
(``parse_question``, ``find_opt``, ``with_large_buffer``, ``without_opt``,
and on a parsed question ``name_to_text`` and ``make_answer``, which the
worker calls next), to the compiled path's ``classify`` and ``decide``
(which must decide as the Python path does, its own answers byte for byte) and to the registry value parser ``parse_value``. They
may refuse an input with their own error (``WireError``,
``ValueParseError``) and nothing else: any other exception escapes and
libFuzzer reports it as a crash (exit code non-zero, the input saved as
``crash-<sha1>`` under ``-artifact_prefix``). The harness also checks a few
invariants the worker relies on (a parsed question lies inside the packet,
a router answer parses and echoes the ID and question).

Not collected by pytest (the file name does not start with ``test_``);
``tests/test_fuzz.py`` runs it as a subprocess for a bounded time.
"""
from __future__ import annotations

import sys

import atheris

# Instrument only our own code: coverage feedback from dnspython's internals
# would steer the fuzzer towards them instead of towards our parsers.
with atheris.instrument_imports(include=["dnsrouter"]):
    from dnsrouter import wire
    from dnsrouter.errors import ValueParseError, WireError
    from dnsrouter.routes import parse_value
    from dnsrouter.workers import fastpath

# The compiled packet path (workers/_fastpath.pyx) sees the same bytes; the
# harness holds it to the Python path's decisions. It is not instrumented
# (coverage comes from the Python side); scripts/asan.sh runs this harness
# against a build with AddressSanitizer.
COMPILED, WHY = fastpath.load()

import dns.message
import dns.rcode

HEADER = 12

# The worker drops a datagram shorter than a header before it calls any of
# these (forwarder._handle, upstream.serve: len(data) < 12), and has_opt()
# catches struct.error itself; so the header-reading helpers are only held to
# their contract on inputs of at least 12 bytes.


def check_packet(packet: bytes) -> None:
    try:
        qname, qtype, qclass, end = wire.parse_question(packet)
    except WireError:
        parsed = None
    else:
        parsed = (qname, qtype, qclass)
        assert HEADER < end <= len(packet), (end, len(packet))
        assert 1 <= len(qname) <= 255 and qname.endswith(b"\x00"), qname
        assert packet[HEADER:end - 4] == qname
        # What the worker does with every parsed name: match it, maybe log it.
        text = wire.name_to_text(qname.lower())
        assert text.endswith("."), text

    # What the compiled path takes is what the Python path routes: the
    # worker's own decision (wire.check_query) for a query the worker reads
    # at all (a header, QR clear).
    expected = None
    if len(packet) >= HEADER and not packet[2] & 0x80:
        rcode, _, routed_end, key = wire.check_query(packet)
        if rcode == 0:
            expected = (routed_end, key)
    assert COMPILED.classify(packet) == expected, (COMPILED.classify(packet), expected)
    # And what it makes of the rest, in C: the same drop or answer, byte for
    # byte (no ACL, NOTIFY from nobody, no route for any name).
    decided = COMPILED.decide(packet, PEER, routed=False)
    assert decided == python_decides(packet), (decided, python_decides(packet))

    if len(packet) < HEADER:
        return

    for offset in ((None, end) if parsed else (None,)):
        try:
            opt = wire.find_opt(packet, offset)
        except WireError:
            continue
        if opt is not None:
            start, stop = opt
            assert HEADER <= start < stop <= len(packet), (opt, len(packet))

    try:
        wire.without_opt(packet)
    except WireError:
        pass

    if parsed:
        # with_large_buffer only ever sees queries whose question parsed; it
        # swallows WireError itself (a query it cannot vouch for is left alone).
        bigger, added = wire.with_large_buffer(packet, end)
        if added:
            assert bigger[:10] == packet[:10] and len(bigger) == len(packet) + 11

    # The router's own answers (FORMERR, NOTIMP, SERVFAIL) for this query:
    # make_answer must not fail for any question parse_question accepted,
    # since the timer thread calls it for backend timeouts too.
    for question in ((None, parsed) if parsed else (None,)):
        for edns in (False, True):
            answer = wire.make_answer(packet, dns.rcode.SERVFAIL, question, edns)
            assert answer[:2] == packet[:2] and answer[2] & 0x80, answer[:4]
            assert len(answer) <= 512, len(answer)
            if question is not None:
                assert answer[4:6] == b"\x00\x01"
                assert answer[HEADER:HEADER + len(qname) + 4] == packet[HEADER:end]


PEER = bytes(16)  # a raw IPv4 peer address (0.0.0.0)


def python_decides(packet: bytes) -> tuple[str, object]:
    """What Forwarder._handle does with a datagram while no route matches,
    no ACL is set and no NOTIFY is allowed, from wire's own functions."""
    if len(packet) < HEADER:
        return "drop", "short"
    if packet[2] & 0x80:
        return "drop", "response"
    rcode, question, end, _ = wire.check_query(packet)
    if rcode == wire.NOTIMP and (packet[2] >> 3) & 0xF == wire.OPCODE_NOTIFY:
        rcode = wire.FORMERR if question is None or packet[4] or packet[5] != 1 else wire.REFUSED
    elif not rcode:
        rcode = wire.SERVFAIL
    return "answer", wire.make_answer(packet, rcode, question, bool(end) and wire.has_opt(packet, end))


def check_value(data: bytes) -> None:
    for value in (data, data.decode("utf-8", "surrogateescape"), data.decode("latin-1")):
        try:
            parsed = parse_value(value)
        except ValueParseError:
            continue
        assert 1 <= parsed.backend.port <= 65535
        assert parsed.pattern


def TestOneInput(data: bytes) -> None:
    # The first byte picks the target, so one corpus serves both parsers
    # and the fuzzer learns the split from coverage.
    if not data:
        return
    if data[0] & 1:
        check_value(data[1:])
    else:
        check_packet(data[1:])


def seeds() -> list[bytes]:
    """Inputs to start from: real queries and values (written by test_fuzz.py)."""
    out = []
    for name, rdtype, kw in [
        ("www.example.test.", "A", {}),
        ("a.b.c.test.", "AAAA", {"use_edns": 0, "payload": 4096}),
        ("x.test.", "AXFR", {}),
        ("x.test.", "TXT", {"use_edns": 0, "payload": 512, "want_dnssec": True}),
        ("id.server.", "TXT", {"rdclass": "CH"}),
    ]:
        rdclass = kw.pop("rdclass", "IN")
        q = dns.message.make_query(name, rdtype, rdclass, **kw)
        out.append(b"\x00" + q.to_wire())
        r = dns.message.make_response(q)
        out.append(b"\x00" + r.to_wire())
    for value in ["127.0.0.1:5300,\\.test\\.$", "[::1]:53,^a,b$", "10.0.0.1:0,x",
                  "host:53,x", "1.2.3.4:53,(", "1.2.3.4:53"]:
        out.append(b"\x01" + value.encode())
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--write-seeds":
        import hashlib
        import os
        directory = sys.argv[2]
        os.makedirs(directory, exist_ok=True)
        for seed in seeds():
            with open(os.path.join(directory, hashlib.sha1(seed).hexdigest()), "wb") as f:
                f.write(seed)
        sys.exit(0)
    if COMPILED is None:
        sys.exit(f"the compiled packet path is not built ({WHY}): the harness checks it against the Python path")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
