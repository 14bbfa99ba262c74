"""The immutable, versioned route snapshot the supervisor sends to workers."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

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
    created: float = 0.0  # supervisor's time.time() when made, for convergence figures

    def to_wire(self) -> bytes:
        return json.dumps({
            "version": self.version,
            "created": self.created,
            "routes": [[r.pattern, [str(b) for b in r.backends]] for r in self.routes],
            "down": sorted(str(b) for b in self.down),
        }, separators=(",", ":")).encode()

    @classmethod
    def from_wire(cls, data: bytes) -> "Snapshot":
        try:
            obj = json.loads(data)
            return cls(
                version=int(obj["version"]),
                created=float(obj["created"]),
                routes=tuple(Route(str(p), tuple(parse_address(b) for b in backends))
                             for p, backends in obj["routes"]),
                down=frozenset(parse_address(b) for b in obj["down"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SnapshotError(f"snapshot does not decode: {e}") from None
