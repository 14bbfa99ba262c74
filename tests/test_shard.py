"""dnsrouterctl shard: one zone, signed or not, split over N Knots behind the router.

The acceptance test of sharding: the router in front of the shards must
answer every question as one Knot serving the whole zone does. For a signed
zone every answer through the router must validate (delv, from the zone's
own KSK) as the whole zone's does: the same verdict, the same kind (answer,
NXDOMAIN, NODATA), the same RRsets; for the unsigned zone (and for
referrals, which delv cannot follow) the same rcode and sections
(dnspython). Each shard must also load in Knot and in BIND's checker, and
route exactly the names it holds.

    dnsrouterctl [--routes-dir D] shard ZONEFILE --origin ZONE --shards N --out DIR [--register ADDR:PORT ...]
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

from dnsrouter import wire
from dnsrouter.routes import compile_set
from support import delv
from support.dnssec import SignedZone, check_zone, nsd_check_zone, sign
from support.knot import KnotServer
from support.net import HOST, free_port, wait_until
from support.processes import program
from support.zones import zone_text

pytestmark = pytest.mark.system

ORIGIN = "shard.test."
APEX = dns.name.from_text(ORIGIN)
SHARDS = 3
SERIAL = 2024060101  # the placeholder zone the shard Knots start with has serial 1
LINE = re.compile(r"^(?P<path>\S+) (?P<bytes>\d+) bytes (?P<names>\d+) names (?P<regexp>.+)$")

# -- the zone ----------------------------------------------------------------

# Labels directly below the apex (zone file text): the shards split these.
PLAIN = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
         "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]
ODD = [r"\032lead", r"sp\032ace", r"dot\.ted", r"back\\slash", r"\255",
       r"\255\255end", r"hi\255", r"\127del", r"at\@", r"\$dollar", r"paren\(\)", r"semi\;", r"quote\"",
       r"\!bang", r"\{brace\}", r"\~", "a+b", "c:d", "e=f",  # Knot's parser takes them only escaped
       "MiXeD", "UPPER", "CamelCase", "0", "00", "1", "9z", "-x", "x-", "_srv", "a", "aa", "ab",
       "zz", "zzz", "l" * 63, "m" * 62 + r"\255"]
# Labels with octets 0: in the unsigned zone only. Knot (3.2) sorts "a\000" between "a" and
# the names below "a" (its tree's keys end each label with an octet 0), so its NSEC proofs
# near such names are wrong: the whole signed zone's own answers there fail validation
# (delv: "broken trust chain"), whatever the shards do.
ZERO = [r"\000", r"\000\000", r"a\000"]
# A name of 253 octets (3 x 64 + 49 + 12 for "shard.test."): the longest whose wildcard
# ("*." before it, 255 octets) is a name too, as NSEC3 signing needs.
LONGEST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 48])
DS = "12345 13 2 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


def zone_source(*, apex_wildcard: bool, zero: bool, seed: int = 1) -> str:
    """The test zone (relative names under $ORIGIN): a few hundred names below
    some sixty labels, delegations (signed with DS and glue, unsigned, deep),
    empty non-terminals, wildcards, odd labels, the longest name."""
    rng = random.Random(seed)
    counter = iter(range(1, 1 << 20))

    def a() -> str:
        n = next(counter)
        return f"A 10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"

    def record(kind: str) -> str:
        n = next(counter)
        return {
            "A": a(),
            "AAAA": f"AAAA 2001:db8::{n:x}",
            "TXT": rng.choice([f'TXT "t-{n}"', f'TXT "semi;colon {n}" "two words"', f'3600 TXT "long ttl {n}"']),
            "MX": rng.choice([f"MX {n % 50} mail.zulu", f"MX {n % 50} mx.example.net."]),
            "SRV": f"SRV 0 {n % 100} 53 ns1",
            "CAA": f'CAA 0 issue "ca{n}.example"',
        }[kind]

    lines = [
        "$TTL 300",
        f"@ SOA ns1 hostmaster {SERIAL} 3600 900 604800 300",
        "@ NS ns1",
        "@ NS ns2.zulu",
        '@ TXT "apex"',
        "@ MX 10 mail.zulu",
        "ns1 A 127.0.0.1",
        "ns1 AAAA ::1",
        "ns2.zulu A 127.0.0.2",
        "mail.zulu " + a(),
        # A signed delegation with glue below it, an unsigned one out of the
        # zone, one to the zone's own servers, and one a level deeper.
        "sub NS ns.sub",
        f"sub DS {DS}",
        "ns.sub A 127.0.0.1",
        "ns.sub AAAA ::1",
        "ins NS ns.elsewhere.example.",
        "deleg2 NS ns1",
        "deleg2 NS ns2.zulu",
        "d.x NS ns.d.x",
        f"d.x DS {DS}",
        "ns.d.x A 127.0.0.2",
        "h1.x " + a(),
        # Empty non-terminals: c and b.c hold nothing; so does er.h1.alpha.
        'a.b.c TXT "below two empty non-terminals"',
        "deep.er.h1.alpha " + a(),
        # A wildcard below the apex, with an exact name beside it.
        "*.w A 10.255.0.1",
        '*.w TXT "wild"',
        "explicit.w A 10.255.0.2",
        LONGEST + ' TXT "the longest name"',
        r"\255\255\255\255\255\255\255\255.l" + "l" * 62 + " " + a(),
    ]
    if apex_wildcard:
        lines += ["* A 10.254.0.1", '* TXT "apex wildcard"']
    for label in PLAIN + ODD + (ZERO if zero else []):
        if rng.random() < 0.5:
            lines += [f"{label} {a()}", f"{label} {record('TXT')}"]
        for i in range(1, rng.randint(1, 8) + 1):
            host = f"h{i}.{label}"
            kinds = rng.sample(["A", "AAAA", "TXT", "MX", "SRV", "CAA"], rng.randint(1, 3))
            lines += [f"{host} {record(kind)}" for kind in kinds]
        if rng.random() < 0.2:
            lines.append(f"Host.Mixed.{label} {a()}")
    return "\n".join([f"$ORIGIN {ORIGIN}", *lines]) + "\n"


@dataclass
class Facts:
    """What the (unsigned) zone holds, read back with dnspython."""

    zone: dns.zone.Zone
    owners: dict[dns.name.Name, set[int]]  # name -> its types
    cuts: list[dns.name.Name]  # delegation points
    ents: list[dns.name.Name]
    labels: list[bytes]  # lower-cased labels directly below the apex, in canonical order

    @classmethod
    def of(cls, text: str) -> "Facts":
        zone = dns.zone.from_text(text, ORIGIN, relativize=False)
        owners = {name: {r.rdtype for r in node.rdatasets} for name, node in zone.nodes.items()}
        cuts = [n for n, types in owners.items() if n != APEX and dns.rdatatype.NS in types]
        ents = set()
        for name in owners:
            if name == APEX:
                continue
            parent = name.parent()
            while parent != APEX and parent not in owners:
                ents.add(parent)
                parent = parent.parent()
        labels = sorted({n.relativize(APEX).labels[-1].lower() for n in [*owners, *ents] if n != APEX})
        return cls(zone, owners, cuts, sorted(ents), labels)

    def at_or_below_cut(self, name: dns.name.Name) -> bool:
        return any(name.is_subdomain(cut) for cut in self.cuts)


# Printable octets Knot's zone parser (3.2) refuses in a name unless escaped, though
# dnspython and BIND write them as they are: !#%&'+,:<=>?[]^`{|}~
def knot_text(text: str) -> str:
    """A zone file as Knot reads it, for the whole zone: every octet of an owner name but
    letters, digits, "-", "_" and a wildcard's "*" as \\DDD, every rdata in RFC 3597's
    generic form (\\# length hex), so no name in rdata needs escaping either."""
    zone = dns.zone.from_text(text, ORIGIN, relativize=False)
    keep = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")

    def owner(name: dns.name.Name) -> str:
        return "".join((label.decode() if label == b"*" else "".join(
            chr(o) if o in keep else f"\\{o:03d}" for o in label)) + "." for label in name.labels[:-1]) or "."

    lines = []
    for name, node in zone.nodes.items():
        for rdataset in node.rdatasets:
            for rdata in rdataset:
                data = rdata.to_wire()
                lines.append(f"{owner(name)} {rdataset.ttl} IN {dns.rdatatype.to_text(rdataset.rdtype)} "
                             f"\\# {len(data)} {data.hex() or ''}".rstrip())
    return "\n".join(lines) + "\n"


def name_of(*labels: bytes) -> dns.name.Name:
    return dns.name.Name(labels + APEX.labels)


def before(label: bytes) -> bytes | None:
    """A label just before ``label`` in canonical order (None: nothing is)."""
    if label[-1] == 0:
        return label[:-1] or None
    last = label[-1] - 1
    if 0x41 <= last <= 0x5A:  # an upper-case octet is a lower-case one in canonical order
        last = 0x40
    return (label[:-1] + bytes([last]) + b"\xff")[:63]


def after(label: bytes, zero: bool) -> bytes:
    """A label just after ``label`` and all its subtree (zero: ``label`` and an octet 0)."""
    if len(label) < 63:
        return label + (b"\x00" if zero else b"\x01")
    return label[:-1] + bytes([min(label[-1] + 1, 255)])


def scramble(rng: random.Random, name: dns.name.Name) -> str:
    """name's text with the case of its letters flipped at random (escapes stay as they are)."""
    return "".join(c.swapcase() if c.isalpha() and rng.random() < 0.5 else c for c in name.to_text())


@dataclass
class Queries:
    validated: list[tuple[str, str]]  # delv can follow these: at or above every zone cut (and DS at one)
    referrals: list[tuple[str, str]]  # at or below a zone cut: compared with dnspython only


def queries(facts: Facts, shard_of, *, zero: bool, seed: int = 2) -> Queries:
    """Some 350 questions: existing names, names missing (under empty non-terminals, deep
    below names, either side of the labels below the apex, most of all where one shard's
    range ends and the next one's begins), types missing, names the wildcards answer,
    delegations' DS, the apex. shard_of(name): the shard a name routes to. zero: names may
    hold octets 0."""
    rng = random.Random(seed)
    out: list[tuple[dns.name.Name | str, str]] = []
    types = ["A", "AAAA", "TXT", "MX", "SRV", "CAA"]

    def have(name: dns.name.Name) -> list[str]:
        return sorted(dns.rdatatype.to_text(t) for t in facts.owners[name])

    owners = [n for n in facts.owners if n != APEX and not facts.at_or_below_cut(n)]
    # Existing names: every one directly below the apex or with an odd octet, and more.
    odd = [n for n in owners if len(n) == len(APEX) + 1 or not all(
        label.isalnum() or label in (b"*",) for label in n.relativize(APEX).labels)]
    for name in dict.fromkeys(odd + rng.sample(owners, 90)):
        out.append((name, rng.choice(have(name))))
    for name in rng.sample(owners, 40):  # NODATA: a type it lacks
        out.append((name, rng.choice([t for t in types if t not in have(name)] or ["HINFO"])))
    for name in rng.sample(owners, 20):  # case does not matter
        out.append((scramble(rng, name), rng.choice(have(name))))
    ents = [e for e in facts.ents if not facts.at_or_below_cut(e)]
    for ent in [e for e in ents if len(e) > len(APEX) + 1] + rng.sample(ents, 10):
        out += [(ent, "A"), (dns.name.Name((b"nx",) + ent.labels), "A")]  # NODATA, NXDOMAIN below
    for name in rng.sample(owners, 20):  # NXDOMAIN deep below existing names
        if len(name.to_wire()) < 230 and name.labels[0] != b"*":
            out.append((dns.name.Name((b"nx", b"deeper") + name.labels), rng.choice(types)))
    # Either side of the labels below the apex: all where the shards meet, some elsewhere.
    labels = facts.labels
    edges = {0, len(labels) - 1} | {i for i in range(len(labels))
                                   if i + 1 < len(labels) and shard_of(name_of(labels[i])) !=
                                   shard_of(name_of(labels[i + 1]))}
    edges |= {i + 1 for i in edges if i + 1 < len(labels)}
    assert len(edges) >= 2 * (SHARDS - 1), f"the shards do not meet where expected: {sorted(edges)}"
    for i in sorted(edges) + rng.sample(range(len(labels)), 12):
        label = labels[i]
        for edge in (before(label), after(label, zero)):
            if edge is not None:
                out.append((name_of(edge), "A"))
        out.append((name_of(b"nx", label), "TXT"))
    for i in range(12):
        out.append((name_of(f"nx-{rng.getrandbits(32):08x}".encode()), rng.choice(types)))
    out += [(name_of(b"\xff\xff\xff"), "A"), (name_of(b"\x01"), "A")]
    if zero:
        out += [(name_of(b"\x00", b"\x00"), "A"), (name_of(b"\x00\x00\x00"), "A")]
    # The wildcard below the apex answers, and says NODATA for the types it lacks.
    for i in range(12):
        out.append((f"q{i}.w.{ORIGIN}" if i % 3 else f"a.b{i}.W.{ORIGIN}", rng.choice(["A", "TXT", "MX"])))
    out += [(f"w.{ORIGIN}", "A"), (f"explicit.w.{ORIGIN}", "A"), (f"explicit.w.{ORIGIN}", "TXT"),
            (f"nx.explicit.w.{ORIGIN}", "A"), (f"*.w.{ORIGIN}", "A")]
    # The apex, and the delegations' DS (the parent's answer, which validates).
    out += [(ORIGIN, t) for t in ["SOA", "NS", "TXT", "MX", "A", "AAAA", "DNSKEY", "NSEC3PARAM"]]
    out += [(cut, "DS") for cut in facts.cuts]
    # At and below the zone cuts: referrals.
    referrals = [(f"{prefix}{cut}", t) for cut in facts.cuts for prefix, t in
                 [("", "A"), ("", "NS"), ("x.", "TXT"), ("ns.", "A"), ("*.", "A")]]
    validated = []
    for name, rdtype in out:
        name = dns.name.from_text(name) if isinstance(name, str) else name
        below = facts.at_or_below_cut(name) and not (rdtype == "DS" and name in facts.cuts)
        (referrals if below else validated).append((name.to_text(), rdtype))
    return Queries(list(dict.fromkeys(validated)), list(dict.fromkeys(referrals)))


# -- the command -------------------------------------------------------------

def ctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(program("dnsrouterctl")), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class ShardOutput:
    path: str
    bytes: int
    names: int
    regexp: str


def run_shard(zone_path: Path, out: Path, routes: Path, addresses: list[str],
              shards: int = SHARDS) -> list[ShardOutput]:
    args = ["--routes-dir", str(routes), "shard", str(zone_path), "--origin", ORIGIN,
            "--shards", str(shards), "--out", str(out)]
    for address in addresses:
        args += ["--register", address]
    done = ctl(*args)
    assert done.returncode == 0, f"dnsrouterctl {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    # One line per shard, first; then maybe more (what NSEC3 costs, what was registered).
    lines = done.stdout.splitlines()[:shards]
    assert len(lines) == shards, f"one line per shard expected:\n{done.stdout}"
    printed = []
    for k, line in enumerate(lines):
        m = LINE.match(line)
        assert m, f"not 'OUT/k.zone <bytes> bytes <n> names <regexp>': {line!r}"
        assert m["path"] == os.path.join(str(out), f"{k}.zone"), line
        printed.append(ShardOutput(m["path"], int(m["bytes"]), int(m["names"]), m["regexp"]))
    return printed


def route_values(routes: Path) -> list[str]:
    return sorted(p.read_text().strip() for p in routes.iterdir() if not p.name.startswith("."))


def router_text(name: dns.name.Name) -> str:
    """The text the router matches: the lower-cased wire name in presentation format."""
    return wire.name_to_text(name.canonicalize().to_wire())


def check_shard_files(whole: dns.zone.Zone, signed: str, printed: list[ShardOutput]) -> list[dns.zone.Zone]:
    """Each file: a zone with absolute names, as printed; its apex complete; every name of
    the zone routed by exactly one regexp, to the shard holding all its records."""
    shards = []
    for k, p in enumerate(printed):
        data = Path(p.path).read_bytes()
        assert p.bytes == len(data), f"{p.path}: printed {p.bytes} bytes, has {len(data)}"
        for line in data.decode("ascii").splitlines():
            if line.strip() and not line.startswith((";", " ", "\t", "$")):
                owner = line.split()[0]
                assert owner.endswith("."), f"{p.path}: a relative name: {line!r}"
        zone = dns.zone.from_text(data.decode("ascii"), ORIGIN, relativize=False)
        assert p.names == len(zone.nodes), f"{p.path}: printed {p.names} names, has {len(zone.nodes)}"
        apex_types = {(r.rdtype, r.covers) for r in zone.nodes[APEX].rdatasets}
        need = {dns.rdatatype.SOA, dns.rdatatype.NS}
        if signed != "unsigned":
            need |= {dns.rdatatype.DNSKEY, dns.rdatatype.NSEC3PARAM if signed == "nsec3" else dns.rdatatype.NSEC}
        for t in need:
            assert (t, dns.rdatatype.NONE) in apex_types, f"{p.path}: no {dns.rdatatype.to_text(t)} at the apex"
            if signed != "unsigned":
                assert (dns.rdatatype.RRSIG, t) in apex_types, f"{p.path}: no RRSIG {dns.rdatatype.to_text(t)}"
        shards.append(zone)
    patterns = compile_set(p.regexp for p in printed)
    misrouted = []
    for name, node in whole.nodes.items():
        wanted = {(r.rdtype, r.covers): r for r in node.rdatasets}
        if all(dns.rdatatype.NSEC3 in t for t in wanted):  # the NSEC3 chain: in every shard
            lacking = [k for k, zone in enumerate(shards) if name not in zone.nodes or any(
                zone.nodes[name].get_rdataset(r.rdclass, r.rdtype, r.covers) != r for r in node.rdatasets)]
            if lacking:
                misrouted.append(f"{name} (NSEC3): not in shards {lacking}")
            continue
        matched = sorted(patterns.Match(router_text(name)) or ())
        if len(matched) != 1:
            misrouted.append(f"{name}: matched by the regexps of shards {matched}")
            continue
        held = shards[matched[0]].nodes.get(name)
        got = {} if held is None else {(r.rdtype, r.covers): r for r in held.rdatasets}
        missing = [f"{dns.rdatatype.to_text(t)}/{dns.rdatatype.to_text(c)}" for (t, c), r in wanted.items()
                   if got.get((t, c)) != r or got[(t, c)].ttl != r.ttl]
        if missing:
            misrouted.append(f"{name}: routed to shard {matched[0]}, which lacks or changed {missing}")
    for outside in ["test.", "example.com.", "xshard.test.", "alpha.shard.test.evil.", "shard.test.com."]:
        matched = patterns.Match(router_text(dns.name.from_text(outside))) or []
        if matched:
            misrouted.append(f"{outside} (not in the zone): matched by shards {sorted(matched)}")
    for k, zone in enumerate(shards):  # nothing a shard holds is not the zone's
        for name, node in zone.nodes.items():
            original = whole.nodes.get(name)
            for r in node.rdatasets:
                if original is None or original.get_rdataset(r.rdclass, r.rdtype, r.covers) != r:
                    misrouted.append(f"shard {k}: {name} {dns.rdatatype.to_text(r.rdtype)} is not the zone's")
    assert not misrouted, "\n".join(misrouted[:40])
    return shards


def placeholder() -> str:
    return zone_text(ORIGIN, [])  # serial 1: a shard loaded in its place has SERIAL


def load_shard(knot: KnotServer, path: str) -> None:
    """Put the shard in the place of the running Knot's zone; it must load."""
    text = Path(path).read_text()
    knot.zones[ORIGIN] = text
    with open(knot.zone_path(ORIGIN), "w") as f:
        f.write(text)
    try:
        knot.knotc("-b", "zone-reload", ORIGIN)
    except RuntimeError as e:
        log = knot.log_tail(12)
        lines = text.splitlines()
        bad = [f"  line {n}: {lines[int(n) - 1][:120]}" for n in dict.fromkeys(re.findall(r", line (\d+) ", log))
               if 0 < int(n) <= len(lines)][:5]
        raise AssertionError(f"Knot did not load {path}: {e}\n{log}" + "".join("\n" + b for b in bad)) from None

    def serial() -> bool:
        r = dns.query.udp(dns.message.make_query(ORIGIN, "SOA"), HOST, port=knot.port, timeout=1)
        return r.rcode() == dns.rcode.NOERROR and bool(r.answer) and r.answer[0][0].serial == SERIAL
    wait_until(serial, 5, message=f"Knot on {knot.addr} does not answer the SOA of {path}")


# -- comparing answers -------------------------------------------------------

def ask(port: int, name: str, rdtype: str, dnssec: bool) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, want_dnssec=dnssec, payload=4096 if dnssec else 1232)
    r = dns.query.udp(q, HOST, port=port, timeout=3)
    if r.flags & dns.flags.TC:
        r = dns.query.tcp(q, HOST, port=port, timeout=3)
    return r


