"""Registry records and backend health, turned into route snapshots."""
from __future__ import annotations

import logging
import time
from typing import Iterable, Mapping, Sequence

from dnsrouter.address import Address
from dnsrouter.errors import ValueParseError
from dnsrouter.routes import Route, RouteValue, build_routes, parse_value
from dnsrouter.snapshot import Snapshot

from .registry import Record

log = logging.getLogger("dnsrouter.routes")


class RouteTable:
    """The supervisor's view: the routes that parsed, what did not, who is down.

    Values are parsed once per (key, value): a registry that republishes its
    whole set costs a dict look-up per unchanged key.
    """

    def __init__(self) -> None:
        self.routes: tuple[Route, ...] = ()
        self.up: frozenset[Address] = frozenset()  # what health checks vouch for
        self.invalid: dict[str, str] = {}  # key -> reason, for metrics and `list`
        self.version = 0
        self.updated = 0.0  # time.time() of the last snapshot
        self._parsed: dict[tuple[str, str], RouteValue | ValueParseError] = {}

    def set_records(self, records: Sequence[Record]) -> bool:
        """Take the registry's current records; True when the routes changed."""
        parsed: dict[tuple[str, str], RouteValue | ValueParseError] = {}
        values: list[tuple[int, RouteValue]] = []
        invalid: dict[str, str] = {}
        for record in records:
            ident = (record.key, record.value)
            result = self._parsed.get(ident)
            if result is None:
                try:
                    result = parse_value(record.value)
                except ValueParseError as e:
                    result = e
                    # Logged once: the next publish of the same value finds it parsed.
                    log.warning("registry key %s skipped: %s", record.key, e)
            parsed[ident] = result
            if isinstance(result, ValueParseError):
                invalid[record.key] = str(result)
            else:
                values.append((record.order, result))
        self._parsed = parsed
        self.invalid = invalid
        routes = build_routes(values)
        if routes == self.routes:
            return False
        self.routes = routes
        return True

    def set_up(self, up: Iterable[Address]) -> bool:
        """Take the health checker's verdict; True when the snapshot must change."""
        old_down = self.down
        self.up = frozenset(up)
        return self.down != old_down

    @property
    def down(self) -> frozenset[Address]:
        """Backends not (yet) known to be up: a new one waits for its first check."""
        return self.backends - self.up

    @property
    def backends(self) -> frozenset[Address]:
        return frozenset(b for r in self.routes for b in r.backends)

    def snapshot(self, rtt: Mapping[Address, float] | None = None) -> Snapshot:
        """A new version of the table, for the workers (``rtt``: backends'
        health check round trips, their first RTT estimate)."""
        self.version += 1
        self.updated = time.time()
        backends = self.backends
        return Snapshot(self.version, self.routes, self.down,
                        {b: s for b, s in (rtt or {}).items() if b in backends})
