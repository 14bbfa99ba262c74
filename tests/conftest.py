"""Shared fixtures: real Knot DNS backends, the router as a subprocess, etcd and registries in threads."""
from __future__ import annotations

import logging

import pytest

from support.etcd import EtcdServer
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


# -- registry tests (test_etcd_registry, test_etcd3_registry): each module
# names its own ``Running`` factory and ``LOGGER``; the fixtures are one.

@pytest.fixture
def etcd_server():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def running(request):
    """Start the module's registry in a thread; every one is stopped after the test."""
    started = []

    def start(urls, **kw):
        r = request.module.Running(urls, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.hook = None  # a hook that still holds a publish would keep the thread from stopping
        r.close()


@pytest.fixture
def logs(request, caplog):
    """``logs(level, text)``: the module's registry log records at that level containing text."""
    logger = request.module.LOGGER
    caplog.set_level(logging.INFO, logger=logger)
    return lambda level, text: [r for r in caplog.records
                                if r.name == logger and r.levelno == level and text in r.getMessage()]
