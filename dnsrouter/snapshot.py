"""The immutable, versioned route snapshot the supervisor sends to workers."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from .address import Address, parse_address
from .errors import SnapshotError
from .routes import Route


@dataclass(frozen=True)
class Snapshot:
    """Routes in precedence order and the backends that are down.

    Health lives beside the routes rather than inside them so that a health
    change keeps the route list, and a worker can keep its compiled RE2 set.
    """

    version: int
    routes: tuple[Route, ...] = ()
    down: frozenset[Address] = field(default_factory=frozenset)
    # Backends' health check round trips, seconds: a worker's first RTT
    # estimate for a backend it has not yet had an answer from.
    rtt: Mapping[Address, float] = field(default_factory=dict, compare=False)
    # The routes as they came over the wire, to recognise them in the next snapshot.
    routes_wire: bytes = field(default=b"", compare=False, repr=False)

    def to_wire(self) -> bytes:
        """Two JSON lines: version, health and check round trips; then the routes."""
        head = {"version": self.version, "down": sorted(str(b) for b in self.down),
                "rtt": dict(sorted((str(b), seconds) for b, seconds in self.rtt.items()))}
        routes = [[r.pattern, [str(b) for b in r.backends], *([list(r.client_address)] if r.client_address else [])]
                  for r in self.routes]
        return (json.dumps(head, separators=(",", ":")) + "\n"
                + json.dumps(routes, separators=(",", ":"))).encode()

    @classmethod
    def from_wire(cls, data: bytes, previous: "Snapshot | None" = None) -> "Snapshot":
        """Decode a snapshot; with ``previous``, reuse its routes if they are the same bytes.

        A health change resends thousands of unchanged routes: recognising them
        spares the worker decoding them again, and the memory that would cost.
        """
        head, newline, routes_wire = data.partition(b"\n")
        try:
            if not newline:
                raise ValueError("no routes line")
            obj = json.loads(head)
            if previous is not None and previous.routes_wire == routes_wire:
                routes = previous.routes
            else:
                routes = tuple(_route(*route) for route in json.loads(routes_wire))
            rtt = {parse_address(b): float(seconds) for b, seconds in obj.get("rtt", {}).items()}
            return cls(version=int(obj["version"]), routes=routes, rtt=rtt,
                       down=frozenset(parse_address(b) for b in obj["down"]), routes_wire=routes_wire)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SnapshotError(f"snapshot does not decode: {e}") from None


def _route(pattern: str, backends: list[str], modes: list[str | None] | None = None) -> Route:
    backends_ = tuple(parse_address(b) for b in backends)
    modes_ = tuple(None if m is None else str(m) for m in modes or ())
    if modes_ and len(modes_) != len(backends_):
        raise ValueError("client_address list does not match the backends")
    return Route(str(pattern), backends_, modes_)
