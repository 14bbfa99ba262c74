"""Registry values, route pools and the matcher that picks a pool for a name."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import re2

from .address import Address, parse_address
from .errors import ValueParseError

# A registry value is small; anything larger is a mistake or an attack, and
# RE2 would spend memory compiling it.
MAX_VALUE_BYTES = 4096

# One RE2 set holds every route of a snapshot; its memory budget must fit
# tens of thousands of patterns (the default of 8 MiB fits about 5,000).
SET_MAX_MEM = 256 << 20

# RE2 would print every rejected pattern to stderr; we log it once ourselves.
_QUIET = re2.Options()
_QUIET.log_errors = False


@dataclass(frozen=True)
class RouteValue:
    """A parsed registry value ``<ip:port>,<regexp>``."""

    backend: Address
    pattern: str

    def to_text(self) -> str:
        return f"{self.backend},{self.pattern}"


def parse_value(value: str | bytes) -> RouteValue:
    """Parse a registry value; raise ValueParseError saying what is wrong."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueParseError("value is not UTF-8 text") from None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a file registry value that was not UTF-8
        raise ValueParseError("value is not UTF-8 text") from None
    if size > MAX_VALUE_BYTES:
        raise ValueParseError(f"value is longer than {MAX_VALUE_BYTES} bytes")
    value = value.strip()
    if not value:
        raise ValueParseError("value is empty")
    address, comma, pattern = value.partition(",")
    if not comma:
        raise ValueParseError("no comma between ip:port and regexp")
    if not pattern:
        raise ValueParseError("empty regexp")
    try:
        backend = parse_address(address)
    except ValueError as e:
        raise ValueParseError(str(e)) from None
    try:
        re2.compile(pattern, _QUIET)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
        raise ValueParseError(f"regexp does not compile under RE2: {reason}") from None
    return RouteValue(backend, pattern)


@dataclass(frozen=True)
class Route:
    """One pool: every backend registered with the same regexp, in order."""

    pattern: str
    backends: tuple[Address, ...]


class Pool:
    """The usable backends of a route, shared round robin.

    ``itertools.cycle`` advances atomically under the GIL, so the threads of a
    worker share a pool without a lock.
    """

    __slots__ = ("route", "backends", "_cycle")

    def __init__(self, route: Route, backends: Sequence[Address]) -> None:
        self.route = route
        self.backends = tuple(backends)
        self._cycle = itertools.cycle(self.backends)

    def next(self) -> Address:
        return next(self._cycle)

    def other(self, tried: Address) -> Address | None:
        """A backend other than ``tried``, for the one retry; None if alone."""
        if len(self.backends) < 2:
            return None
        backend = next(self._cycle)
        return backend if backend != tried else next(self._cycle)


class Matcher:
    """Picks the pool for a query name: one RE2 set pass, whatever the routes.

    The set reports every matching pattern; the first registered route with a
    usable backend wins. Answers are cached by the lower-cased wire name, so
    a name seen before costs one dict look-up.
    """

    # Bounded: ~120 bytes an entry, so a flood of random names costs at most ~1.2 MB.
    CACHE_SIZE = 10_000

    def __init__(self, routes: Sequence[Route], down: Iterable[Address] = (),
                 patterns: "re2.Set | None" = None) -> None:
        self.routes = tuple(routes)
        down = frozenset(down)
        self.pools = [Pool(r, [b for b in r.backends if b not in down]) for r in self.routes]
        self.set = patterns if patterns is not None else compile_set(r.pattern for r in self.routes)
        self._cache: dict[bytes, Pool | None] = {}

    def lookup(self, name_text: str) -> Pool | None:
        """The pool for a name in presentation format, lower case."""
        if not self.routes:
            return None
        for index in sorted(self.set.Match(name_text) or ()):
            pool = self.pools[index]
            if pool.backends:
                return pool
        return None

    def lookup_wire(self, name_wire_lower: bytes, to_text) -> Pool | None:
        """``lookup`` keyed by the lower-cased wire name, through the cache."""
        try:
            return self._cache[name_wire_lower]
        except KeyError:
            pass
        pool = self.lookup(to_text(name_wire_lower))
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()  # bounded; a full reset is cheap and rare
        self._cache[name_wire_lower] = pool
        return pool


def compile_set(patterns: Iterable[str]) -> "re2.Set":
    options = re2.Options()
    options.max_mem = SET_MAX_MEM
    options.log_errors = False
    matcher = re2.Set.SearchSet(options)
    for pattern in patterns:
        matcher.Add(pattern)
    matcher.Compile()
    return matcher


def build_routes(values: Iterable[tuple[int, RouteValue]]) -> tuple[Route, ...]:
    """Group (order, value) pairs into pools, ordered by first registration."""
    pools: dict[str, list[tuple[int, Address]]] = {}
    for order, value in sorted(values, key=lambda item: item[0]):
        members = pools.setdefault(value.pattern, [])
        if value.backend not in (b for _, b in members):
            members.append((order, value.backend))
    # dicts keep insertion order, and insertion followed registration order.
    return tuple(Route(p, tuple(b for _, b in members)) for p, members in pools.items())
