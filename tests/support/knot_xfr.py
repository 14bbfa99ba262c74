"""Knot DNS (knotd) as the two ends of zone transfers: a signing primary and a plain secondary.

    key = tsig_key("xfr")                                   # "hmac-sha256:xfr:<base64 of 32 random bytes>"
    port = free_port()
    with KnotSecondary("feed.test.", HOST, port, tsig=key) as secondary, \\
            KnotPrimary("feed.test.", zone_text("feed.test.", ["www A 192.0.2.1"]), port=port,
                        notify=[(HOST, secondary.port)], transfer_tsig=key) as primary:
        serial = primary.update(["add new.feed.test. 300 A 192.0.2.2", "del www.feed.test."])
        secondary.wait_serial(serial)                       # it came by NOTIFY + IXFR
        assert secondary.transfers()[-1] == "IXFR"
        anchor = write_anchor(tmp_path / "anchor.conf", "feed.test.", primary.ksk())   # support.delv

Both listen on a free 127.0.0.1 port (UDP and TCP), live in their own
temporary directory (config, zone file, databases, control socket, log),
are started by support.processes.spawn() (so they die with the test) and
stopped on close() or when the `with` block ends, even on failure. A
missing knotd, knotc, knsupdate or delv is a RuntimeError, never a skip.
Pass ``port=`` to choose the port (a secondary and its primary each need
the other's port before either starts: take one from free_port()).

KnotPrimary(origin, zone_text, *, nsec3=False, notify=(), transfer_tsig=None, port=None, cookies=False)
    Serves ``origin`` from ``zone_text`` (support.zones.zone_text) and signs
    it itself: `dnssec-signing: on`, a policy with ECDSAP256SHA256, a KSK
    and a ZSK that knotd makes at the first start (no rollovers, no
    CDS/CDNSKEY), NSEC, or NSEC3 with no extra iterations and an empty salt.
    `serial-policy: increment` (signing the file's serial 1 serves 2), a
    journal holding the whole zone and its history (`journal-content: all`;
    it serves IXFR from it), `zonefile-sync: -1`: the zone file stays as
    written, unsigned; the signed zone with every update lives in the
    journal. The file is read at the first start only (`zonefile-load:
    difference-no-serial`, then `none`), so a restart serves the journal's
    zone, updates included. Dynamic updates are allowed from 127.0.0.0/8,
    transfers to 127.0.0.0/8 (only with the TSIG key ``transfer_tsig``, when
    given), and every new serial is NOTIFYed to each (host, port) of
    ``notify`` (signed with ``transfer_tsig`` when given). knotd sends that
    NOTIFY about a second after the change, not at once. ``cookies``: DNS
    Cookies (mod-cookies): a query with a client cookie gets it back with a
    server cookie.

    .port .addr ("127.0.0.1:PORT") .origin .dir .conf_path .log_path
    start() -> self: returns once the zone is loaded and signed (wait_signed())
    stop(), kill(), close(); a context manager
    serial() -> int                       the SOA serial it serves
    wait_signed()                         until DNSKEY and RRSIG(SOA) are served
    ksk() -> DNSKEY                       the key with flags 257: the trust anchor
                                          (support.delv.write_anchor); checked with
                                          delv: the DNSKEY rrset validates from it
    update(lines) -> int                  knsupdate: "add NAME TTL TYPE DATA", "del NAME",
                                          "del NAME TYPE" (names relative to the origin
                                          work too); waits for the new serial (knotd
                                          signs a change in the same step) and returns it;
                                          RuntimeError when the server says no
    set_nsec3(on) -> int                  rewrites the policy, `knotc reload` (knotd
                                          re-signs a zone whose policy changed by
                                          itself); waits until NSEC3PARAM is there (or
                                          gone) in a new serial and returns it (the
                                          same serial when it was so already)
    zone_records() -> dns.zone.Zone       the zone by AXFR (relativize=False)
    has(name, rdtype) -> bool, dnskeys() -> list[DNSKEY]
    knotc(*args) -> str, log() -> str, log_tail(lines=30) -> str

KnotSecondary(origin, primary_host, primary_port, *, tsig=None, identity=None, port=None, notify=())
    A plain secondary (`master:` a remote at primary_host@primary_port):
    transfers the zone (AXFR, then IXFR) with the TSIG key ``tsig`` when
    given, accepts NOTIFY from 127.0.0.0/8 (with that key when given), and
    serves exactly what it received (no signing, no validation: RRSIG,
    NSEC, NSEC3 pass through). It allows AXFR from 127.0.0.0/8 with no
    key, for zone_records(). It keeps the zone in its journal
    (`journal-content: all`, `zonefile-load: none`), so a restart serves
    the last serial at once; it asks the primary again at the SOA refresh
    timer, on NOTIFY, or on refresh(). Its primary need not be up: start()
    returns once knotd answers `id.server. CH TXT` (its identity, default
    "knot-secondary-<port>"), without waiting for the zone. Until the
    first transfer it answers SERVFAIL for the zone and knotd retries at
    random intervals (1 to 30 s seen); a NOTIFY or refresh() makes it try
    at once. It NOTIFYs each (host, port) of ``notify`` (unsigned) after
    each serial it loads: a router's packet cache, say.

    .port .addr .identity .origin .dir .conf_path .log_path
    start() -> self, stop(), kill(), close(); a context manager
    serial() -> int | None                the SOA serial it serves, None without a zone
    wait_serial(serial, timeout=30) -> int   until serial() >= serial (plain >=); that
                                          serial, else AssertionError with the log tail
    refresh(), retransfer()               knotc zone-refresh / zone-retransfer
    transfers() -> list[str]              "AXFR" / "IXFR" for every incoming transfer
                                          that finished, oldest first (its whole log,
                                          over restarts too)
    transfer_failures() -> list[str]      the log lines of refreshes/transfers that failed
    zone_records() -> dns.zone.Zone       the zone by AXFR from it (no key)
    knotc(*args) -> str, log() -> str, log_tail(lines=30) -> str

tsig_key(name) -> str
    "hmac-sha256:NAME:BASE64" with 32 fresh random bytes: the form of `kdig
    -y` and knsupdate -y, and of the tsig/transfer_tsig arguments
    (parse_tsig() splits it).

What knotd 3.2 logs on the secondary's side (learnt by running it;
transfers() takes the "finished" lines):

    [feed.test.] AXFR, incoming, remote 127.0.0.1@PORT, finished, 0.00 seconds, 1 messages, 1907 bytes
    [feed.test.] IXFR, incoming, remote 127.0.0.1@PORT, finished, 0.00 seconds, 1 messages, 1554 bytes

An IXFR request answered with the whole zone (the primary has no history
from the secondary's serial) is an AXFR:

    [feed.test.] IXFR, incoming, remote 127.0.0.1@PORT, receiving AXFR-style IXFR
    [feed.test.] AXFR, incoming, remote 127.0.0.1@PORT, started
    [feed.test.] AXFR, incoming, remote 127.0.0.1@PORT, finished, ...

A failed refresh names the remote by its id ("primary") then its address
(transfer_failures() takes these, and failed AXFR/IXFR lines):

    [feed.test.] refresh, remote primary, address 127.0.0.1@PORT, failed (connection reset)
    [feed.test.] refresh, remote primary, address 127.0.0.1@PORT, failed (failed to verify TSIG)
"""
from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import subprocess
from typing import Callable, Iterable, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.zone
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from support.delv import lookup, write_anchor
from support.knot import Knotd
from support.net import HOST, free_port, wait_until
from support.zones import fqdn

