"""Every setting, declared once: INI key, flag, type, default, help.

Each setting is one field of ``Config``, its Setting in the field's metadata.
The command line parser, the INI reader, ``--check-config`` and SIGHUP all
work from ``SETTINGS``, the fields' Settings in order, so a setting cannot
exist in one place and not another, and Config has a real type per field.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from .address import Address, parse_address
from .routes import CLIENT_ADDRESS_MODES


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < 3600:
        raise ValueError(f"{text!r} is not a number of seconds in (0, 3600)")
    return value


def _ttl(text: str) -> float:
    value = float(text)
    if not 0 < value <= 0x7FFFFFFF:  # RFC 2181 section 8: a TTL is at most 2^31 - 1
        raise ValueError(f"{text!r} is not a number of seconds in (0, 2147483647]")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a positive whole number")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{text!r} is not a whole number of 0 or more")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"{text!r} is not a whole number in {low}-{high}")
        return value

    return parse


_RATE = _int_in(0, 100_000_000)  # a rate or burst: more is no limit, and the arithmetic stays in 64 bits


def _workers(text: str) -> int:
    """``auto`` is one worker per CPU this process may run on."""
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    value = positive_int(text)
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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(text: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for part in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def _choice(*values: str) -> Callable[[str], str]:
    """One of ``values``, in any case."""
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in values:
            raise ValueError(f"{text!r} is not one of {', '.join(values)}")
        return value

    return parse


def _prefix_length(bits: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not 0 <= value <= bits:
            raise ValueError(f"{text!r} is not a prefix length in 0-{bits}")
        return value

    return parse


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
    metavar: str | None = None  # how --help writes the flag's value
    # SIGHUP applies it without a restart: the workers (workers/live.py) or the
    # supervisor (arbiter.SUPERVISOR_LIVE) must say how, or test_live_settings fails.
    live: bool = False

    @property
    def name(self) -> str:
        """The attribute of Config: ``section_key``."""
        return f"{self.section}_{self.key}"

    @property
    def label(self) -> str:
        """How messages name it: ``[section] key``, as the INI file writes it."""
        return f"[{self.section}] {self.key}"


def declare(section: str, key: str, default: str, parse: Callable[[str], Any], help: str, *,
             flag: str | None = None, metavar: str | None = None, live: bool = False) -> Any:
    """A Config field that carries its Setting: the one declaration of a setting."""
    return field(metadata={"setting": Setting(section, key, default, parse, help, flag, metavar, live)})


@dataclass(frozen=True)
class Config:
    """The effective configuration: one field per setting, named ``section_key``.

    Each field's type is what its ``parse`` returns; its Setting (INI key,
    flag, default, help) rides in the field's metadata, so adding a setting
    is adding a field here.
    """

    server_listen: tuple[Address, ...] = declare(
        "server", "listen", "127.0.0.1:53", _addresses,
        "address to serve, ip:port or [ipv6]:port (repeat the flag for several)",
        flag="--listen", metavar="ADDR:PORT")
    server_workers: int = declare(
        "server", "workers", "auto", _workers,
        "worker processes: a number, or auto for one per usable CPU", flag="--workers", metavar="N|auto")
    server_user: str | None = declare(
        "server", "user", "", _optional(_string),
        "run as this user after binding the sockets", flag="--user", metavar="USER")
    server_pidfile: str | None = declare(
        "server", "pidfile", "", _optional(_string),
        "write the supervisor's PID to this file", flag="--pidfile", metavar="FILE")
    server_allow_root: bool = declare(
        "server", "allow_root", "no", _bool,
        "allow running as root on a privileged port without `user`", flag="--allow-root")
    server_cpu_affinity: str | tuple[int, ...] = declare(
        "server", "cpu_affinity", "auto", _cpus,
        "pin worker K to CPU K (auto: when workers <= CPUs), off, or a list of CPUs")
    server_socket_affinity: bool = declare(
        "server", "socket_affinity", "off", _bool,
        "on: a datagram goes to the worker pinned to the CPU that received it (each worker pinned "
        "to a CPU of its own; for network cards with a queue per worker); off: by hash of the "
        "client's address and port")
    server_heartbeat_timeout: float = declare(
        "server", "heartbeat_timeout", "10", positive_float,
        "seconds a worker may stay silent before it is killed and replaced")
    server_allow: tuple[IPNetwork, ...] = declare(
        "server", "allow", "", _networks,
        "clients allowed, as addresses or CIDR networks; empty: everyone (an authoritative "
        "front serves the Internet)")
    server_fast_path: str = declare(
        "server", "fast_path", "auto", _choice("auto", "off"),
        "the compiled UDP packet path: auto (when the install could build it) or off (pure Python)",
        flag="--fast-path", metavar="auto|off")
    server_deny_action: str = declare(
        "server", "deny_action", "refuse", _choice("refuse", "drop"),
        "what other clients get over UDP: refuse (REFUSED) or drop; over TCP they are closed")
    server_max_in_flight: int = declare(
        "server", "max_in_flight", "20000", positive_int,
        "queries a worker may have waiting for backends; beyond it new ones are dropped")
    server_udp_receive_buffer: int = declare(
        "server", "udp_receive_buffer", "4194304", _int_in(65536, 1 << 29),
        "bytes of datagrams each UDP socket holds for its worker (SO_RCVBUF; about 1 KiB a query, the "
        "kernel counting twice what is set): what absorbs a burst or a flood while a worker is busy. "
        "Started as root the router sets it past net.core.rmem_max; otherwise the kernel caps it there")
    server_tcp_connections: int = declare(
        "server", "tcp_connections", "256", positive_int,
        "TCP client connections per worker; more are closed at once")
    server_tcp_idle_timeout: float = declare(
        "server", "tcp_idle_timeout", "10", positive_float,
        "seconds a TCP client connection may stay idle (RFC 7766)")
    server_tcp_output_limit: int = declare(
        "server", "tcp_output_limit", "262144", positive_int,
        "bytes of replies a TCP client may leave unread; past it the client is disconnected")
    registry_etcd: tuple[str, ...] = declare(
        "registry", "etcd", "http://127.0.0.1:2379", _urls,
        "etcd endpoints, comma separated", flag="--etcd", metavar="URL[,URL...]")
    registry_etcd_api: str = declare(
        "registry", "etcd_api", "v3", _choice("v3", "v2"),
        "etcd API: v3 (etcd 3.x), or v2 (the keys API, etcd started with --enable-v2)",
        flag="--etcd-api", metavar="v3|v2")
    registry_prefix: str = declare(
        "registry", "prefix", "/dnsrouter/", _prefix,
        "etcd key prefix of the routes", flag="--prefix", metavar="PATH")
    registry_routes_dir: str | None = declare(
        "registry", "routes_dir", "", _optional(_directory),
        "use this directory as the registry (one file per key) instead of etcd",
        flag="--routes-dir", metavar="DIR")
    registry_username: str | None = declare("registry", "username", "", _optional(_string), "etcd user name")
    registry_password: str | None = declare("registry", "password", "", _optional(_string), "etcd password")
    registry_ca_cert: str | None = declare("registry", "ca_cert", "", _optional(_string),
                                            "CA bundle for https etcd")
    registry_cert: str | None = declare("registry", "cert", "", _optional(_string),
                                         "client certificate for etcd")
    registry_key: str | None = declare("registry", "key", "", _optional(_string), "client key for etcd")
    health_interval: float = declare(
        "health", "interval", "2", positive_float,
        "seconds between two health checks of a backend", live=True)
    health_timeout: float = declare(
        "health", "timeout", "1", positive_float, "seconds a health check may take", live=True)
    health_fall: int = declare(
        "health", "fall", "3", positive_int, "failures in a row that take a backend down", live=True)
    health_rise: int = declare(
        "health", "rise", "2", positive_int, "successes in a row that bring a backend back", live=True)
    forward_timeout: float = declare(
        "forward", "timeout", "1", positive_float,
        "seconds a query waits for any backend's reply before the router answers SERVFAIL", live=True)
    forward_retry_min: float = declare(
        "forward", "retry_min", "0.02", positive_float,
        "seconds at least before a query not yet answered is also sent to another backend "
        "(the wait is the backend's SRTT + 4 x RTTVAR, at most half of timeout)", live=True)
    forward_tcp_fetches: int = declare(
        "forward", "tcp_fetches", "32", positive_int,
        "truncated replies a worker fetches again over TCP at once; more wait their turn")
    forward_client_address: str = declare(
        "forward", "client_address", "none", _choice(*CLIENT_ADDRESS_MODES),
        "how backends learn the client's address: none, proxy (a PROXY v2 header before each "
        "datagram) or ecs (an EDNS Client Subnet option); a JSON registry value may set its own",
        flag="--client-address", metavar="none|proxy|ecs")
    forward_proxy_tcp: bool = declare(
        "forward", "proxy_tcp", "no", _bool,
        "with proxy: send the header on the TCP connections that fetch truncated answers too")
    forward_ecs_ipv4_prefix: int = declare(
        "forward", "ecs_ipv4_prefix", "24", _prefix_length(32),
        "with ecs: bits of an IPv4 client address the backend sees")
    forward_ecs_ipv6_prefix: int = declare(
        "forward", "ecs_ipv6_prefix", "56", _prefix_length(128),
        "with ecs: bits of an IPv6 client address the backend sees")
    forward_ecs_override: bool = declare(
        "forward", "ecs_override", "no", _bool,
        "with ecs: replace a client's own ECS option (no: forward the client's as it is)")
    forward_no_route: str = declare(
        "forward", "no_route", "servfail", _choice("servfail", "refused"),
        "the answer to a query no route matches: servfail, or refused (what an authoritative server "
        "answers for a zone it does not serve)", flag="--no-route", metavar="servfail|refused")
    cache_size: int = declare(
        "cache", "size", "0", _non_negative_int,
        "backend replies each worker caches and answers itself (0: no cache); at most size x 2 KiB of "
        "memory too. Only routes whose client address mode is none", flag="--cache-size", metavar="N")
    cache_max_ttl: float = declare(
        "cache", "max_ttl", "3600", _ttl,
        "seconds at most a reply is served from the cache (its records' least TTL if lower); "
        "the TTLs go out as the backend gave them")
    cache_max_negative_ttl: float = declare(
        "cache", "max_negative_ttl", "300", _ttl,
        "seconds at most an NXDOMAIN or NODATA reply is served from the cache (its SOA's, RFC 2308, if lower)")
    cache_notify_allow: tuple[IPNetwork, ...] = declare(
        "cache", "notify_allow", "", _networks,
        "addresses or CIDR networks whose NOTIFY for a zone purges it from every worker's cache "
        "(answered NOERROR); from elsewhere NOTIFY is REFUSED; empty: nobody")
    limits_client_qps: int = declare(
        "limits", "client_qps", "0", _RATE,
        "UDP queries a second each client network may send, all workers together; over it they are "
        "dropped (0: no limit)", flag="--client-qps", metavar="N")
    limits_burst: int = declare(
        "limits", "burst", "0", _RATE,
        "queries a client network may send at once above its rate, after a quiet spell (0: client_qps, "
        "one second's worth)")
    limits_ipv4_prefix: int = declare(
        "limits", "ipv4_prefix", "24", _prefix_length(32), "bits of an IPv4 client address that make its network")
    limits_ipv6_prefix: int = declare(
        "limits", "ipv6_prefix", "56", _prefix_length(64), "bits of an IPv6 client address that make its network")
    limits_exempt: tuple[IPNetwork, ...] = declare(
        "limits", "exempt", "", _networks, "addresses or CIDR networks never limited")
    limits_table_size: int = declare(
        "limits", "table_size", "65536", _int_in(1024, 1 << 22),
        "client networks tracked at once (16 bytes each, shared by the workers); beyond it the least "
        "limited network is forgotten")
    rrl_responses_per_second: int = declare(
        "rrl", "responses_per_second", "0", _RATE,
        "response rate limiting (BIND's RRL): identical answers (name, type) a second to one client "
        "network over UDP (0: off)", flag="--rrl", metavar="N")
    rrl_nxdomains_per_second: int | None = declare(
        "rrl", "nxdomains_per_second", "", _optional(_RATE),
        "NXDOMAIN answers a second to one client network for one zone (empty: responses_per_second; 0: no limit)")
    rrl_errors_per_second: int | None = declare(
        "rrl", "errors_per_second", "", _optional(_RATE),
        "error answers (SERVFAIL, REFUSED, FORMERR, NOTIMP) a second to one client network, all together "
        "(empty: responses_per_second; 0: no limit)")
    rrl_slip: int = declare(
        "rrl", "slip", "2", _int_in(0, 10),
        "every slip-th limited answer goes out as a minimal truncated (TC) reply, so that a real client "
        "retries over TCP; the others are dropped (0: drop all, 1: slip all)")
    rrl_window: int = declare(
        "rrl", "window", "15", _int_in(1, 3600),
        "seconds over which rates are averaged: a network that went over stays limited until its rate over "
        "the window is back under the limit")
    rrl_ipv4_prefix: int = declare(
        "rrl", "ipv4_prefix", "24", _prefix_length(32), "bits of an IPv4 client address that make its network")
    rrl_ipv6_prefix: int = declare(
        "rrl", "ipv6_prefix", "56", _prefix_length(64), "bits of an IPv6 client address that make its network")
    rrl_exempt: tuple[IPNetwork, ...] = declare(
        "rrl", "exempt", "", _networks, "addresses or CIDR networks whose answers are never limited")
    rrl_table_size: int = declare(
        "rrl", "table_size", "65536", _int_in(1024, 1 << 22),
        "(network, answer) accounts tracked at once (16 bytes each, shared by the workers); beyond it the "
        "least limited account is forgotten")
    metrics_listen: Address | None = declare(
        "metrics", "listen", "", _optional(parse_address),
        "serve /metrics, /routes and /healthz over HTTP at ip:port", flag="--metrics", metavar="ADDR:PORT", live=True)
    log_level: str = declare(
        "log", "level", "info", _level,
        "log level: debug, info, warning, error", flag="--log-level", metavar="LEVEL", live=True)
    log_target: str = declare(
        "log", "target", "stderr", _string,
        "where the log goes: stderr, syslog, or a file path (reopened on SIGUSR1)")
    log_queries: bool = declare(
        "log", "queries", "no", _bool,
        "log every query (transport, client, name, type, and the route's pattern or SERVFAIL); costs nothing when off", live=True)
    # Not a setting: the file the configuration was read from, if any.
    config_file: str | None = None


SETTINGS: tuple[Setting, ...] = tuple(f.metadata["setting"] for f in fields(Config) if "setting" in f.metadata)
# A field named otherwise than its setting would read another setting's value.
assert all(f.name == f.metadata["setting"].name for f in fields(Config) if "setting" in f.metadata)


def settings_of(cls: type) -> tuple[Setting, ...]:
    """The Settings of a config class's fields, in order."""
    return tuple(f.metadata["setting"] for f in fields(cls) if "setting" in f.metadata)


def same_as(name: str) -> Any:
    """A field of another program's config class that is the router's setting
    ``name`` (``registry_etcd``): one declaration for both programs."""
    return field(metadata={"setting": next(s for s in SETTINGS if s.name == name)})
