"""Child processes of tests and benchmarks, and where our own programs are.

Every server (knotd, etcd, the router, dnsperf, dnsdist) is started by
spawn() and stopped by stop(), so that:

* it dies with us: the kernel SIGKILLs it when the thread that started it
  goes away (PR_SET_PDEATHSIG), so an interrupted or SIGKILLed test run
  never leaves servers holding ports. Start servers from the main thread (a
  thread that ends takes its children with it);
* it has its own session, so a Ctrl-C in the terminal reaches only the test
  run (or bench script), whose cleanup then stops it in order, and stop()
  can kill whatever it forked (the router's workers) with its group;
* stopping is SIGTERM, a wait with a deadline, then SIGKILL.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import psutil

PR_SET_PDEATHSIG = 1

# Loaded here, in the parent: the forked child, before exec, must only make
# the one call, not load a library.
_LIBC = ctypes.CDLL(None, use_errno=True)

# Started by spawn() and not stopped yet, oldest first (stop_all() stops
# them newest first, the reverse of the order they depend on each other).
_live: list[subprocess.Popen] = []


def program(name: str) -> Path:
    """One of our console scripts (dnsrouter, dnsrouterctl): beside this
    interpreter, in the virtual environment under test, never from PATH,
    which may hold another build."""
    return Path(sys.executable).parent / name


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs the child when the thread that forked it ends."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen:
    """Popen(argv) in its own session, dying with its parent; stdin is /dev/null unless given."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=die_with_parent, **kw)
    _live.append(proc)
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen | None, timeout: float = 10.0, *, sig: int = signal.SIGTERM) -> int | None:
    """Send sig (SIGTERM), wait up to timeout, then SIGKILL; return the exit status.

    A process from spawn() leads its own process group: whatever is left in
    it afterwards (a child that outlived its parent) is SIGKILLed too.
    Idempotent, and fine on a process that has exited already.
    """
    if proc is None:
        return None
    own_group = proc in _live
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  ! pid {proc.pid} ({os.path.basename(str(proc.args[0]))}) ignored "
                  f"{signal.Signals(sig).name} for {timeout:g}s, killing it", file=sys.stderr)
            if own_group:
                _kill_group(proc)
            else:
                proc.kill()
            proc.wait()
    if own_group:
        _kill_group(proc)
        _live.remove(proc)
    return proc.returncode


def stop_all(timeout: float = 5.0) -> None:
    """stop() every process spawn() started and nobody stopped, newest first."""
    for proc in reversed(list(_live)):
        stop(proc, timeout)


def gone(procs: Iterable[psutil.Process]) -> bool:
    """True when none of procs is running any more (a zombie counts as gone)."""
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return not any(alive(p) for p in procs)


def log_tail(path: str | Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a server's log, for failure messages ("" if unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
