"""Every setting, declared once: INI key, flag, type, default, help.

The command line parser, the INI reader, ``--check-config`` and SIGHUP all
work from this table, so a setting cannot exist in one place and not another.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Callable

from .address import Address, parse_address


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < 3600:
        raise ValueError(f"{text!r} is not a number of seconds in (0, 3600)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a positive whole number")
    return value


def _workers(text: str) -> int:
    """``auto`` is one worker per CPU this process may run on."""
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    value = _positive_int(text)
    if value > 1024:
        raise ValueError(f"{text!r} workers is more than 1024")
    return value


def _addresses(text: str) -> tuple[Address, ...]:
    return tuple(parse_address(part) for part in text.replace(",", " ").split())


def _urls(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in text.split(",") if u.strip())
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if not urls:
        raise ValueError("no etcd URL given")
    return urls


def _prefix(text: str) -> str:
    text = text.strip()
    if not text.startswith("/"):
        raise ValueError(f"{text!r} does not start with /")
    return text.rstrip("/") + "/"


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str) -> Any:
        return None if text.strip() == "" else parse(text)

    return parse_or_none


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def _cpus(text: str) -> str | tuple[int, ...]:
    """``auto`` (pin when workers <= CPUs), ``off``, or CPU numbers to pin to in turn."""
    value = text.strip().lower()
    if value in ("auto", "off"):
        return value
    try:
        cpus = tuple(int(part) for part in value.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{text!r} is not auto, off or a list of CPU numbers") from None
    if not cpus or min(cpus) < 0:
        raise ValueError(f"{text!r} is not auto, off or a list of CPU numbers")
    return cpus


def _networks(text: str) -> tuple:
    networks = []
    for part in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def _deny_action(text: str) -> str:
    value = text.strip().lower()
    if value not in ("refuse", "drop"):
        raise ValueError(f"{text!r} is not refuse or drop")
    return value


def _directory(text: str) -> str:
    """An existing directory: a typo must stop the start, not answer SERVFAIL to everything."""
    path = text.strip()
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory")
    return path


def _string(text: str) -> str:
    return text.strip()


_LEVELS = ("debug", "info", "warning", "error")


def _level(text: str) -> str:
    text = text.strip().lower()
    if text not in _LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(_LEVELS)}")
    return text


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: str  # as written in the file, so it goes through ``parse`` too
    parse: Callable[[str], Any]
    help: str
    flag: str | None = None  # the command-line flag, where there is one
    live: bool = False  # SIGHUP applies it without a restart

    @property
    def name(self) -> str:
        """The attribute of Config: ``section_key``."""
        return f"{self.section}_{self.key}"


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "listen", "127.0.0.1:53", _addresses,
            "address to serve, ip:port or [ipv6]:port (repeat the flag for several)",
            flag="--listen"),
    Setting("server", "workers", "auto", _workers,
            "worker processes: a number, or auto for one per usable CPU", flag="--workers"),
    Setting("server", "user", "", _optional(_string),
            "run as this user after binding the sockets", flag="--user"),
    Setting("server", "pidfile", "", _optional(_string),
            "write the supervisor's PID to this file", flag="--pidfile"),
    Setting("server", "allow_root", "no", _bool,
            "allow running as root on a privileged port without `user`", flag="--allow-root"),
    Setting("server", "cpu_affinity", "auto", _cpus,
            "pin worker K to CPU K (auto: when workers <= CPUs), off, or a list of CPUs"),
    Setting("server", "heartbeat_timeout", "10", _positive_float,
            "seconds a worker may stay silent before it is killed and replaced"),
    Setting("server", "allow", "", _networks,
            "clients allowed, as addresses or CIDR networks; empty: everyone (an authoritative "
            "front serves the Internet)"),
    Setting("server", "deny_action", "refuse", _deny_action,
            "what other clients get over UDP: refuse (REFUSED) or drop; over TCP they are closed"),
    Setting("server", "max_in_flight", "20000", _positive_int,
            "queries a worker may have waiting for backends; beyond it new ones are dropped"),
    Setting("server", "tcp_connections", "256", _positive_int,
            "TCP client connections per worker; more are closed at once"),
    Setting("server", "tcp_idle_timeout", "10", _positive_float,
            "seconds a TCP client connection may stay idle (RFC 7766)"),
    Setting("registry", "etcd", "http://127.0.0.1:2379", _urls,
            "etcd endpoints, comma separated (v2 keys API)", flag="--etcd"),
    Setting("registry", "prefix", "/dnsrouter/", _prefix,
            "etcd key prefix of the routes", flag="--prefix"),
    Setting("registry", "routes_dir", "", _optional(_directory),
            "use this directory as the registry (one file per key) instead of etcd",
            flag="--routes-dir"),
    Setting("registry", "username", "", _optional(_string), "etcd user name"),
    Setting("registry", "password", "", _optional(_string), "etcd password"),
    Setting("registry", "ca_cert", "", _optional(_string), "CA bundle for https etcd"),
    Setting("registry", "cert", "", _optional(_string), "client certificate for etcd"),
    Setting("registry", "key", "", _optional(_string), "client key for etcd"),
    Setting("health", "interval", "2", _positive_float,
            "seconds between two health checks of a backend", live=True),
    Setting("health", "timeout", "1", _positive_float,
            "seconds a health check may take", live=True),
    Setting("health", "fall", "3", _positive_int,
            "failures in a row that take a backend down", live=True),
    Setting("health", "rise", "2", _positive_int,
            "successes in a row that bring a backend back", live=True),
    Setting("forward", "timeout", "1", _positive_float,
            "seconds to wait for a backend's reply before the one retry", live=True),
    Setting("metrics", "listen", "", _optional(parse_address),
            "serve /metrics and /routes over HTTP at ip:port", flag="--metrics", live=True),
    Setting("log", "level", "info", _level,
            "log level: debug, info, warning, error", flag="--log-level", live=True),
    Setting("log", "target", "stderr", _string,
            "where the log goes: stderr, syslog, or a file path (reopened on SIGUSR1)"),
    Setting("log", "queries", "no", _bool,
            "log every query (client, name, type, backend); costs nothing when off", live=True),
)
