"""``dnsrouterctl``: register backends, inspect the registry and the running router."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable

from . import config as configuration
from .errors import ConfigError, ValueParseError
from .routes import Matcher, build_routes, parse_value
from .settings import SETTINGS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnsrouterctl", description="Operate dnsrouter and its registry.")
    parser.add_argument("--config", metavar="FILE", help="the router's INI file (for the registry and metrics)")
    for setting in SETTINGS:  # the same flags, help and validation as the router's
        if setting.flag and setting.section in ("registry", "metrics"):
            parser.add_argument(setting.flag, dest=setting.name, help=setting.help)
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register a backend for names matching REGEXP; prints the key")
    register.add_argument("address", metavar="ADDR:PORT")
    register.add_argument("regexp", metavar="REGEXP")
    register.add_argument("--ttl", type=int, help="the key expires after this many seconds")
    register.add_argument("--keepalive", action="store_true",
                          help="stay running and refresh the TTL; the key goes away when this stops")
    deregister = commands.add_parser("deregister", help="remove a registration")
    deregister.add_argument("key")
    commands.add_parser("list", help="keys, values, and whether (and why not) each parses")
    which = commands.add_parser("which", help="the pool a name routes to, by the router's own matcher")
    which.add_argument("name")
    commands.add_parser("routes", help="the running router's live table with backend health (needs --metrics)")
    commands.add_parser("status", help="whether the running router serves (needs --metrics)")
    return parser


class _Etcd:
    """The registry's etcd, each call tried on every endpoint in turn."""

    def __init__(self, config: Any) -> None:
        import etcd  # only the commands that talk to etcd need python-etcd

        self.etcd = etcd
        self.prefix = config.registry_prefix
        self.clients = []
        for url in config.registry_etcd:
            u = urllib.parse.urlsplit(url)
            host = f"[{u.hostname}]" if ":" in (u.hostname or "") else u.hostname
            cert = (config.registry_cert, config.registry_key) if config.registry_key else config.registry_cert
            self.clients.append(etcd.Client(host=host, port=u.port or 2379, protocol=u.scheme,
                                            username=config.registry_username,
                                            password=config.registry_password,
                                            ca_cert=config.registry_ca_cert, cert=cert, read_timeout=5))

    def call(self, operation: Callable) -> Any:
        error: Exception | None = None
        for client in self.clients:
            try:
                return operation(client)
            except self.etcd.EtcdConnectionFailed as e:
                error = e
        raise SystemExit(f"dnsrouterctl: etcd unreachable: {error}")

    def records(self) -> list[tuple[str, str, int]]:
        """(key, value, createdIndex) of every route key, in registration order."""
        def read(client):
            try:
                return client.read(self.prefix.rstrip("/"), recursive=True)
            except self.etcd.EtcdKeyNotFound:
                return None
        result = self.call(read)
        if result is None or not result.dir:
            return []
        out = [(n.key[len(self.prefix):], n.value or "", n.createdIndex)
               for n in result.leaves if not n.dir and n.key.startswith(self.prefix)
               and "/" not in n.key[len(self.prefix):]]
        return sorted(out, key=lambda r: r[2])


def _records(config: Any) -> list[tuple[str, str, int]]:
    if config.registry_routes_dir:
        from .supervisor.registry.files import FileRegistry
        return [(r.key, r.value, r.order) for r in FileRegistry(config.registry_routes_dir).scan() or []]
    return _Etcd(config).records()


def _http(config: Any, path: str) -> tuple[int, bytes]:
    if config.metrics_listen is None:
        raise SystemExit("dnsrouterctl: give --metrics ADDR:PORT (the router's [metrics] listen)")
    try:
        with urllib.request.urlopen(f"http://{config.metrics_listen}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        raise SystemExit(f"dnsrouterctl: router not reachable at {config.metrics_listen}: {e}")


def cmd_register(config: Any, args: argparse.Namespace) -> int:
    value = f"{args.address},{args.regexp}"
    try:
        parse_value(value)  # refused here, before it reaches etcd
    except ValueParseError as e:
        print(f"dnsrouterctl: refused: {e}", file=sys.stderr)
        return 2
    if args.keepalive and not args.ttl:
        print("dnsrouterctl: --keepalive needs --ttl", file=sys.stderr)
        return 2
    store = _Etcd(config)
    key = str(uuid.uuid4())
    path = store.prefix + key
    store.call(lambda c: c.write(path, value, ttl=args.ttl))
    print(key, flush=True)
    if not args.keepalive:
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Refresh well before expiry, so one lost refresh does not drop the route.
    while not stop.wait(max(args.ttl / 3, 0.2)):
        try:
            store.call(lambda c: c.refresh(path, ttl=args.ttl))
        except store.etcd.EtcdKeyNotFound:
            store.call(lambda c: c.write(path, value, ttl=args.ttl))  # expired meanwhile: again
        except SystemExit as e:
            print(e, file=sys.stderr)  # etcd away: keep trying, the key may survive
    try:
        store.call(lambda c: c.delete(path))
    except store.etcd.EtcdKeyNotFound:
        pass
    return 0


def cmd_deregister(config: Any, args: argparse.Namespace) -> int:
    store = _Etcd(config)
    key = args.key[len(store.prefix):] if args.key.startswith(store.prefix) else args.key
    try:
        store.call(lambda c: c.delete(store.prefix + key))
    except store.etcd.EtcdKeyNotFound:
        print(f"dnsrouterctl: no key {key}", file=sys.stderr)
        return 1
    return 0


def cmd_list(config: Any, args: argparse.Namespace) -> int:
    for key, value, _ in _records(config):
        try:
            parse_value(value)
            verdict = "ok"
        except ValueParseError as e:
            verdict = f"invalid: {e}"
        print(f"{key}\t{value.strip()}\t{verdict}")
    return 0


def cmd_which(config: Any, args: argparse.Namespace) -> int:
    values = []
    for _, value, order in _records(config):
        try:
            values.append((order, parse_value(value)))
        except ValueParseError:
            pass
    name = args.name.lower()
    name = name if name.endswith(".") else name + "."
    pool = Matcher(build_routes(values)).lookup(name)
    if pool is None:
        print(f"{name}: no route (SERVFAIL)")
        return 1
    print(f"{name}: {pool.route.pattern} -> {' '.join(str(b) for b in pool.backends)}")
    return 0


def cmd_routes(config: Any, args: argparse.Namespace) -> int:
    _, body = _http(config, "/routes")
    table = json.loads(body)
    print(f"routes version {table['version']}")
    for route in table["routes"]:
        backends = ", ".join(f"{b['address']} ({'up' if b['up'] else 'down: ' + b['reason']})"
                             for b in route["backends"])
        print(f"{route['pattern']}\t{backends}")
    for key, reason in table["invalid"].items():
        print(f"invalid key {key}: {reason}")
    return 0


def cmd_status(config: Any, args: argparse.Namespace) -> int:
    status, body = _http(config, "/healthz")
    print(body.decode().strip())
    return 0 if status == 200 else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for setting in SETTINGS:  # what ctl has no flag for comes from the file or the default
        if not hasattr(args, setting.name):
            setattr(args, setting.name, None)
    try:
        config = configuration.load(args)
    except ConfigError as e:
        print(f"dnsrouterctl: {e}", file=sys.stderr)
        return 2
    return globals()[f"cmd_{args.command}"](config, args)


if __name__ == "__main__":
    sys.exit(main())
