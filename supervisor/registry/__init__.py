"""Registries: where route records come from (a directory or etcd).

A registry runs in a supervisor thread and calls ``publish`` with the whole
current set of records every time it changes. Publishing the whole set keeps
the contract trivial (no lost deltas, replacement on resync is the same call)
and the supervisor parses only the values it has not seen before.

The supervisor, ``dnsrouterctl`` and the feeder see a registry only through
the ``Registry`` protocol (``ExpiringRegistry`` for keys with a TTL, which
only etcd has) and get one from ``open_registry``, which imports the
implementation the configuration names and no other: a routes directory
never loads an etcd client (python-etcd and urllib3, or gRPC).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Protocol, Sequence

from dnsrouter.errors import ConfigError, DNSRouterError

if TYPE_CHECKING:
    from .etcd_base import EtcdRegistryBase


@dataclass(frozen=True)
class Record:
    """One registry key: its raw value and its registration order.

    ``order`` decides precedence between overlapping regexps: the smallest
    wins (etcd ``createdIndex``; the file registry's name order).
    """

    key: str
    value: str
    order: int


Publish = Callable[[Sequence[Record]], None]


def in_order(table: Mapping[str, Record]) -> tuple[Record, ...]:
    """A registry's records in registration order (ties broken by key)."""
    return tuple(sorted(table.values(), key=lambda r: (r.order, r.key)))


class Changes:
    """Hands ``publish`` a registry's table only when it differs from the
    last one it took; a publish that raises is logged and offered again."""

    def __init__(self, publish: Publish, log: logging.Logger) -> None:
        self._publish = publish
        self._log = log
        self._last: tuple[Record, ...] | None = None

    def offer(self, records: tuple[Record, ...]) -> None:
        if records == self._last:
            return
        try:
            self._publish(records)
            self._last = records
        except Exception:  # offered again after the next change or watch timeout
            self._log.exception("publishing %d records failed", len(records))


class RegistryError(DNSRouterError):
    """the registry cannot be used"""


class Registry(Protocol):
    """What the supervisor, ``dnsrouterctl`` and the feeder use of a registry."""

    def run(self, publish: Publish, stop: threading.Event) -> None:
        """Publish the records until ``stop`` is set; never raise."""

    def read(self) -> tuple[Record, ...]:
        """The records now, in registration order (``dnsrouterctl list``)."""

    def put(self, name: str, value: str) -> None:
        """Write the key ``name``."""

    def delete(self, name: str) -> bool:
        """Remove the key ``name``; False when there was none."""


class ExpiringRegistry(Registry, Protocol):
    """A registry whose keys can expire (etcd): ``dnsrouterctl register --ttl``."""

    def put(self, name: str, value: str, ttl: Optional[int] = None) -> None:
        """Write the key ``name``; with ``ttl``, it expires after that many
        seconds unless refreshed."""

    def refresh(self, name: str, ttl: int) -> bool:
        """Keep the key from expiring; False when it has expired meanwhile."""


class RegistrySettings(Protocol):
    """The ``[registry]`` settings, as the router's Config and the feeder's have them."""

    @property
    def registry_routes_dir(self) -> str | None: ...

    @property
    def registry_etcd_api(self) -> str: ...

    @property
    def registry_etcd(self) -> tuple[str, ...]: ...

    @property
    def registry_prefix(self) -> str: ...

    @property
    def registry_username(self) -> str | None: ...

    @property
    def registry_password(self) -> str | None: ...

    @property
    def registry_ca_cert(self) -> str | None: ...

    @property
    def registry_cert(self) -> str | None: ...

    @property
    def registry_key(self) -> str | None: ...


def open_registry(config: RegistrySettings) -> Registry:
    """The registry the configuration names: a routes directory, or etcd (v3 or v2)."""
    if config.registry_routes_dir:
        from .files import FileRegistry
        return FileRegistry(config.registry_routes_dir)
    return open_etcd(config)


def open_etcd(config: RegistrySettings) -> ExpiringRegistry:
    """The etcd registry the configuration names, whether or not it names a routes directory."""
    # Each imports its client library (gRPC, python-etcd): only the one in use.
    registry: type[EtcdRegistryBase]
    if config.registry_etcd_api == "v2":
        from .etcd import EtcdRegistry as registry
    else:
        from .etcd3 import Etcd3Registry as registry
    try:
        return registry(list(config.registry_etcd), config.registry_prefix,
                        username=config.registry_username, password=config.registry_password,
                        ca_cert=config.registry_ca_cert, cert=config.registry_cert, key=config.registry_key)
    except ValueError as e:  # credentials or certificates that do not go together
        raise ConfigError(f"[registry]: {e}") from None