def section(rrsets: list[dns.rrset.RRset]) -> frozenset:
    return frozenset((r.name.canonicalize(), r.rdtype, r.covers, r.ttl, frozenset(r)) for r in rrsets)


def message_view(r: dns.message.Message, referral: bool) -> tuple:
    view = (dns.rcode.to_text(r.rcode()), bool(r.flags & dns.flags.AA), section(r.answer))
    if referral:
        view += (section(r.authority), section([a for a in r.additional if a.rdtype != dns.rdatatype.OPT]))
    return view


def show(r: dns.message.Message) -> str:
    return "\n".join("      " + line for line in r.to_text().splitlines() if not line.startswith("id "))


def compare_messages(router_port: int, whole_port: int, todo: list[tuple[str, str]], *, referral: bool,
                     dnssec: bool) -> list[str]:
    differ = []
    for name, rdtype in todo:
        got, want = ask(router_port, name, rdtype, dnssec), ask(whole_port, name, rdtype, dnssec)
        if message_view(got, referral) != message_view(want, referral):
            differ.append(f"{name} {rdtype}:\n    through the router (shards):\n{show(got)}\n"
                          f"    the whole zone:\n{show(want)}")
    return differ


def expected(m: dns.message.Message) -> tuple:
    """What delv must say of a reply of the whole zone: (validated, kind, answer records)."""
    rcode = m.rcode()
    kind = ("nxdomain" if rcode == dns.rcode.NXDOMAIN else dns.rcode.to_text(rcode) if rcode != dns.rcode.NOERROR
            else "answer" if m.answer else "nodata")
    records = frozenset((rrset.name.canonicalize().to_wire(), int(rrset.rdtype), int(rrset.covers), rdata.to_digestable())
                        for rrset in m.answer for rdata in rrset) if kind == "answer" else frozenset()
    return (True, kind, records)