TSIG_ALGORITHM = "hmac-sha256"

# One finished incoming transfer in knotd's log: "[zone.] AXFR, incoming, remote ..., finished, ...".
_TRANSFER = re.compile(r"\[(?P<zone>[^\]]+)\] (?P<kind>AXFR|IXFR), incoming, remote \S+ finished")
# A refresh or a transfer that did not work: "[zone.] refresh, remote ..., failed (...)",
# "[zone.] AXFR, incoming, remote ..., failed (...)".
_FAILED = re.compile(r"\[(?P<zone>[^\]]+)\] (?:refresh|AXFR, incoming|IXFR, incoming), remote .*, failed \(")


def tool(name: str, package: str) -> str:
    """Path of one of Knot's programs; RuntimeError (not a skip) naming the package when missing."""
    path = shutil.which(name)
    if path is None:
        for directory in ("/usr/sbin", "/usr/bin"):
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                path = candidate
                break
    if path is None:
        raise RuntimeError(f"{name} not found (PATH, /usr/sbin, /usr/bin): install the Debian package '{package}'")
    return path


def tsig_key(name: str) -> str:
    """A fresh TSIG key as kdig -y takes it: "hmac-sha256:NAME:BASE64(32 random bytes)"."""
    return f"{TSIG_ALGORITHM}:{name}:{base64.b64encode(secrets.token_bytes(32)).decode('ascii')}"


