"""Registry values, route pools and the matcher that picks a pool for a name."""
from __future__ import annotations

import itertools
import json
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


# How a backend learns the client's address ([forward] client_address).
CLIENT_ADDRESS_MODES = ("none", "proxy", "ecs")
_JSON_KEYS = {"backend", "regexp", "client_address"}


@dataclass(frozen=True)
class RouteValue:
    """A parsed registry value: ``<ip:port>,<regexp>``, or the JSON object
    ``{"backend": ..., "regexp": ..., "client_address": ...}`` for the options
    of one backend."""

    backend: Address
    pattern: str
    client_address: str | None = None  # None: [forward] client_address decides

    def to_text(self) -> str:
        if self.client_address is None:
            return f"{self.backend},{self.pattern}"
        return json.dumps({"backend": str(self.backend), "regexp": self.pattern,
                           "client_address": self.client_address})


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
    client_address = None
    if value.startswith("{"):  # a plain value starts with an address: never ambiguous
        address, pattern, client_address = _parse_json(value)
    else:
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
    return RouteValue(backend, pattern, client_address)


def _parse_json(value: str) -> tuple[str, str, str | None]:
    """(address, regexp, client_address) of a JSON value."""
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError) as e:
        raise ValueParseError(f"value is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueParseError("a JSON value must be an object")
    unknown = sorted(set(obj) - _JSON_KEYS)
    if unknown:
        raise ValueParseError(f"unknown key {unknown[0]!r} (known: backend, regexp, client_address)")
    for key in ("backend", "regexp"):
        if not isinstance(obj.get(key), str):
            raise ValueParseError(f"{key!r} must be a string")
    mode = obj.get("client_address")
    if mode is not None and mode not in CLIENT_ADDRESS_MODES:
        raise ValueParseError(f"client_address {mode!r} is not one of {', '.join(CLIENT_ADDRESS_MODES)}")
    return obj["backend"], obj["regexp"], mode


@dataclass(frozen=True)
class Route:
    """One pool: every backend registered with the same regexp, in order."""

    pattern: str
    backends: tuple[Address, ...]
    # Each backend's own client_address, where its value named one; () when none did.
    client_address: tuple[str | None, ...] = ()

    def modes(self, default: str) -> dict[Address, str]:
        """Each backend's client_address, ``default`` where its value named none."""
        own = self.client_address or (None,) * len(self.backends)
        return {b: mode or default for b, mode in zip(self.backends, own)}


class Pool:
    """The usable backends of a route, shared round robin.

    ``itertools.cycle`` advances atomically under the GIL, so the threads of a
    worker share a pool without a lock.
    """

    __slots__ = ("route", "backends", "rotation", "modes")

    def __init__(self, route: Route, backends: Sequence[Address], default_mode: str = "none") -> None:
        self.route = route
        self.backends = tuple(backends)
        # The round robin itself: ``next(pool.rotation)`` is ``pool.next()``
        # without the method call, for the compiled packet path.
        self.rotation = itertools.cycle(self.backends)
        # The members that learn the client's address, and how; empty for a
        # pool that needs nothing (the packet path tests this, and only this).
        self.modes = {b: m for b, m in route.modes(default_mode).items() if m != "none"}

    def next(self) -> Address:
        return next(self.rotation)

    def other(self, tried: Address) -> Address | None:
        """A backend other than ``tried``, for the one retry; None if alone."""
        if len(self.backends) < 2:
            return None
        backend = next(self.rotation)
        return backend if backend != tried else next(self.rotation)


class Matcher:
    """Picks the pool for a query name: one RE2 set pass, whatever the routes.

    The set reports every matching pattern; the first registered route with a
    usable backend wins. Answers are cached by the lower-cased wire name, so
    a name seen before costs one dict look-up.
    """

    # Bounded: ~120 bytes an entry, so a flood of random names costs at most ~1.2 MB.
    CACHE_SIZE = 10_000

    def __init__(self, routes: Sequence[Route], down: Iterable[Address] = (),
                 patterns: "re2.Set | None" = None, client_address: str = "none") -> None:
        self.routes = tuple(routes)
        down = frozenset(down)
        self.pools = [Pool(r, [b for b in r.backends if b not in down], client_address) for r in self.routes]
        self.set = patterns if patterns is not None else compile_set(r.pattern for r in self.routes)
        # The indexes (a list, maybe empty) of the patterns a name's bytes
        # match. The compiled packet path calls it on every route-cache miss
        # (a flood of random names): google-re2's Set.Match is a Python
        # wrapper (a frame, a type check, an attribute) around its binding's
        # method, which is taken directly where the wrapper holds one.
        self.match_bytes = getattr(self.set, "_set", self.set).Match
        self._cache: dict[bytes, Pool | None] = {}

    def lookup(self, name_text: str) -> Pool | None:
        """The pool for a name in presentation format, lower case."""
        if not self.routes:
            return None
        for index in sorted(self.match_bytes(name_text.encode()) or ()):
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
    pools: dict[str, list[RouteValue]] = {}
    for order, value in sorted(values, key=lambda item: item[0]):
        members = pools.setdefault(value.pattern, [])
        if value.backend not in (m.backend for m in members):
            members.append(value)
    # dicts keep insertion order, and insertion followed registration order.
    routes = []
    for pattern, members in pools.items():
        modes = tuple(m.client_address for m in members)
        routes.append(Route(pattern, tuple(m.backend for m in members),
                            modes if any(m is not None for m in modes) else ()))
    return tuple(routes)