def compare_validated(router_port: int, whole_port: int, anchor: str, todo: list[tuple[str, str]]) -> list[str]:
    """delv through the router: every answer validates, and says what the whole zone says."""
    want = {q: ask(whole_port, q[0], q[1], True) for q in todo}
    got = delv.lookup_many(router_port, anchor, ORIGIN, todo)
    # The reference is sound: delv validates the whole zone's own answers (a sample: one
    # delv is some 20 ms of CPU), and they cover every kind of answer.
    sample = random.Random(3).sample(todo, 40)
    reference = delv.lookup_many(whole_port, anchor, ORIGIN, sample)
    unsound = [f"{n} {t}: {reference[(n, t)].describe()}" for n, t in sample
               if reference[(n, t)].outcome != expected(want[(n, t)])]
    assert not unsound, "the whole zone's answers do not validate as expected (a bug of this test):\n" + \
        "\n".join(unsound[:10])
    kinds = {k: sum(1 for m in want.values() if expected(m)[1] == k) for k in ("answer", "nxdomain", "nodata")}
    assert all(v >= 10 for v in kinds.values()), f"the questions do not cover every kind of answer: {kinds}"
    differ = []
    for q in todo:
        if got[q].outcome != expected(want[q]):
            differ.append(f"{q[0]} {q[1]}:\n    delv through the router (shards): {got[q].describe()}\n"
                          f"    the whole zone:\n{show(want[q])}")
    return differ


