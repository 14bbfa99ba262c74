"""``dnsrouter``: the one place that wires the supervisor to the workers."""
from __future__ import annotations

import logging
import sys

from . import config as configuration
from . import logs
from .errors import ConfigError


def make_registry(config):
    if config.registry_routes_dir:
        from .supervisor.registry.files import FileRegistry
        return FileRegistry(config.registry_routes_dir)
    from .supervisor.registry.etcd import EtcdRegistry
    return EtcdRegistry(list(config.registry_etcd), config.registry_prefix,
                        username=config.registry_username, password=config.registry_password,
                        ca_cert=config.registry_ca_cert, cert=config.registry_cert,
                        key=config.registry_key)


def main(argv: list[str] | None = None) -> int:
    parser = configuration.build_parser()
    args = parser.parse_args(argv)
    try:
        config = configuration.load(args)
    except ConfigError as e:
        print(f"dnsrouter: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        sys.stdout.write(configuration.describe(config))
        return 0
    try:
        logs.setup(config.log_target, config.log_level, "supervisor")
    except OSError as e:
        print(f"dnsrouter: cannot log to {config.log_target}: {e}", file=sys.stderr)
        return 2

    from .supervisor.arbiter import Supervisor
    from .workers import run as worker_main

    def reload():
        return configuration.reload(supervisor.config, args)

    supervisor = Supervisor(config, worker_main, make_registry(config), reload)
    try:
        return supervisor.run()
    except ConfigError as e:
        logging.getLogger("dnsrouter").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
