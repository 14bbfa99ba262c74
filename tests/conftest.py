"""Shared fixtures: real Knot DNS backends, the router as a subprocess, etcd and registries in threads."""
from __future__ import annotations

import logging
import os

import pytest

from support.etcd import EtcdServer
from support.knot import KnotServer
from support.net import wait_until
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


# The UDP packet path both ways: compiled (workers/_fastpath.pyx) and the
# pure-Python reference. A test module (or test) that uses ``packet_path``
# runs once per way, its routers started with ``--fast-path`` set so.
# DNSROUTER_PACKET_PATHS=compiled keeps one (scripts/asan.sh: the ASan build).
PACKET_PATHS = {path: setting for path, setting in {"compiled": "auto", "python": "off"}.items()
                if path in os.environ.get("DNSROUTER_PACKET_PATHS", "compiled,python").split(",")}


@pytest.fixture(params=list(PACKET_PATHS))
def packet_path(request) -> str:
    return request.param


@pytest.fixture
def router(request):
    """A started router with an empty routes directory; add routes with .route()."""
    instances = []
    path = request.getfixturevalue("packet_path") if "packet_path" in request.fixturenames else None

    def make(workers: int = 1, args=(), start: bool = True, **kw) -> Router:
        if path is not None:
            args = [*args, "--fast-path", PACKET_PATHS[path]]
        r = Router(workers=workers, args=args, **kw)
        instances.append(r)
        if not start:
            return r
        r.start()
        if path is not None and r.log_level == "debug":  # the way asked for is the way that runs
            want = "fast path on" if path == "compiled" else "fast path off: [server] fast_path = off"
            wait_until(lambda: r.log().count(want) >= r.workers, 5,
                       message=f"workers did not say {want!r}:\n{r.log()[-2000:]}")
        return r

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
