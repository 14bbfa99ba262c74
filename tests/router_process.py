"""The real router as a subprocess, for integration tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import dns.message
import psutil

from netutil import HOST, free_port, wait_until


def raw_udp(port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    """Send bytes, return the reply's bytes, or None when nothing comes back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, (HOST, port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


class Router:
    """``dnsrouter`` on a free port with a routes directory (or any flags)."""

    def __init__(self, routes_dir: str | None = None, workers: int = 1,
                 args: Sequence[str] = (), port: int | None = None, *,
                 executable: Sequence[str] | None = None, log_level: str = "debug",
                 workdir: str | None = None, new_session: bool = False) -> None:
        """executable: the command that runs dnsrouter (default ``python -m
        dnsrouter`` of this interpreter); workdir: the router's cwd, log and
        default routes dir (default a new temporary directory); new_session:
        start it in its own session, so a Ctrl-C in the terminal reaches only
        this process, which then stops the router in order."""
        self.port = port or free_port()
        self.workers = workers
        self.executable = list(executable) if executable else [sys.executable, "-m", "dnsrouter"]
        self.log_level = log_level
        self.new_session = new_session
        if workdir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="dnsrouter-test-"))
        else:
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.routes_dir = Path(routes_dir) if routes_dir else self.dir / "routes"
        self.routes_dir.mkdir(exist_ok=True)
        self.args = list(args)
        self.log_path = self.dir / "stderr.log"
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def route(self, key: str, value: str) -> None:
        """Write a route file atomically (the registry must never see half of it)."""
        tmp = self.routes_dir / f".{key}.tmp"
        tmp.write_text(value)
        os.replace(tmp, self.routes_dir / key)

    def unroute(self, key: str) -> None:
        (self.routes_dir / key).unlink()

    def command(self) -> list[str]:
        cmd = [*self.executable, "--listen", self.addr,
               "--workers", str(self.workers), "--log-level", self.log_level]
        if "--etcd" not in self.args:
            cmd += ["--routes-dir", str(self.routes_dir)]
        return cmd + self.args

    def start(self, wait: bool = True) -> "Router":
        self._log = open(self.log_path, "ab")
        # cwd outside the checkout: the source folder must not shadow the package.
        self.proc = subprocess.Popen(self.command(), cwd=self.dir, stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL, start_new_session=self.new_session)
        if wait:
            self.wait_ready()
        return self

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"router exited with {self.proc.returncode}:\n{self.log()}")
        query = dns.message.make_query("ready.invalid.", "A").to_wire()
        return raw_udp(self.port, query, timeout=0.2) is not None

    def wait_ready(self, timeout: float = 15.0) -> None:
        wait_until(self.answers, timeout, message=f"router never answered:\n{self.log()}")
        wait_until(lambda: len(self.worker_pids()) == self.workers, timeout,
                   message="not every worker is up")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def workers_procs(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        out = []
        for child in children:
            try:
                if "dnsrouter: worker" in " ".join(child.cmdline()):
                    out.append(child)
            except psutil.Error:
                pass
        return out

    def worker_pids(self) -> list[int]:
        return sorted(p.pid for p in self.workers_procs())

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL; every worker is killed too whatever happens."""
        if self.proc is None:
            return None
        workers = self.workers_procs()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for worker in workers:
            try:
                worker.kill()
            except psutil.Error:
                pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
