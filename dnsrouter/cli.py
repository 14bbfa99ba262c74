"""``dnsrouter``: the one place that wires the supervisor to the workers."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from . import config as configuration
from . import logs
from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = configuration.build_parser()
    args = parser.parse_args(argv)
    if args.version:
        return _version(args)
    try:
        config = configuration.load(args)
    except ConfigError as e:
        print(f"dnsrouter: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        from .supervisor.privileges import check_user
        try:
            check_user(config)
        except ConfigError as e:
            print(f"dnsrouter: {e}", file=sys.stderr)
            return 2
        sys.stdout.write(configuration.describe(config))
        return 0
    try:
        logs.setup(config.log_target, config.log_level, "supervisor")
    except OSError as e:
        print(f"dnsrouter: cannot log to {config.log_target}: {e}", file=sys.stderr)
        return 2

    from .supervisor.arbiter import Supervisor
    from .supervisor.registry import open_registry
    from .workers import run as worker_main

    def reload() -> tuple[configuration.Config, list[str], list[str]]:
        return configuration.reload(supervisor.config, args)

    try:
        supervisor = Supervisor(config, worker_main, open_registry(config), reload)
        return supervisor.run()
    except ConfigError as e:
        logging.getLogger("dnsrouter").error("%s", e)
        return 2


def _version(args: argparse.Namespace) -> int:
    from .workers import fastpath

    setting = args.server_fast_path or "auto"
    try:  # with --config, the file's fast_path too; a broken file is --check-config's business
        setting = configuration.load(args).server_fast_path
    except ConfigError:
        pass
    print(f"dnsrouter {__version__}\nfast path: {fastpath.load(setting)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
