"""A real Knot DNS (knotd) authoritative server for integration tests.

    with KnotServer({"a.example.com.": zone_text}) as knot:
        query("h0001.a.example.com.", "A", port=knot.port)

Each server lives in its own temporary directory (config, zone files,
databases, pid file, control socket, log) and listens on 127.0.0.1 only,
UDP and TCP on the same free port. It answers `id.server. CH TXT` with its
identity (default "knot-<port>") so tests can tell backends apart, and
REFUSED for names outside its zones. Zone texts come from support.zones.

It can also stand in for a backend that cares who the client is:

    KnotServer({"whoami.test.": zone_text("whoami.test.", [])},
               whoami=["whoami.test."], proxy_allowlist="127.0.0.0/8")

answers `whoami.test. A` with the source address it sees (mod-whoami): the
address in a PROXY v2 header, when one arrives over UDP from an address of
the allowlist (`server: proxy-allowlist`; Knot takes the header over UDP
only), the datagram's source otherwise. And

    KnotServer({"geo.test.": ...}, edns_client_subnet=True,
               geoip={"geo.test.": geoip_subnets({"where.geo.test.": [
                   ("127.0.1.0/24", {"A": "198.51.100.1"})]})})

answers by subnet (mod-geoip, `mode: subnet`): the network of the query's
EDNS Client Subnet option when there is one (`server: edns-client-subnet:
on` makes Knot read it, and echo it with the scope of the view used), the
source address (proxied or not) otherwise.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Iterable, Mapping, Sequence, TypeVar, Union

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from support.net import HOST, free_port, wait_until
from support.processes import log_tail, spawn, stop
from support.zones import fqdn as _fqdn


# One view of mod-geoip's subnet mode: (network, {rrtype: rdata or [rdata, ...]}).
GeoView = tuple[str, Mapping[str, Union[str, Sequence[str]]]]


def geoip_subnets(views: Mapping[str, Sequence[GeoView]]) -> str:
    """The text of a mod-geoip config file (subnet mode): owner -> its views.

        geoip_subnets({"where.geo.test.": [("127.0.0.0/24", {"A": "198.51.100.1"}),
                                           ("127.0.1.0/24", {"A": ["198.51.100.2", "198.51.100.3"]})]})

    Owners are absolute names; rdata is zone-file text (a TXT value is one
    word per string: the module's parser strips the quotes). The most
    specific network holding the client's address (its ECS, else its
    source) wins; a client in none of them gets what the zone itself holds.
    """
    lines = []
    for owner, owner_views in views.items():
        lines.append(f"{_fqdn(owner)}:")
        for net, records in owner_views:
            lines.append(f"  - net: {net}")
            for rrtype, rdata in records.items():
                values = [rdata] if isinstance(rdata, str) else list(rdata)
                lines.append(f"    {rrtype}: [{', '.join(values)}]")
    return "\n".join(lines) + "\n"


def knotd_path() -> str:
    """Path of the knotd binary; RuntimeError if Knot is not installed.

    Not a skip: the integration tests are meant to run against a real Knot,
    and a missing package must show up as a failure, not as green.
    """
    path = shutil.which("knotd") or ("/usr/sbin/knotd" if os.access("/usr/sbin/knotd", os.X_OK) else None)
    if path is None:
        raise RuntimeError("knotd not found (PATH or /usr/sbin/knotd): install the Debian package 'knot'")
    return path


K = TypeVar("K", bound="Knotd")


class Knotd:
    """One knotd in its own directory on a free 127.0.0.1 port: what every
    kind of Knot server here shares (config file, start with a retry on a
    port taken meanwhile, stop, kill, knotc, the log). A subclass writes its
    files (``write_files``) and says when it is ready (``_ready``)."""

    kind = "knot"

    def __init__(self, *, port: int | None, workdir: str | None, startup_timeout: float) -> None:
        self._fixed_port = port is not None
        self._started_once = False
        self.startup_timeout = startup_timeout
        self._own_dir = workdir is None
        self.dir: str = workdir or tempfile.mkdtemp(prefix=f"{self.kind}-")
        self.conf_path = os.path.join(self.dir, "knot.conf")
        self.socket_path = os.path.join(self.dir, "run", "knot.sock")
        self.log_path = os.path.join(self.dir, "knotd.log")
        for sub in ("run", "db", "zones"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self._log_start = 0

    def _set_port(self, port: int) -> None:
        self.port: int = port
        self.addr: str = f"{HOST}:{port}"
        self.write_files()

    def write_files(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def _checked(self) -> bool:
        """Whether to ``knotc conf-check`` the config before each start."""
        return True

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self: K) -> K:
        """Start knotd (again, on the same port) and wait until it is ready."""
        if self.running():
            raise RuntimeError(f"knotd already running on {self.addr}")
        for attempt in range(3):
            try:
                self._spawn_and_wait()
                self._started_once = True
                self._started()
                return self
            except _PortTaken:
                # free_port() only promised "free at that moment"; another
                # socket (a client's ephemeral port, say) may have taken it.
                # Move on a fresh port, unless the caller chose the port or
                # clients already know this one (a restart).
                if self._fixed_port or self._started_once or attempt == 2:
                    raise RuntimeError(f"port {self.port} taken\n{self.log_tail()}") from None
                self._set_port(free_port("both"))
        raise AssertionError("unreachable")

    def _started(self) -> None:
        """After a start is ready (a hook)."""

    def conf_check(self) -> None:
        """`knotc conf-check` of the generated config (modules load their files too); RuntimeError saying why not."""
        knotc = shutil.which("knotc") or "/usr/sbin/knotc"
        out = subprocess.run([knotc, "-c", self.conf_path, "conf-check"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"knotc conf-check of {self.conf_path} failed:\n{out.stdout}{out.stderr}")

    def _spawn_and_wait(self) -> None:
        if self._checked:
            self.conf_check()
        self._log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            self.proc = spawn([knotd_path(), "-c", self.conf_path], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout=self.startup_timeout, interval=0.05,
                       message=f"knotd ({self.kind}) on {self.addr} was not ready")
        except BaseException as e:
            self.stop()
            # knotd exits 1 at once when it cannot bind.
            if "address already in use" in self._log_since_start():
                raise _PortTaken() from None
            if isinstance(e, AssertionError):
                raise RuntimeError(f"{e}\n{self.log_tail()}") from None
            raise

    def _alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"knotd exited with {self.proc and self.proc.returncode}\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM knotd and wait for it; SIGKILL if it does not exit in time."""
        stop(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL knotd (a crash, as far as clients can tell) and reap it."""
        stop(self.proc, sig=signal.SIGKILL)

    def close(self) -> None:
        """stop() and remove the temporary directory (if we made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: K) -> K:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        """knotd's whole log (every start)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _log_since_start(self) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(self._log_start)
            return f.read()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def knotc(self, *args: str, timeout: float = 10.0) -> str:
        """Run knotc against this server (e.g. 'zone-reload', 'a.example.com.'); returns stdout."""
        knotc = shutil.which("knotc") or "/usr/sbin/knotc"
        out = subprocess.run(
            [knotc, "-c", self.conf_path, "-s", self.socket_path, *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"knotc {' '.join(args)} failed: {out.stdout}{out.stderr}")
        return out.stdout


class KnotServer(Knotd):
    """knotd on 127.0.0.1:<port>, serving the given zones.

    zones maps zone name -> zone file text (or is an iterable of such
    pairs). The port is chosen free unless given; it stays the same over
    stop()/kill()/start(), so restart tests hit the same address.
    extra_ports: more ports it listens on too (one process, many backend
    addresses the router has never seen).

    Who-is-the-client options (see the module docstring):
    proxy_allowlist: addresses/networks (a string or a list) allowed to
    send PROXY v2 headers over UDP (`server: proxy-allowlist`);
    edns_client_subnet: read and echo ECS options (`server:
    edns-client-subnet: on`); whoami: zones whose apex A/AAAA is the
    client's address (mod-whoami); geoip: zone -> mod-geoip config file
    text (subnet mode, TTL 0; see geoip_subnets()). With any of these the
    generated config is checked with `knotc conf-check` before each start.
    """

    def __init__(
        self,
        zones: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        port: int | None = None,
        identity: str | None = None,
        workdir: str | None = None,
        startup_timeout: float = 10.0,
        workers: int = 1,
        extra_ports: Sequence[int] = (),
        proxy_allowlist: str | Sequence[str] | None = None,
        edns_client_subnet: bool = False,
        whoami: Iterable[str] = (),
        geoip: Mapping[str, str] | None = None,
    ) -> None:
        items = zones.items() if isinstance(zones, Mapping) else zones
        self.zones: dict[str, str] = {_fqdn(name): text for name, text in items}
        if not self.zones:
            raise ValueError("KnotServer needs at least one zone")
        self._fixed_identity = identity
        self.workers = workers
        self.extra_ports = list(extra_ports)
        self.proxy_allowlist: list[str] = (
            [] if proxy_allowlist is None
            else [proxy_allowlist] if isinstance(proxy_allowlist, str) else list(proxy_allowlist))
        self.edns_client_subnet = edns_client_subnet
        self.whoami: list[str] = [_fqdn(z) for z in whoami]
        self.geoip: dict[str, str] = {_fqdn(z): text for z, text in (geoip or {}).items()}
        for zone in [*self.whoami, *self.geoip]:
            if zone not in self.zones:
                raise ValueError(f"module for {zone}, which is not one of the zones {list(self.zones)}")
        super().__init__(port=port, workdir=workdir, startup_timeout=startup_timeout)
        self._set_port(port if port is not None else free_port("both"))

    def _set_port(self, port: int) -> None:
        self.identity: str = f"knot-{port}" if self._fixed_identity is None else self._fixed_identity
        super()._set_port(port)

    # -- files -------------------------------------------------------------

    def zone_path(self, zone: str) -> str:
        return os.path.join(self.dir, "zones", _fqdn(zone) + "zone")

    def geoip_path(self, zone: str) -> str:
        return os.path.join(self.dir, "geoip-" + _fqdn(zone) + "conf")

    @property
    def _checked(self) -> bool:
        """Whether the config uses more than the plain options (then conf-check it before starting)."""
        return bool(self.proxy_allowlist or self.edns_client_subnet or self.whoami or self.geoip)

    def write_files(self) -> None:
        for name, text in self.zones.items():
            with open(self.zone_path(name), "w") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        for name, text in self.geoip.items():
            with open(self.geoip_path(name), "w") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        server_extra = ""
        if self.proxy_allowlist:
            server_extra += f"    proxy-allowlist: [{', '.join(self.proxy_allowlist)}]\n"
        if self.edns_client_subnet:
            server_extra += "    edns-client-subnet: on\n"
        # One mod-geoip instance per zone, each with its own file (the
        # module is in Debian's knot-module-geoip, loaded from the module
        # directory without a `module:` section). TTL 0: the answer is per
        # client, nothing may reuse it for another.
        geoip_ids = {name: f"geoip{i}" for i, name in enumerate(self.geoip)}
        modules = ""
        if self.geoip:
            modules = "mod-geoip:\n" + "".join(
                f'  - id: {geoip_ids[name]}\n    config-file: "{self.geoip_path(name)}"\n'
                f'    ttl: 0\n    mode: subnet\n'
                for name in self.geoip
            ) + "\n"
        listen = f"{HOST}@{self.port}"
        if self.extra_ports:
            listen = "[" + ", ".join(f"{HOST}@{p}" for p in [self.port, *self.extra_ports]) + "]"

        def zone_modules(name: str) -> str:
            refs = (["mod-whoami"] if name in self.whoami else []) + \
                ([f"mod-geoip/{geoip_ids[name]}"] if name in geoip_ids else [])
            return f"    module: [{', '.join(refs)}]\n" if refs else ""

        zone_lines = "".join(
            f'  - domain: "{name}"\n    file: "{self.zone_path(name)}"\n{zone_modules(name)}'
            for name in self.zones
        )
        # No `user:` line: knotd then keeps the uid it was started with (root
        # in CI), and every path it writes is inside our own directory.
        # zonefile-sync -1 / journal-content none: never rewrite the zone
        # files or keep state between restarts, so a restart serves exactly
        # the text we wrote.
        conf = f"""\
server:
    rundir: "{self.dir}/run"
    pidfile: "{self.dir}/run/knot.pid"
    identity: "{self.identity}"
    listen: {listen}
    udp-workers: {self.workers}
    tcp-workers: {self.workers}
    background-workers: 1
{server_extra}
log:
  - target: stderr
    any: info

database:
    storage: "{self.dir}/db"

control:
    listen: "{self.socket_path}"

{modules}template:
  - id: default
    storage: "{self.dir}/zones"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none

zone:
{zone_lines}"""
        with open(self.conf_path, "w") as f:
            f.write(conf)

    def _ready(self) -> bool:
        self._alive()
        # A zone that fails to load leaves knotd running without it: fail now
        # with the reason rather than at the deadline.
        if "zone event 'load' failed" in self._log_since_start():
            raise RuntimeError(f"knotd could not load a zone\n{self.log_tail()}")
        # Zones load after the sockets are bound, so an authoritative SOA for
        # every zone (UDP) plus one TCP answer means fully serving.
        try:
            for zone in self.zones:
                r = dns.query.udp(dns.message.make_query(zone, "SOA"), HOST, port=self.port, timeout=0.2)
                if r.rcode() != dns.rcode.NOERROR or not r.flags & dns.flags.AA or not r.answer:
                    return False
            r = dns.query.tcp(dns.message.make_query(zone, "SOA"), HOST, port=self.port, timeout=0.5)
            return bool(r.answer)
        except (dns.exception.DNSException, OSError):
            return False

    def __repr__(self) -> str:
        return f"KnotServer({self.addr}, zones={list(self.zones)}, running={self.running()})"


class _PortTaken(Exception):
    """knotd could not bind its port."""