# -- the tests ---------------------------------------------------------------

VARIANTS = {
    # name: (signing, wildcard at the apex)
    "unsigned": ("unsigned", True),
    "nsec": ("nsec", False),
    "nsec-apex-wildcard": ("nsec", True),
    "nsec3": ("nsec3", False),
    "nsec3-apex-wildcard": ("nsec3", True),
}


def answered(port: int, name: str) -> bool:
    try:
        return ask(port, name, "SOA", False).rcode() != dns.rcode.SERVFAIL
    except (dns.exception.DNSException, OSError):
        return False


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_shards_behind_the_router_answer_as_the_whole_zone(variant, router, tmp_path):
    signed, apex_wildcard = VARIANTS[variant]
    zero = signed == "unsigned"
    source = zone_source(apex_wildcard=apex_wildcard, zero=zero)
    facts = Facts.of(source)
    assert len(facts.owners) > 250 and len(facts.labels) > 50
    key: SignedZone | None = None
    text = source
    if signed != "unsigned":
        key = sign(ORIGIN, source, nsec3=signed == "nsec3")
        text = key.text
    zone_path = tmp_path / "zone.db"
    zone_path.write_text(text)
    # BIND's checker takes the zone itself (check-names ignored: the odd labels are meant;
    # integrity checks of in-zone names only: "full" would resolve the names outside).
    checker = ["-k", "ignore", "-i", "local"]
    warnings_whole = set(check_zone(ORIGIN, str(zone_path), *checker).splitlines())

    with contextlib.ExitStack() as stack:
        knots = [stack.enter_context(KnotServer({ORIGIN: placeholder()})) for _ in range(SHARDS)]
        whole = stack.enter_context(KnotServer({ORIGIN: knot_text(text)}))
        routes, out = tmp_path / "routes", tmp_path / "shards"
        routes.mkdir()
        printed = run_shard(zone_path, out, routes, [k.addr for k in knots])
        assert route_values(routes) == sorted(f"{k.addr},{p.regexp}" for k, p in zip(knots, printed))
        check_shard_files(dns.zone.from_text(text, ORIGIN, relativize=False), signed, printed)
        for knot, p in zip(knots, printed):
            load_shard(knot, p.path)
            report = check_zone(ORIGIN, p.path, *checker)
            nsd_check_zone(ORIGIN, p.path)  # and NSD's
            # No name server without an address (or glue) the whole zone did not lack already.
            new = [w for w in report.splitlines() if re.search(r"\bNS '.*' has no", w) and w not in warnings_whole]
            assert not new, f"{p.path}: BIND's checker warns:\n" + "\n".join(new)

        patterns = compile_set(p.regexp for p in printed)

        def shard_of(name: dns.name.Name) -> int:
            return min(patterns.Match(router_text(name)) or [-1])

        r = router(routes_dir=str(routes))
        probes = {shard_of(name_of(label)): name_of(label).to_text() for label in facts.labels}
        assert sorted(probes) == list(range(SHARDS)), probes
        wait_until(lambda: all(answered(r.port, name) for name in probes.values()), 15,
                   message=f"the router does not route to every shard:\n{r.log()[-3000:]}")

        todo = queries(facts, shard_of, zero=zero)
        assert 300 <= len(todo.validated) <= 500, len(todo.validated)
        dnssec = signed != "unsigned"
        differ = compare_messages(r.port, whole.port, todo.referrals, referral=True, dnssec=dnssec)
        differ += compare_messages(r.port, whole.port, todo.validated, referral=False, dnssec=dnssec)
        if dnssec:
            assert key is not None
            anchor = delv.write_anchor(tmp_path / "anchor.conf", ORIGIN, key.ksk)
            differ += compare_validated(r.port, whole.port, anchor, todo.validated)
        total = len(todo.validated) + len(todo.referrals)
        assert not differ, (f"{len(differ)} answers of {total} questions differ between the shards and the "
                            f"whole zone:\n" + "\n".join(differ[:12]))


