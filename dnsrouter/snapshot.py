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
    # The routes as they came over the wire, to recognise them in the next snapshot.
    routes_wire: bytes = field(default=b"", compare=False, repr=False)

    def to_wire(self) -> bytes:
        """Two JSON lines: version and health; then the routes."""
        head = {"version": self.version, "down": sorted(str(b) for b in self.down)}
        routes = [[r.pattern, [str(b) for b in r.backends]] for r in self.routes]
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
                routes = tuple(Route(str(p), tuple(parse_address(b) for b in backends))
                               for p, backends in json.loads(routes_wire))
            return cls(version=int(obj["version"]), routes=routes,
                       down=frozenset(parse_address(b) for b in obj["down"]), routes_wire=routes_wire)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SnapshotError(f"snapshot does not decode: {e}") from None
