"""Signing zone texts with BIND's tools (dnssec-keygen, dnssec-signzone), for DNSSEC tests.

    signed = sign("shard.test.", zone_text)                 # NSEC
    signed = sign("shard.test.", zone_text, nsec3=True)     # NSEC3, salt "ab12cd34", 0 extra iterations
    signed.text   # the signed zone file text (absolute names, BIND's layout)
    signed.ksk    # the key signing key's DNSKEY rdata: the trust anchor (support.delv.anchor_text)

Each call makes two fresh ECDSAP256SHA256 keys (a KSK with -f KSK and a ZSK)
in a temporary directory, signs with both (-S: smart signing from the key
directory), keeps the SOA serial (-N keep), and signs with a fixed window
around now (inception an hour ago, expiry in 30 days), so the result
validates at once and through any test run. dnssec-signzone verifies what
it wrote before it exits (without -P), so a returned text is a correctly
signed zone.

The programs are Debian's (package bind9-utils), found by absolute path in
/usr/bin or /usr/sbin: a missing one raises RuntimeError naming the
package, a failure, never a skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import dns.rdata
import dns.rdataclass
import dns.rdatatype
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from support.zones import fqdn

PACKAGE = "bind9-utils"
ALGORITHM = "ECDSAP256SHA256"


def bind_tool(name: str, package: str = PACKAGE) -> str:
    """The absolute path of one of BIND's programs (or ``package``'s); RuntimeError if it is not installed."""
    for directory in ("/usr/bin", "/usr/sbin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} not found in /usr/bin or /usr/sbin: install the Debian package '{package}'")


def _run(argv: list[str], cwd: str, timeout: float = 60.0) -> str:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


@dataclass(frozen=True)
class SignedZone:
    origin: str
    text: str  # the signed zone file
    ksk: DNSKEY  # the key signing key (flags 257): the trust anchor
    zsk: DNSKEY
    nsec3: bool


def read_key(path: str) -> DNSKEY:
    """The DNSKEY rdata of a dnssec-keygen ``K*.key`` file."""
    with open(path) as f:
        for line in f:
            if line.startswith(";") or not line.strip():
                continue
            words = line.split()
            at = [w.upper() for w in words].index("DNSKEY")
            rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DNSKEY, " ".join(words[at + 1:]))
            assert isinstance(rdata, DNSKEY)
            return rdata
    raise RuntimeError(f"{path}: no DNSKEY record")


def keygen(origin: str, directory: str, *, ksk: bool) -> DNSKEY:
    """One new key for origin in directory (its K*.key and K*.private); its DNSKEY."""
    argv = [bind_tool("dnssec-keygen"), "-q", "-K", directory, "-a", ALGORITHM, "-n", "ZONE"]
    if ksk:
        argv += ["-f", "KSK"]
    base = _run([*argv, fqdn(origin)], cwd=directory).strip().splitlines()[-1]
    return read_key(os.path.join(directory, base + ".key"))


def sign(origin: str, text: str, *, nsec3: bool = False, salt: str = "ab12cd34", iterations: int = 0,
         workdir: str | None = None) -> SignedZone:
    """Sign zone text (which must not hold DNSKEYs of its own) with a new KSK and ZSK.

    NSEC by default; nsec3=True gives an NSEC3 chain (-3 salt, -H
    iterations: 0 extra, what RFC 9276 asks and validators accept; no
    opt-out). workdir: where the keys and files go (default a temporary
    directory, removed afterwards).
    """
    origin = fqdn(origin)
    own = workdir is None
    directory = workdir or tempfile.mkdtemp(prefix="dnssec-")
    try:
        ksk = keygen(origin, directory, ksk=True)
        zsk = keygen(origin, directory, ksk=False)
        unsigned = os.path.join(directory, "zone.db")
        signed = os.path.join(directory, "zone.db.signed")
        with open(unsigned, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        argv = [bind_tool("dnssec-signzone"), "-q", "-S", "-K", directory, "-d", directory,
                "-o", origin, "-N", "keep", "-s", "now-1h", "-e", "now+30d", "-f", signed]
        if nsec3:
            argv += ["-3", salt, "-H", str(iterations)]
        _run([*argv, unsigned], cwd=directory)
        with open(signed) as f:
            return SignedZone(origin, f.read(), ksk, zsk, nsec3)
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)


def check_zone(origin: str, path: str, *extra: str) -> str:
    """``named-checkzone`` of a zone file: its output when BIND's checker loads
    it, RuntimeError with the checker's words when not. extra: more flags
    (e.g. "-n", "fail")."""
    out = subprocess.run([bind_tool("named-checkzone"), *extra, fqdn(origin), path],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"named-checkzone {fqdn(origin)} {path} failed ({out.returncode}):\n"
                           f"{out.stdout}{out.stderr}")
    return out.stdout + out.stderr


def nsd_check_zone(origin: str, path: str) -> None:
    """``nsd-checkzone`` of a zone file: RuntimeError with NSD's words when it does not load."""
    out = subprocess.run([bind_tool("nsd-checkzone", "nsd"), fqdn(origin), path],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"nsd-checkzone {fqdn(origin)} {path} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