def test_register_with_a_routes_directory_writes_one_route_per_shard(tmp_path):
    zone_path = tmp_path / "zone.db"
    zone_path.write_text(zone_source(apex_wildcard=False, zero=True))
    routes, out = tmp_path / "routes", tmp_path / "shards"
    routes.mkdir()
    addresses = [f"{HOST}:{free_port()}" for _ in range(SHARDS)]  # nothing needs to listen there
    printed = run_shard(zone_path, out, routes, addresses)
    files = [p for p in routes.iterdir() if not p.name.startswith(".")]
    assert len(files) == SHARDS, sorted(p.name for p in files)
    assert route_values(routes) == sorted(f"{a},{p.regexp}" for a, p in zip(addresses, printed))
    # A name only one shard holds routes there, by dnsrouterctl's own look-up of the directory.
    zones = [dns.zone.from_file(p.path, ORIGIN, relativize=False) for p in printed]
    for k, zone in enumerate(zones):
        own = [n for n in zone.nodes if not any(n in other.nodes for j, other in enumerate(zones) if j != k)]
        assert own, f"shard {k} holds no name of its own"
        for name in random.Random(k).sample(own, min(2, len(own))):
            done = ctl("--routes-dir", str(routes), "which", name.to_text())
            assert done.returncode == 0 and f"-> {addresses[k]} " in done.stdout + " ", (name, done)
    done = ctl("--routes-dir", str(routes), "which", "www.example.com.")
    assert done.returncode == 1 and "no route" in done.stdout


@pytest.mark.parametrize("case", ["registers-fewer-than-shards", "not-a-zone-file", "zero-shards"])
def test_a_bad_command_line_is_one_line_and_exit_2(case, tmp_path):
    zone_path = tmp_path / "zone.db"
    zone_path.write_text("this is not a zone file (\n" if case == "not-a-zone-file"
                         else zone_source(apex_wildcard=False, zero=True))
    routes, out = tmp_path / "routes", tmp_path / "shards"
    routes.mkdir()
    shards = 0 if case == "zero-shards" else SHARDS
    registers = SHARDS - 1 if case == "registers-fewer-than-shards" else shards
    args = ["--routes-dir", str(routes), "shard", str(zone_path), "--origin", ORIGIN, "--shards", str(shards),
            "--out", str(out)]
    for _ in range(registers):
        args += ["--register", f"{HOST}:{free_port()}"]
    done = ctl(*args)
    assert done.returncode == 2, (case, done)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dnsrouterctl: "), (case, done.stderr)
    assert done.stdout == ""
    assert not list(routes.iterdir()), "a refused command registered routes"
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".zone"], "a refused command wrote shards"
