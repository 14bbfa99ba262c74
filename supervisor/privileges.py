"""Dropping root once the sockets are bound."""
from __future__ import annotations

import grp
import os
import pwd
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


def drop(user: str) -> None:
    """Become ``user`` (and its groups) for good."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"no such user: {user}") from None
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return
        raise ConfigError(f"cannot become {user}: not running as root")
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(sorted(set(groups + [entry.pw_gid])))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir
