"""``dnsrouterctl``: register backends, inspect the registry and the running router.

It operates the control plane, so it lives on the supervisor's side and uses
the router's own registry code: the same etcd client, the same file scan,
the same value parser and matcher. The registry is opened only by the
commands that use it, and only the one configured: ``--routes-dir`` loads no
etcd client.
"""
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

from dnsrouter import config as configuration
from dnsrouter.errors import ConfigError, ValueParseError
from dnsrouter.routes import CLIENT_ADDRESS_MODES, Matcher, RouteValue, build_routes, parse_value
from dnsrouter.settings import SETTINGS, Config

from . import shard
from ..registry import ExpiringRegistry, RegistryError, open_etcd, open_registry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnsrouterctl", description="Operate dnsrouter and its registry.")
    parser.add_argument("--config", metavar="FILE", help="the router's INI file (for the registry and metrics)")
    for setting in SETTINGS:  # the same flags, help and validation as the router's
        if setting.flag and setting.section in ("registry", "metrics"):
            parser.add_argument(setting.flag, dest=setting.name, metavar=setting.metavar, help=setting.help)
    commands = parser.add_subparsers(dest="command", required=True)
    register = commands.add_parser("register", help="register a backend for names matching REGEXP; prints the key")
    register.add_argument("address", metavar="ADDR:PORT")
    register.add_argument("regexp", metavar="REGEXP")
    register.add_argument("--ttl", type=int, help="the key expires after this many seconds")
    register.add_argument("--client-address", choices=CLIENT_ADDRESS_MODES,
                          help="how this backend learns the client's address (default: the router's "
                               "[forward] client_address); registers a JSON value")
    register.add_argument("--keepalive", action="store_true",
                          help="stay running and refresh the TTL; the key goes away when this stops")
    deregister = commands.add_parser("deregister", help="remove a registration")
    deregister.add_argument("key")
    commands.add_parser("list", help="keys, values, and whether (and why not) each parses")
    which = commands.add_parser("which", help="the pool a name routes to, by the router's own matcher")
    which.add_argument("name")
    commands.add_parser("routes", help="the running router's live table with backend health (needs --metrics)")
    commands.add_parser("status", help="whether the running router serves (needs --metrics)")
    purge = commands.add_parser("purge", help="make every worker's packet cache forget NAME (needs --metrics)")
    purge.add_argument("name", metavar="NAME")
    purge.add_argument("--subtree", action="store_true", help="and every name below it")
    sharding = commands.add_parser("shard", help="split a zone file (signed or not) into N zone files, "
                                                 "one regexp each; optionally register them")
    sharding.add_argument("zonefile", metavar="ZONEFILE")
    sharding.add_argument("--origin", metavar="ZONE", required=True, help="the zone's name")
    sharding.add_argument("--shards", metavar="N", type=int, required=True, help="how many shards")
    sharding.add_argument("--out", metavar="DIR", required=True, help="a new or empty directory for 0.zone ...")
    sharding.add_argument("--register", metavar="ADDR:PORT", action="append", default=[],
                       help="the backend serving shard k, given N times in shard order: registers "
                            "ADDR:PORT,<regexp of shard k> in the registry (etcd or --routes-dir)")
    return parser


def _etcd(config: Config) -> ExpiringRegistry:
    if config.registry_routes_dir:
        raise _Refused("register and deregister write to etcd; with --routes-dir, "
                       "write or remove a file in the directory instead")
    return open_etcd(config)


class _Refused(Exception):
    """the command cannot do that (exit 2)"""


class _Unreachable(Exception):
    """the running router did not answer (exit 1)"""


