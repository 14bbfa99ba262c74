"""``dnsrouter-feed`` as a subprocess, for integration tests and benchmarks.

    with Feeder(ORIGIN, primary.addr, shards=[(key0, [secondary0.addr]), ...]) as feeder:
        feeder.port, feeder.routes_dir, feeder.metrics()
        feeder.ask_soa(0)             # the SOA it serves shard 0, signed with shard 0's key
        feeder.transfer(0, "IXFR", serial=5)   # dnspython's messages of a transfer out

It listens on a free 127.0.0.1 port (``port=`` to choose it, as secondaries
need it before it starts), keeps its state in ``state`` (default a new
temporary directory: a restart with the same Feeder object continues from
it), and writes its routes to a routes directory (the router's file
registry). start() returns once the metrics endpoint answers; kill() is a
SIGKILL, a crash.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import dns.tsig

from support import metrics
from support.knot_xfr import tsig_for_dnspython
from support.net import HOST, free_port, wait_until
from support.processes import log_tail, program, spawn, stop


class Feeder:
    def __init__(self, origin: str, primary: str, shards: Sequence[tuple[str, Sequence[str]]], *,
                 port: int | None = None, primary_tsig: str | None = None, extra: str = "",
                 registry: str | None = None, workdir: str | None = None, host: str = HOST) -> None:
        """shards: (TSIG key as kdig -y takes it, backend addresses) per shard; extra: more [feed]
        lines; registry: the [registry] section's lines (default: routes_dir = the routes directory);
        host: the address it listens on, and sends from."""
        self.origin = origin
        self.shards = [(key, list(backends)) for key, backends in shards]
        self.host = host
        self.port = port or free_port()
        self.metrics_port = free_port("tcp")
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="feed-test-"))
        self.state = self.dir / "state"
        self.routes_dir = self.dir / "routes"
        self.routes_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "feed.ini"
        self.log_path = self.dir / "feed.log"
        text = (f"[feed]\nzone = {origin}\nprimary = {primary}\nlisten = {host}:{self.port}\nstate = {self.state}\n"
                + (f"primary_tsig = {primary_tsig}\n" if primary_tsig else "") + extra
                + f"\n[registry]\n{registry or f'routes_dir = {self.routes_dir}'}\n"
                + f"[metrics]\nlisten = {HOST}:{self.metrics_port}\n[log]\nlevel = debug\n")
        for index, (key, backends) in enumerate(self.shards):
            text += f"[shard {index}]\ntsig = {key}\nbackends = {', '.join(backends)}\n"
        self.config_path.write_text(text)
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "Feeder":
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = spawn([str(program("dnsrouter-feed")), "--config", str(self.config_path)],
                              stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._up, 15, message=f"dnsrouter-feed did not start:\n{self.log_tail()}")
        return self

    def _up(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"dnsrouter-feed exited with {self.proc and self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
        with socket.socket() as s:  # the endpoint is up once its port takes connections
            s.settimeout(0.2)
            return s.connect_ex((HOST, self.metrics_port)) == 0

    def stop(self, timeout: float = 10.0) -> int | None:
        return stop(self.proc, timeout)

    def kill(self) -> None:
        stop(self.proc, sig=signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Feeder":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- looking at it --------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(self._log_start)
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def metrics(self) -> metrics.Samples:
        return metrics.samples(self.metrics_port)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def key(self, shard: int) -> dns.tsig.Key:
        return tsig_for_dnspython(self.shards[shard][0])

    def ask_soa(self, shard: int | None) -> dns.message.Message:
        """The SOA query, signed with the shard's key (None: unsigned), over UDP."""
        query = dns.message.make_query(self.origin, "SOA")
        if shard is not None:
            key = self.key(shard)
            query.use_tsig({key.name: key}, key.name, algorithm=key.algorithm)
        return dns.query.udp(query, self.host, port=self.port, timeout=2)

    def serial(self, shard: int = 0) -> int | None:
        response = self.ask_soa(shard)
        return response.answer[0][0].serial if response.answer else None

    def transfer(self, shard: int | None, rdtype: str = "AXFR", serial: int = 0,
                 key: dns.tsig.Key | None = None) -> list[dns.message.Message]:
        """The messages of an AXFR or IXFR (from ``serial``) of the shard over TCP, each checked by
        dnspython (its TSIG chain too), signed with the shard's key (or ``key``; neither: unsigned)."""
        if key is None and shard is not None:
            key = self.key(shard)
        return list(dns.query.xfr(self.host, self.origin, rdtype, port=self.port, serial=serial, relativize=False,
                                  timeout=10, keyring={key.name: key} if key else None,
                                  keyname=key.name if key else None,
                                  keyalgorithm=key.algorithm if key else dns.tsig.default_algorithm))