def parse_tsig(text: str) -> tuple[str, str, str]:
    """ "ALG:NAME:SECRET" (or "NAME:SECRET", hmac-sha256) -> (algorithm, name, secret)."""
    parts = text.split(":")
    if len(parts) == 2:
        parts = [TSIG_ALGORITHM, *parts]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"a TSIG key is 'ALGORITHM:NAME:BASE64SECRET', not {text!r}")
    algorithm, name, secret = parts
    base64.b64decode(secret, validate=True)
    return algorithm.lower(), name, secret


def tsig_for_dnspython(text: str) -> dns.tsig.Key:
    algorithm, name, secret = parse_tsig(text)
    return dns.tsig.Key(name, secret, algorithm)


def _key_section(text: str | None) -> tuple[str, str]:
    """(the `key:` section for a TSIG key or "", its id as Knot knows it)."""
    if text is None:
        return "", ""
    algorithm, name, secret = parse_tsig(text)
    return (f"key:\n  - id: {fqdn(name)}\n    algorithm: {algorithm}\n    secret: {secret}\n\n",
            fqdn(name))


def _axfr(origin: str, port: int, key: str | None) -> dns.zone.Zone:
    zone = dns.zone.Zone(origin, relativize=False)
    q = dns.message.make_query(origin, dns.rdatatype.AXFR)
    if key is not None:
        q.use_tsig(tsig_for_dnspython(key))
    dns.query.inbound_xfr(HOST, zone, q, port=port, timeout=10, lifetime=30)
    return zone


def _wait_serial(serial: Callable[[], int | None], good: Callable[[int], bool], timeout: float,
                 message: str, tail: Callable[[], str]) -> int:
    """Poll serial() until good(it); that serial (0 included).

    At the deadline AssertionError: message, the serial served last, tail() (the log's)."""
    last: list[int | None] = [None]

    def check() -> bool:
        last[0] = s = serial()
        return s is not None and good(s)

    try:
        wait_until(check, timeout, interval=0.05, message=message)
    except AssertionError as e:
        raise AssertionError(f"{e}; it serves serial {last[0]}\n{tail()}") from None
    assert last[0] is not None
    return last[0]