def _http(config: Config, path: str, post: bool = False) -> tuple[int, bytes]:
    if config.metrics_listen is None:
        raise _Refused("give --metrics ADDR:PORT (the router's [metrics] listen)")
    request = urllib.request.Request(f"http://{config.metrics_listen}{path}", data=b"" if post else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:  # URLError too: its reason is the system's error
        reason = getattr(e, "reason", e)
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise _Unreachable(f"router at http://{config.metrics_listen}: {text[:1].lower() + text[1:]}") from None


def cmd_register(config: Config, args: argparse.Namespace) -> int:
    value = f"{args.address},{args.regexp}"
    try:
        parsed = parse_value(value)  # refused here, before it reaches etcd
        if args.client_address:
            value = RouteValue(parsed.backend, parsed.pattern, args.client_address).to_text()
    except ValueParseError as e:
        print(f"dnsrouterctl: refused: {e}", file=sys.stderr)
        return 2
    if args.keepalive and not args.ttl:
        print("dnsrouterctl: --keepalive needs --ttl", file=sys.stderr)
        return 2
    store = _etcd(config)
    key = str(uuid.uuid4())
    store.put(key, value, ttl=args.ttl)
    print(key, flush=True)
    if not args.keepalive:
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Refresh well before expiry, so one lost refresh does not drop the route.
    while not stop.wait(max(args.ttl / 3, 0.2)):
        try:
            if not store.refresh(key, args.ttl):
                store.put(key, value, ttl=args.ttl)  # expired meanwhile: again
        except RegistryError as e:
            print(f"dnsrouterctl: {e}", file=sys.stderr)  # etcd away: keep trying, the key may survive
    store.delete(key)
    return 0


def cmd_deregister(config: Config, args: argparse.Namespace) -> int:
    key = args.key[len(config.registry_prefix):] if args.key.startswith(config.registry_prefix) else args.key
    if not _etcd(config).delete(key):
        print(f"dnsrouterctl: no key {key}", file=sys.stderr)
        return 1
    return 0


def cmd_list(config: Config, args: argparse.Namespace) -> int:
    for record in open_registry(config).read():
        key, value = record.key, record.value
        try:
            parsed = parse_value(value)
            verdict = f"ok, client_address {parsed.client_address}" if parsed.client_address else "ok"
        except ValueParseError as e:
            verdict = f"invalid: {e}"
        print(f"{key}\t{value.strip()}\t{verdict}")
    return 0


def cmd_which(config: Config, args: argparse.Namespace) -> int:
    values = []
    for record in open_registry(config).read():
        try:
            values.append((record.order, parse_value(record.value)))
        except ValueParseError:
            pass
    name = args.name.lower()
    name = name if name.endswith(".") else name + "."
    pool = Matcher(build_routes(values)).lookup(name)
    if pool is None:
        print(f"{name}: no route (SERVFAIL)")
        return 1
    modes = pool.route.modes(config.forward_client_address)
    print(f"{name}: {pool.route.pattern} -> {' '.join(f'{b} ({modes[b]})' for b in pool.backends)}")
    return 0


def cmd_routes(config: Config, args: argparse.Namespace) -> int:
    _, body = _http(config, "/routes")
    table = json.loads(body)
    print(f"routes version {table['version']}")
    for route in table["routes"]:
        backends = ", ".join(f"{b['address']} ({'up' if b['up'] else 'down: ' + b['reason']}; "
                             f"client_address {b['client_address']})"
                             for b in route["backends"])
        print(f"{route['pattern']}\t{backends}")
    for key, reason in table["invalid"].items():
        print(f"invalid key {key}: {reason}")
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    status, body = _http(config, "/healthz")
    print(body.decode().strip())
    return 0 if status == 200 else 1


def cmd_purge(config: Config, args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"name": args.name, "subtree": "1" if args.subtree else "0"})
    status, body = _http(config, f"/purge?{query}", post=True)
    if status != 200:
        raise _Refused(body.decode(errors="replace").strip())
    print(f"purged {args.name}{' and below' if args.subtree else ''} from every worker's cache")
    return 0


def cmd_shard(config: Config, args: argparse.Namespace) -> int:
    if args.register and len(args.register) != args.shards:
        raise _Refused(f"--register given {len(args.register)} times for {args.shards} shards: "
                       f"give one ADDR:PORT per shard, in shard order")
    try:
        zone = shard.load(args.zonefile, args.origin)
        result = shard.split(zone, args.shards)
        values = [parse_value(f"{address},{s.pattern}").to_text()
                  for address, s in zip(args.register, result.shards)]  # refused before anything is written
        written = shard.write(result, args.out)
    except (shard.ShardError, ValueParseError) as e:
        raise _Refused(str(e)) from None
    for (path, size, names), s in zip(written, result.shards):
        print(f"{path} {size} bytes {names} names {s.pattern}")
    if result.signed == "NSEC3":
        print(f"NSEC3: the whole chain in every shard, {result.nsec3_bytes} bytes each")
    if values:
        store = open_registry(config)
        for value in values:
            key = str(uuid.uuid4())
            try:
                store.put(key, value)
            except OSError as e:  # the file registry's directory
                raise RegistryError(f"routes directory {config.registry_routes_dir}: {e.strerror or e}") from None
            print(f"registered {key} {value}")
    return 0


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
    try:
        return globals()[f"cmd_{args.command}"](config, args)
    except (_Refused, ConfigError) as e:
        print(f"dnsrouterctl: {e}", file=sys.stderr)
        return 2
    except (RegistryError, _Unreachable) as e:  # one line that says what failed and where
        print(f"dnsrouterctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
