"""How a worker applies each live setting of a new Config (SIGHUP).

One entry per setting the worker uses and that the settings table marks
``live``: how to apply a new value, and how to read back the value in use
from where the packet path reads it. tests/test_live_settings.py checks
that these, with the supervisor's own (``supervisor.arbiter.SUPERVISOR_LIVE``),
are exactly the live settings: a setting marked live that nothing applies
is a failing test, not a silent no-op.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from dnsrouter.settings import Config

from .forwarder import Forwarder


@dataclass(frozen=True)
class Applier:
    apply: Callable[[Forwarder, Any], None]
    read: Callable[[Forwarder], Any]  # the value in use, for ConfigApplied


def _set_timeout(forwarder: Forwarder, value: float) -> None:
    forwarder.timeout = value
    forwarder.retune()


def _set_retry_min(forwarder: Forwarder, value: float) -> None:
    forwarder.retry_min = value
    forwarder.retune()


def _set_query_log(forwarder: Forwarder, value: bool) -> None:
    forwarder.query_log = value


def _set_level(forwarder: Forwarder, value: str) -> None:
    logging.getLogger().setLevel(value.upper())


# The packet path reads these attributes once a batch (compiled) or once a
# query (Python): a new value takes effect from the next batch.
APPLIERS: dict[str, Applier] = {
    "forward_timeout": Applier(_set_timeout, lambda f: f.timeout),
    "forward_retry_min": Applier(_set_retry_min, lambda f: f.retry_min),
    "log_queries": Applier(_set_query_log, lambda f: f.query_log),
    "log_level": Applier(_set_level, lambda f: logging.getLevelName(logging.getLogger().level).lower()),
}


def apply(config: Config, forwarder: Forwarder) -> dict[str, Any]:
    """Apply ``config``'s live settings; the values now in use, by setting name."""
    for name, applier in APPLIERS.items():
        applier.apply(forwarder, getattr(config, name))
    return {name: applier.read(forwarder) for name, applier in APPLIERS.items()}
