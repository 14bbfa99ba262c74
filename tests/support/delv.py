"""BIND's validating lookup tool (delv) against a server on 127.0.0.1, parsed.

    anchor = write_anchor(tmp_path / "anchor.conf", "shard.test.", signed.ksk)
    result = lookup(port, anchor, "shard.test.", "www.shard.test.", "A")
    result.validated, result.kind, result.rrsets

    results = lookup_many(port, anchor, "shard.test.", [("www.shard.test.", "A"), ...])

delv sends its queries (RD set) to the one server given and validates the
answers itself, from the trust anchor up: with +root=ZONE the zone's own KSK
is the anchor, so a zone signed by support.dnssec validates with no root
and no parent. What it prints (BIND 9.18), learnt by running it:

* stdout's first line is the verdict: "; fully validated", "; negative
  response, fully validated", "; unsigned answer", "; negative response,
  unsigned answer"; then the answer RRsets with their RRSIGs, one record a
  line, or for a negative answer the records of the proof as comments;
* for a negative answer stderr says which: ";; resolution failed: ncache
  nxdomain" or "ncache nxrrset" (NODATA);
* for a failure there is no verdict, and stderr says why: ";; resolution
  failed: failure", "...: SERVFAIL", "no valid signature found",
  "broken trust chain", ... (a referral, which an authoritative server
  gives for names below a zone cut, is "non-improving referral":
  failure).

Each lookup is one delv process (some 25 ms); lookup_many runs a few at a
time from a thread pool, so hundreds of names take seconds.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tokenizer
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from support.net import HOST
from support.zones import fqdn

DELV = "/usr/bin/delv"
PACKAGE = "bind9-dnsutils"

VERDICTS = {
    "; fully validated": (True, "answer"),
    "; negative response, fully validated": (True, "negative"),
    "; unsigned answer": (False, "answer"),
    "; negative response, unsigned answer": (False, "negative"),
}


def delv_path() -> str:
    for path in (DELV, "/usr/sbin/delv"):
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"delv not found ({DELV}): install the Debian package '{PACKAGE}'")


def anchor_text(zone: str, key: DNSKEY) -> str:
    """delv's -a file: the zone's key as a static trust anchor."""
    b64 = base64.b64encode(key.key).decode("ascii")
    return (f'trust-anchors {{\n    "{fqdn(zone)}" static-key {key.flags} {key.protocol} '
            f'{int(key.algorithm)} "{b64}";\n}};\n')


def write_anchor(path: str | Path, zone: str, key: DNSKEY) -> str:
    with open(path, "w") as f:
        f.write(anchor_text(zone, key))
    return str(path)


# One record: (owner in lower-case wire form, type, covers, rdata in canonical wire form). No
# TTL: delv prints what is left of it in its cache, which may be a second less.
Record = tuple[bytes, int, int, bytes]


@dataclass(frozen=True)
class Result:
    name: str
    rdtype: str
    validated: bool  # a verdict saying "fully validated"
    kind: str  # "answer", "nxdomain", "nodata", "negative" (another negative), or "failure"
    records: frozenset = field(default_factory=frozenset)  # of Record: the answer with its RRSIGs
    reason: str = ""  # for a failure, what delv said
    stdout: str = ""
    stderr: str = ""

    @property
    def outcome(self) -> tuple:
        """What two servers must agree on: validation, kind, the answer records."""
        return (self.validated, self.kind, self.records)

    def describe(self) -> str:
        """A few lines for a failure message: the verdict and what delv printed."""
        verdict = ("validated " if self.validated else "NOT validated ") + self.kind
        if self.reason:
            verdict += f" ({self.reason})"
        body = "\n".join("      " + line for line in (self.stdout + self.stderr).strip().splitlines())
        return f"{verdict}\n{body}"


def _record(line: str) -> Record:
    tok = dns.tokenizer.Tokenizer(line)
    owner = tok.get_name()
    tok.get_int()  # the TTL
    rdclass = dns.rdataclass.from_text(tok.get_string())
    rdtype = dns.rdatatype.from_text(tok.get_string())
    rdata = dns.rdata.from_text(rdclass, rdtype, tok, relativize=False)
    covers = rdata.covers() if rdtype == dns.rdatatype.RRSIG else 0
    return (owner.canonicalize().to_wire(), int(rdtype), int(covers), rdata.to_digestable())


def parse(name: str, rdtype: str, stdout: str, stderr: str) -> Result:
    """delv's output for one lookup as a Result."""
    lines = stdout.splitlines()
    verdict = lines[0].strip() if lines else ""
    failed = [line.split("resolution failed:", 1)[1].strip()
              for line in stderr.splitlines() if "resolution failed:" in line]
    reason = failed[-1] if failed else ""
    if verdict not in VERDICTS:
        return Result(name, rdtype, False, "failure", frozenset(), reason or stderr.strip() or stdout.strip(),
                      stdout, stderr)
    validated, kind = VERDICTS[verdict]
    if kind == "negative":
        kind = {"ncache nxdomain": "nxdomain", "ncache nxrrset": "nodata"}.get(reason, "negative")
        return Result(name, rdtype, validated, kind, frozenset(), "", stdout, stderr)
    records = frozenset(_record(line) for line in lines[1:] if line.strip() and not line.startswith(";"))
    return Result(name, rdtype, validated, kind, records, "", stdout, stderr)


def lookup(port: int, anchor: str, zone: str, name: str, rdtype: str, *, host: str = HOST,
           timeout: float = 20.0) -> Result:
    """One delv lookup of name/rdtype at host:port, validated from zone's anchor."""
    argv = [delv_path(), f"@{host}", "-p", str(port), "-a", anchor, f"+root={fqdn(zone)}",
            "-q", name, "-t", rdtype]  # -q: a name may start with "-"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        # Seen once in a fresh-clone run of the whole suite (an NSEC3 shard
        # behind the router; the same name answered plain queries at once,
        # and the other runs, before and after, did not hang): one delv ran 30 s with no
        # verdict. Once more, said on stderr so the test's output keeps it;
        # a second hang fails the test.
        print(f"delv hung {timeout:g} s: {' '.join(argv)}; once more", file=sys.stderr)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if out.returncode != 0 and not out.stdout and "resolution failed" not in out.stderr:
        # delv itself could not run (a bad anchor file, a bad name): no answer to compare.
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stderr}")
    return parse(name, rdtype, out.stdout, out.stderr)


def lookup_many(port: int, anchor: str, zone: str, queries: Iterable[tuple[str, str]], *,
                threads: int = 4, host: str = HOST) -> dict[tuple[str, str], Result]:
    """lookup() of every (name, type), a few at a time; {(name, type): Result}."""
    todo: Sequence[tuple[str, str]] = list(dict.fromkeys(queries))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="delv") as pool:
        results = pool.map(lambda q: lookup(port, anchor, zone, q[0], q[1], host=host), todo)
        return dict(zip(todo, results))
