"""The real router as a subprocess, for integration tests and benchmarks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Sequence

import dns.message
import psutil

from support.net import HOST, free_port, raw_udp, wait_until
from support.processes import spawn, stop


class Router:
    """``dnsrouter`` on a free port with a routes directory (or any flags)."""

    def __init__(self, routes_dir: str | None = None, workers: int = 1,
                 args: Sequence[str] = (), port: int | None = None, *,
                 executable: Sequence[str] | None = None, log_level: str | None = "debug",
                 workdir: str | None = None) -> None:
        """executable: the command that runs dnsrouter (default ``python -m
        dnsrouter`` of this interpreter); workdir: the router's cwd, log and
        default routes dir (default a new temporary directory); log_level:
        None passes no --log-level, so the config file's level counts."""
        self.port = port or free_port()
        self.workers = workers
        self.executable = list(executable) if executable else [sys.executable, "-m", "dnsrouter"]
        self.log_level = log_level
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
        self._log: IO[bytes] | None = None

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
        cmd = [*self.executable, "--listen", self.addr, "--workers", str(self.workers)]
        if self.log_level is not None:
            cmd += ["--log-level", self.log_level]
        if "--etcd" not in self.args:
            cmd += ["--routes-dir", str(self.routes_dir)]
        return cmd + self.args

    def start(self, wait: bool = True) -> "Router":
        self._log = open(self.log_path, "ab")
        # cwd outside the checkout: the source folder must not shadow the package.
        self.proc = spawn(self.command(), cwd=self.dir, stdout=self._log, stderr=self._log)
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

    def numbered_workers(self) -> dict[str, psutil.Process]:
        """{worker number, as in its title "dnsrouter: worker N": process} of the live workers."""
        out = {}
        for proc in self.workers_procs():
            try:
                m = re.search(r"dnsrouter: worker (\d+)", " ".join(proc.cmdline()))
            except psutil.Error:
                continue
            if m:
                out[m.group(1)] = proc
        return out

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL; the workers (in its process group) are killed too whatever happens."""
        if self.proc is None:
            return None
        code = stop(self.proc, timeout)
        if self._log is not None:
            self._log.close()
        return code

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
