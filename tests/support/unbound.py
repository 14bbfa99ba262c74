"""A real Unbound resolver in front of the router, as resolvers see it.

    with UnboundServer({"a.example.com.": [router.addr]}) as unbound:
        query("h0001.a.example.com.", "A", port=unbound.port)

Each server lives in its own temporary directory (config, pid file, log),
listens on 127.0.0.1 only, UDP and TCP on one free port, and sends the
queries for each stub zone to the given addresses (the router). Nothing is
cached (cache-max-ttl 0: every query reaches the stub), nothing is
validated (module-config "iterator"), no root is ever asked.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Mapping, Sequence

import dns.exception
import dns.message
import dns.query

from support.net import HOST, free_port, wait_until
from support.processes import log_tail, spawn, stop
from support.zones import fqdn

UNBOUND = "/usr/sbin/unbound"
CHECKCONF = "/usr/sbin/unbound-checkconf"


def unbound_path() -> str:
    """Path of the unbound binary; RuntimeError if Unbound is not installed.

    Not a skip: the resolver tests are meant to run against a real
    Unbound, and a missing package must show up as a failure."""
    path = UNBOUND if os.access(UNBOUND, os.X_OK) else shutil.which("unbound")
    if path is None:
        raise RuntimeError(f"unbound not found ({UNBOUND} or PATH): install the Debian package 'unbound'")
    return path


class UnboundServer:
    """unbound on 127.0.0.1:<port>, forwarding each stub zone to its addresses.

    stubs maps zone name -> addresses ("127.0.0.1:5300"); a probe name
    (default: the first zone's apex SOA) must answer before start() returns.
    """

    def __init__(self, stubs: Mapping[str, Sequence[str]], *, port: int | None = None,
                 probe: tuple[str, str] | None = None, startup_timeout: float = 10.0) -> None:
        if not stubs:
            raise ValueError("UnboundServer needs at least one stub zone")
        self.stubs = {fqdn(zone): list(addrs) for zone, addrs in stubs.items()}
        self.port = port or free_port("both")
        self.addr = f"{HOST}:{self.port}"
        self.probe = probe or (next(iter(self.stubs)), "SOA")
        self.startup_timeout = startup_timeout
        self.dir = tempfile.mkdtemp(prefix="unbound-")
        self.conf_path = os.path.join(self.dir, "unbound.conf")
        self.log_path = os.path.join(self.dir, "unbound.log")
        self.proc: subprocess.Popen | None = None
        self._write_config()

    def _write_config(self) -> None:
        stub_zones = ""
        for zone, addrs in self.stubs.items():
            lines = "".join(f"    stub-addr: {a.rsplit(':', 1)[0]}@{a.rsplit(':', 1)[1]}\n" for a in addrs)
            stub_zones += f'stub-zone:\n    name: "{zone}"\n{lines}'
        # chroot, username: stay as started (root in CI), in our directory.
        # cache-max-ttl/cache-min-ttl 0 and no prefetch: every query reaches
        # the stub. Iterator only: no validator, no trust anchor, no root key.
        conf = f"""\
server:
    interface: {HOST}
    port: {self.port}
    do-daemonize: no
    use-syslog: no
    logfile: "{self.log_path}"
    verbosity: 1
    chroot: ""
    username: ""
    directory: "{self.dir}"
    pidfile: "{self.dir}/unbound.pid"
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    cache-max-ttl: 0
    cache-min-ttl: 0
    cache-max-negative-ttl: 0
    prefetch: no
    serve-expired: no
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    num-threads: 1
    qname-minimisation: no
    harden-referral-path: no
    harden-glue: yes
    minimal-responses: yes
    use-caps-for-id: no

{stub_zones}
remote-control:
    control-enable: no
"""
        with open(self.conf_path, "w") as f:
            f.write(conf)

    def check_config(self) -> None:
        """unbound-checkconf accepts the file, or RuntimeError with what it said."""
        out = subprocess.run([CHECKCONF, self.conf_path], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"unbound-checkconf rejects {self.conf_path}: {out.stdout}{out.stderr}")

    # -- lifecycle -----------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "UnboundServer":
        self.check_config()
        with open(self.log_path, "ab") as log:
            self.proc = spawn([unbound_path(), "-d", "-c", self.conf_path], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, self.startup_timeout, interval=0.05,
                       message=f"unbound on {self.addr} never answered {self.probe}")
        except BaseException as e:
            self.stop()
            if isinstance(e, AssertionError):
                raise RuntimeError(f"{e}\n{self.log_tail()}") from None
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"unbound exited with {self.proc and self.proc.returncode}\n{self.log_tail()}")
        name, rdtype = self.probe
        try:
            reply = dns.query.udp(dns.message.make_query(name, rdtype), HOST, port=self.port, timeout=0.3)
        except (dns.exception.DNSException, OSError):
            return False
        return bool(reply.answer)

    def stop(self, timeout: float = 5.0) -> None:
        stop(self.proc, timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "UnboundServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"UnboundServer({self.addr}, stubs={self.stubs}, running={self.running()})"
