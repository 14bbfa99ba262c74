"""Dropping root once the sockets are bound, and checking first that it can be done."""
from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
import subprocess
import sys

from dnsrouter.errors import ConfigError
from dnsrouter.settings import Config


def check(config: Config) -> None:
    """Refuse root on a privileged port unless told to: it is what `user` is for.

    Root on an unprivileged port (a test, a demo) is allowed: nothing needed
    root there, and the warning in the log says so.
    """
    if os.geteuid() != 0 or config.server_user or config.server_allow_root:
        return
    privileged = [str(a) for a in config.server_listen if a.port < 1024]
    if privileged:
        raise ConfigError(f"refusing to serve {', '.join(privileged)} as root: set [server] user "
                          "(the sockets are bound first, then root is dropped), or --allow-root")


def _entry(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"no such user: {user}") from None


def _groups(entry: pwd.struct_passwd) -> list[int]:
    return sorted({g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem} | {entry.pw_gid})


def check_user(config: Config) -> None:
    """With [server] user: raise ConfigError unless this process can become
    the user, and the user can run this interpreter, import dnsrouter and
    read the routes directory (the supervisor reads it after dropping root).

    Workers are started afresh from this interpreter after root is dropped. A
    virtual environment or checkout in a directory the user cannot enter
    (/root, say) would only show as workers dying at start with a traceback
    from multiprocessing; this finds it before a socket is bound, by running
    the interpreter as that user.
    """
    user = config.server_user
    if not user:
        return
    entry = _entry(user)
    if os.geteuid() != 0:
        if os.geteuid() != entry.pw_uid:
            raise ConfigError(f"cannot become {user}: not running as root")
        return
    command = [sys.executable, "-c", "import dnsrouter.workers, dnsrouter.supervisor"]
    try:
        result = subprocess.run(command, user=entry.pw_uid, group=entry.pw_gid, extra_groups=_groups(entry),
                                cwd="/", env=dict(os.environ, HOME=entry.pw_dir), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=30)
        failure = result.stderr.strip().splitlines()[-1:] if result.returncode else None
    except OSError as e:  # the interpreter cannot even be executed
        failure = [e.strerror or str(e)]
    except subprocess.TimeoutExpired:
        failure = ["it did not finish in 30 s"]
    if failure is not None:
        denied = _first_denied(entry, _needed_paths())
        why = f"{denied} is not readable by {user}" if denied else f"{' '.join(failure) or 'it failed'}"
        raise ConfigError(f"[server] user {user} cannot run {sys.executable} with dnsrouter: {why}")
    denied = _first_denied(entry, [config.registry_routes_dir] if config.registry_routes_dir else [])
    if denied:
        raise ConfigError(f"[server] user {user} cannot read {denied}")


def _needed_paths() -> list[str]:
    """What a worker reads to start: the interpreter and the package's folders
    (looked up, not imported: the supervisor does not import the workers)."""
    paths = [sys.executable, os.path.realpath(sys.executable)]
    for package in ("dnsrouter", "dnsrouter.workers", "dnsrouter.supervisor"):
        spec = importlib.util.find_spec(package)
        paths += list(spec.submodule_search_locations or []) if spec else []
    return paths


def _first_denied(entry: pwd.struct_passwd, paths: list[str]) -> str | None:
    """The first of ``paths``, or of the directories above them, that
    ``entry`` cannot use by the permission bits: enter every directory on
    the way, read the path itself (and enter it, if it is a directory)."""
    groups = set(_groups(entry))
    for path in paths:
        parts = os.path.abspath(path).split(os.sep)
        for depth in range(2, len(parts) + 1):
            here = os.sep.join(parts[:depth])
            try:
                st = os.stat(here)
            except OSError:
                return here
            last = depth == len(parts)
            need = (stat.S_IRUSR if last else 0) | (stat.S_IXUSR if stat.S_ISDIR(st.st_mode) else 0)
            # owner bits, group bits or other bits, by who the user is to the file
            shift = 0 if st.st_uid == entry.pw_uid else 3 if st.st_gid in groups else 6
            if (st.st_mode << shift) & need != need:
                return here
    return None


def drop(user: str) -> None:
    """Become ``user`` (and its groups) for good."""
    entry = _entry(user)
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return
        raise ConfigError(f"cannot become {user}: not running as root")
    os.setgroups(_groups(entry))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
