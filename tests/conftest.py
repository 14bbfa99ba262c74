"""Shared fixtures: real Knot DNS backends and the router as a subprocess."""
from __future__ import annotations

import pytest

from support.knot import KnotServer
from support.router import Router
from support.zones import make_split_zone


@pytest.fixture(scope="session")
def split_zone():
    return make_split_zone(n=300)


@pytest.fixture(scope="session")
def knots(split_zone):
    """Two real Knot servers, each serving one half of the zone."""
    zone_a, zone_b = split_zone.zone_names
    with KnotServer({zone_a: split_zone.zones[zone_a]}) as a, \
            KnotServer({zone_b: split_zone.zones[zone_b]}) as b:
        yield a, b


@pytest.fixture
def router():
    """A started router with an empty routes directory; add routes with .route()."""
    instances = []

    def make(workers: int = 1, args=(), start: bool = True, **kw) -> Router:
        r = Router(workers=workers, args=args, **kw)
        instances.append(r)
        return r.start() if start else r

    yield make
    for r in instances:
        r.stop()