class _Knotd(Knotd):
    """What both ends of a transfer share: one zone, the server sections of the config."""

    def __init__(self, origin: str, *, port: int | None, startup_timeout: float) -> None:
        self.origin = fqdn(origin)
        super().__init__(port=port, workdir=None, startup_timeout=startup_timeout)
        self.zone_path = os.path.join(self.dir, "zones", self.origin + "zone")
        self._set_port(port if port is not None else free_port("both"))

    # -- config ------------------------------------------------------------------

    def _server_sections(self, identity: str) -> str:
        # No `user:`: knotd keeps our uid, and writes only inside self.dir.
        return f"""\
server:
    rundir: "{self.dir}/run"
    pidfile: "{self.dir}/run/knot.pid"
    identity: "{identity}"
    listen: {HOST}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

log:
  - target: stderr
    any: info

database:
    storage: "{self.dir}/db"

control:
    listen: "{self.socket_path}"

"""

    def config(self) -> str:
        raise NotImplementedError

    def write_files(self) -> None:
        with open(self.conf_path, "w") as f:
            f.write(self.config())

    def _soa(self) -> dns.message.Message | None:
        """The reply to `origin SOA` over UDP, None when none came."""
        try:
            return dns.query.udp(dns.message.make_query(self.origin, "SOA"), HOST, port=self.port, timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return None

    def _serial(self) -> int | None:
        r = self._soa()
        if r is None or r.rcode() != dns.rcode.NOERROR or not r.flags & dns.flags.AA:
            return None
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.name == dns.name.from_text(self.origin):
                return int(rrset[0].serial)
        return None


class KnotPrimary(_Knotd):
    """knotd serving, signing, updating and sending out one zone (see the module docstring)."""

    kind = "knot-primary"

    def __init__(self, origin: str, zone_text: str, *, nsec3: bool = False,
                 notify: Iterable[tuple[str, int]] = (), transfer_tsig: str | None = None,
                 port: int | None = None, startup_timeout: float = 15.0, cookies: bool = False) -> None:
        self.zone_text = zone_text if zone_text.endswith("\n") else zone_text + "\n"
        self.nsec3 = nsec3
        self.cookies = cookies  # DNS Cookies (RFC 7873): mod-cookies answers a client cookie with a server cookie
        self.notify: list[tuple[str, int]] = [(h, int(p)) for h, p in notify]
        for host, _ in self.notify:
            if host != HOST:
                raise ValueError(f"NOTIFY targets must be on {HOST}, not {host}")
        self.transfer_tsig = transfer_tsig
        if transfer_tsig is not None:
            parse_tsig(transfer_tsig)
        super().__init__(origin, port=port, startup_timeout=startup_timeout)
        with open(self.zone_path, "w") as f:
            f.write(self.zone_text)

    def config(self) -> str:
        keys, key_id = _key_section(self.transfer_tsig)
        key_line = f"    key: {key_id}\n" if key_id else ""
        remotes = "".join(f"  - id: notify{i}\n    address: {host}@{port}\n{key_line}"
                          for i, (host, port) in enumerate(self.notify))
        remote_section = f"remote:\n{remotes}\n" if remotes else ""
        notify_line = (f"    notify: [{', '.join(f'notify{i}' for i in range(len(self.notify)))}]\n"
                       if self.notify else "")
        # zonefile-sync -1 + journal-content all: the zone file is never
        # rewritten, the signed zone and every update live in the journal.
        # The zone file is read at the first start only (difference-no-serial
        # is `whole` when the journal is empty); from then on `none`: knotd
        # 3.2 started again with difference-no-serial diffs the unchanged
        # file against the journal and so UNDOES every dynamic update (and
        # may serve an older serial).
        load = "none" if self._started_once else "difference-no-serial"
        return self._server_sections(f"knot-primary-{self.port}") + keys + remote_section + f"""\
acl:
  - id: update
    address: 127.0.0.0/8
    action: update
  - id: transfer
    address: 127.0.0.0/8
    action: transfer
{key_line}
policy:
  - id: signer
    algorithm: ecdsap256sha256
    single-type-signing: off
    ksk-lifetime: 0
    zsk-lifetime: 0
    nsec3: {'on' if self.nsec3 else 'off'}
    nsec3-iterations: 0
    nsec3-salt-length: 0
    nsec3-salt-lifetime: 0
    cds-cdnskey-publish: none

zone:
  - domain: "{self.origin}"
    file: "{self.zone_path}"
    zonefile-sync: -1
    zonefile-load: {load}
    journal-content: all
    serial-policy: increment
    dnssec-signing: on
    dnssec-policy: signer
    acl: [update, transfer]
{notify_line}{'    module: mod-cookies' + chr(10) if self.cookies else ''}"""

    def _started(self) -> None:
        self.write_files()  # zonefile-load none from now on, for the next start or reload

    # -- readiness ---------------------------------------------------------------

    def _ready(self) -> bool:
        self._alive()
        log = self._log_since_start()
        if "zone event 'load' failed" in log or "DNSSEC, failed" in log:
            raise RuntimeError(f"knotd could not load or sign {self.origin}\n{self.log_tail()}")
        return self._signed()

    def _query(self, rdtype: str, *, name: str | None = None, timeout: float = 2.0) -> dns.message.Message:
        q = dns.message.make_query(name or self.origin, rdtype, want_dnssec=True)
        return dns.query.tcp(q, HOST, port=self.port, timeout=timeout)

    def _signed(self) -> bool:
        try:
            soa = self._query("SOA", timeout=0.5)
            keys = self._query("DNSKEY", timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return False
        origin = dns.name.from_text(self.origin)
        return (soa.rcode() == dns.rcode.NOERROR and bool(soa.flags & dns.flags.AA)
                and soa.get_rrset(soa.answer, origin, dns.rdataclass.IN, dns.rdatatype.RRSIG,
                                  dns.rdatatype.SOA) is not None
                and keys.get_rrset(keys.answer, origin, dns.rdataclass.IN, dns.rdatatype.DNSKEY) is not None)

    def wait_signed(self, timeout: float = 15.0) -> None:
        """Until the zone is served with its DNSKEY rrset and an RRSIG over the SOA."""
        wait_until(self._signed, timeout=timeout, interval=0.05,
                   message=f"{self.origin} not served signed by {self.addr}\n{self.log_tail()}")

    # -- queries -----------------------------------------------------------------

    def serial(self) -> int:
        """The SOA serial it serves (AssertionError when it serves none)."""
        serial = self._serial()
        if serial is None:
            raise AssertionError(f"{self.addr} serves no SOA for {self.origin}\n{self.log_tail()}")
        return serial

    def dnskeys(self) -> list[DNSKEY]:
        r = self._query("DNSKEY")
        rrset = r.get_rrset(r.answer, dns.name.from_text(self.origin), dns.rdataclass.IN, dns.rdatatype.DNSKEY)
        if rrset is None:
            raise AssertionError(f"{self.addr} serves no DNSKEY for {self.origin}")
        return [rd for rd in rrset if isinstance(rd, DNSKEY)]

    def ksk(self) -> DNSKEY:
        """The served DNSKEY with flags 257 (or the one key): the zone's trust anchor.

        Checked before it is returned: delv, with it as the only anchor,
        validates the DNSKEY rrset (so it is there and signs it)."""
        keys = self.dnskeys()
        ksks = [k for k in keys if k.flags == 257] or (keys if len(keys) == 1 else [])
        if len(ksks) != 1:
            raise AssertionError(f"{self.origin}: no single KSK among {[k.flags for k in keys]}")
        anchor = write_anchor(os.path.join(self.dir, "ksk-anchor.conf"), self.origin, ksks[0])
        result = lookup(self.port, anchor, self.origin, self.origin, "DNSKEY")
        if not result.validated:
            raise AssertionError(f"the DNSKEY rrset of {self.origin} does not validate from its KSK:\n"
                                 f"{result.describe()}")
        return ksks[0]

    def zone_records(self) -> dns.zone.Zone:
        """The zone as it serves it, by AXFR (with transfer_tsig when set)."""
        return _axfr(self.origin, self.port, self.transfer_tsig)

    def has(self, name: str, rdtype: str) -> bool:
        """Whether it serves an rrset name/rdtype (an authoritative answer)."""
        r = self._query(rdtype, name=name)
        return r.rcode() == dns.rcode.NOERROR and any(
            rrset.rdtype == dns.rdatatype.from_text(rdtype) for rrset in r.answer)

    # -- changes -----------------------------------------------------------------

    def update(self, lines: Sequence[str], timeout: float = 15.0) -> int:
        """Send one dynamic update (knsupdate's commands); the new serial.

        Lines are knsupdate's update commands: "add www.feed.test. 300 A
        192.0.2.1", "del old.feed.test.", "del x.feed.test. A" (a name
        without the final dot is relative to the origin). Returns once the
        served serial is higher than before (knotd signs the change in the
        same step as it applies it). RuntimeError when knsupdate or the
        server says no (NOTZONE, REFUSED, a bad record)."""
        before = self.serial()
        script = "".join(f"{line}\n" for line in
                         [f"server {HOST} {self.port}", f"zone {self.origin}", f"origin {self.origin}",
                          *lines, "send", "answer"])
        out = subprocess.run([tool("knsupdate", "knot-dnsutils"), "-t", "5"], input=script,
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or "NOERROR" not in out.stdout:
            raise RuntimeError(f"knsupdate to {self.addr} failed ({out.returncode}):\n"
                               f"{script}{out.stdout}{out.stderr}\n{self.log_tail()}")
        return _wait_serial(self._serial, lambda s: s > before, timeout,
                            f"{self.origin} on {self.addr}: no serial above {before} after an update",
                            self.log_tail)

    def _nsec3param(self) -> bool:
        return self.has(self.origin, "NSEC3PARAM")

    def set_nsec3(self, on: bool, timeout: float = 15.0) -> int:
        """Switch the policy to NSEC3 (on) or NSEC (off) and re-sign; the new serial.

        Nothing happens (and the serial stays) when the zone is that way already."""
        before = self.serial()
        if on == self.nsec3:
            return before
        self.nsec3 = on
        self.write_files()
        self.conf_check()
        # knotd re-signs a zone whose policy changed on the reload itself
        # (one new serial); a `zone-sign` on top would make a second one.
        self.knotc("reload")
        return _wait_serial(self._serial, lambda s: s > before and self._nsec3param() == on, timeout,
                            f"{self.origin} on {self.addr} did not switch to {'NSEC3' if on else 'NSEC'}",
                            self.log_tail)

    def __repr__(self) -> str:
        return f"KnotPrimary({self.addr}, {self.origin}, nsec3={self.nsec3}, running={self.running()})"


class KnotSecondary(_Knotd):
    """knotd transferring one zone from a primary and serving it (see the module docstring)."""

    kind = "knot-secondary"

    def __init__(self, origin: str, primary_host: str, primary_port: int, *, tsig: str | None = None,
                 identity: str | None = None, port: int | None = None, startup_timeout: float = 10.0,
                 notify: Iterable[tuple[str, int]] = ()) -> None:
        if primary_host != HOST:
            raise ValueError(f"the primary must be on {HOST}, not {primary_host}")
        # Downstream NOTIFY targets (unsigned), told of each serial it loads: a router's packet cache.
        self.notify: list[tuple[str, int]] = [(h, int(p)) for h, p in notify]
        if any(h != HOST for h, _ in self.notify):
            raise ValueError(f"NOTIFY targets must be on {HOST}")
        self.primary_host = primary_host
        self.primary_port = int(primary_port)
        self.tsig = tsig
        if tsig is not None:
            parse_tsig(tsig)
        self._fixed_identity = identity
        super().__init__(origin, port=port, startup_timeout=startup_timeout)

    @property
    def identity(self) -> str:
        return self._fixed_identity or f"knot-secondary-{self.port}"

    def config(self) -> str:
        keys, key_id = _key_section(self.tsig)
        key_line = f"    key: {key_id}\n" if key_id else ""
        # journal-content all, zonefile-load none, no zone file: what it
        # received stays in the journal only, so a restart serves it again
        # and asks the primary for the difference (IXFR).
        downstream = "".join(f"  - id: downstream{i}\n    address: {h}@{p}\n" for i, (h, p) in enumerate(self.notify))
        notify_line = (f"    notify: [{', '.join(f'downstream{i}' for i in range(len(self.notify)))}]\n"
                       if self.notify else "")
        return self._server_sections(self.identity) + keys + f"""\
remote:
  - id: primary
    address: {self.primary_host}@{self.primary_port}
{key_line}{downstream}
acl:
  - id: notify
    address: 127.0.0.0/8
    action: notify
{key_line}  - id: transfer
    address: 127.0.0.0/8
    action: transfer

zone:
  - domain: "{self.origin}"
    file: "{self.zone_path}"
    master: primary
    acl: [notify, transfer]
    zonefile-sync: -1
    zonefile-load: none
    journal-content: all
    dnssec-signing: off
    dnssec-validation: off
{notify_line}"""

    def _ready(self) -> bool:
        self._alive()
        try:
            r = dns.query.udp(dns.message.make_query("id.server.", "TXT", "CH"), HOST, port=self.port, timeout=0.2)
        except (dns.exception.DNSException, OSError):
            return False
        return r.rcode() == dns.rcode.NOERROR and bool(r.answer)

    def serial(self) -> int | None:
        """The SOA serial it serves; None before it has the zone (SERVFAIL) or when it does not answer."""
        return self._serial()

    def wait_serial(self, serial: int, timeout: float = 30.0) -> int:
        """Poll until it serves serial or a higher one (plain >=); that serial."""
        return _wait_serial(self.serial, lambda s: s >= serial, timeout,
                            f"{self.addr} did not reach serial {serial} of {self.origin}", self.log_tail)

    def refresh(self) -> None:
        """knotc zone-refresh: ask the primary for its serial now (and transfer what is new)."""
        self.knotc("zone-refresh", self.origin)

    def retransfer(self) -> None:
        """knotc zone-retransfer: a full AXFR now, whatever the serials."""
        self.knotc("zone-retransfer", self.origin)

    def transfers(self) -> list[str]:
        """"AXFR" or "IXFR" for every incoming transfer of the zone that finished, oldest first."""
        return [m["kind"] for m in _TRANSFER.finditer(self.log()) if fqdn(m["zone"]) == self.origin]

    def transfer_failures(self) -> list[str]:
        """The log lines of refreshes and incoming transfers of the zone that failed."""
        return [line for line in self.log().splitlines()
                if (m := _FAILED.search(line)) and fqdn(m["zone"]) == self.origin]

    def zone_records(self) -> dns.zone.Zone:
        """The zone as it serves it, by AXFR (no key needed from 127.0.0.1)."""
        return _axfr(self.origin, self.port, None)

    def __repr__(self) -> str:
        return (f"KnotSecondary({self.addr}, {self.origin} from {self.primary_host}@{self.primary_port}, "
                f"running={self.running()})")
