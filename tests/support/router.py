"""The real router as a subprocess, for integration tests and benchmarks."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import IO, Sequence

import dns.message
import psutil

from support.net import HOST, free_port, raw_udp, wait_until
from support.processes import spawn, stop

# The two UDP packet paths, each with the ``--fast-path`` setting that asks
# for it: compiled (workers/_fastpath.pyx) and the pure-Python reference.
PACKET_PATHS = {"compiled": "auto", "python": "off"}

# What a worker's log says of its packet path (workers/fastpath.py) when it
# was asked for it with each ``--fast-path`` setting. "auto" must mean the
# compiled path here: the tests run a checkout whose build made it.
_FAST_PATH_SAYS = {"auto": "on", "off": "off: [server] fast_path = off"}
_FAST_PATH_LINE = re.compile(r"worker (\d+): fast path (.*?)\s*$", re.MULTILINE)


def packet_paths(names: str) -> dict[str, str]:
    """The PACKET_PATHS named in a comma-separated list (DNSROUTER_PACKET_PATHS).

    ValueError for an unknown or empty name: a typo must not quietly run
    fewer paths than were asked for, or none.
    """
    chosen = [name.strip() for name in names.split(",")]
    unknown = [name for name in chosen if name not in PACKET_PATHS]
    if unknown:
        raise ValueError(f"unknown packet path(s) {unknown} in {names!r}: "
                         f"a comma-separated list of {', '.join(PACKET_PATHS)}")
    return {name: PACKET_PATHS[name] for name in chosen}


class Router:
    """``dnsrouter`` on a free port with a routes directory (or any flags)."""

    def __init__(self, routes_dir: str | None = None, workers: int = 1,
                 args: Sequence[str] = (), port: int | None = None, *,
                 executable: Sequence[str] | None = None, log_level: str | None = "debug",
                 workdir: str | None = None, fast_path: str | None = None) -> None:
        """executable: the command that runs dnsrouter (default ``python -m
        dnsrouter`` of this interpreter); workdir: the router's cwd, log and
        default routes dir (default a new temporary directory, removed by
        stop()); log_level: None passes no --log-level, so the config file's
        level counts; fast_path: a ``--fast-path`` setting (PACKET_PATHS),
        which start() then checks every worker runs."""
        if fast_path is not None and (fast_path not in _FAST_PATH_SAYS or log_level not in ("debug", "info", None)):
            # The workers say which path they run at level info; with None the
            # config file's level must let that line through.
            raise ValueError(f"fast_path={fast_path!r} needs one of {list(_FAST_PATH_SAYS)} "
                             f"and log_level debug or info, not {log_level!r}")
        self.port = port or free_port()
        self.workers = workers
        self.executable = list(executable) if executable else [sys.executable, "-m", "dnsrouter"]
        self.log_level = log_level
        self.fast_path = fast_path
        self._kept_log: str | None = None
        if workdir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="dnsrouter-test-"))
            # Removed by stop(), or when the Router is dropped or the run
            # ends without one (a test that never stopped it).
            self._remove_dir = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        else:
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_dir = None
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
        if self.fast_path is not None:
            cmd += ["--fast-path", self.fast_path]
        return cmd + self.args

    def start(self, wait: bool = True) -> "Router":
        """Start it; with wait, until it answers with every worker running
        the fast path asked for (stopped and cleaned up if it does not)."""
        self._log = open(self.log_path, "ab")
        # cwd outside the checkout: the source folder must not shadow the package.
        self.proc = spawn(self.command(), cwd=self.dir, stdout=self._log, stderr=self._log)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
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
        self.check_fast_path(timeout)

    def fast_paths(self) -> dict[int, str]:
        """{worker number: what its log last said of its fast path} ("on", "off: why")."""
        return {int(number): why for number, why in _FAST_PATH_LINE.findall(self.log())}

    def check_fast_path(self, timeout: float = 5.0) -> None:
        """AssertionError unless every worker runs the fast path asked for
        (a test of one packet path that runs the other proves nothing)."""
        if self.fast_path is None:
            return
        says = wait_until(lambda: len(paths := self.fast_paths()) >= self.workers and paths, timeout,
                          message=f"not every worker said which fast path it runs:\n{self.log()[-2000:]}")
        want = _FAST_PATH_SAYS[self.fast_path]
        wrong = {number: why for number, why in sorted(says.items()) if why != want}
        assert not wrong, (f"asked for --fast-path {self.fast_path} (fast path {want!r}), but workers "
                           f"say {wrong}; command: {' '.join(self.command())}")

    def log(self) -> str:
        """Its stderr so far (kept in memory once stop() removed its directory)."""
        if self._kept_log is not None:
            return self._kept_log
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
        """SIGTERM, then SIGKILL; the workers (in its process group) are killed too whatever happens.

        A temporary directory it made is removed, its log kept for log().
        """
        code = None if self.proc is None else stop(self.proc, timeout)
        if self._log is not None:
            self._log.close()
        if self._remove_dir is not None and self._remove_dir.alive:
            self._kept_log = self.log()
            self._remove_dir()
        return code

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
