"""Shared fixtures: real Knot DNS backends, the router as a subprocess, etcd and registries in threads."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import pytest

from support import quick_loop
from support.etcd import EtcdServer
from support.knot import KnotServer
from support.router import PACKET_PATHS, Router, packet_paths
from support.zones import make_split_zone


# -- the quick loop and the system marker (support/quick_loop.py). Setup and
# call are guarded; teardown is not, where a session's servers may be
# stopped after any test.

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.option.markexpr.strip() == quick_loop.QUICK:
        quick_loop.fewer_examples(items)
    elif os.environ.get("DNSROUTER_MOST_EXAMPLES"):  # scripts/asan.sh: the instrumented build, slower
        quick_loop.fewer_examples(items, int(os.environ["DNSROUTER_MOST_EXAMPLES"]))


def _guard(item: pytest.Item) -> contextlib.AbstractContextManager[None]:
    if item.get_closest_marker(quick_loop.MARKER):
        return contextlib.nullcontext()
    return quick_loop.refused(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _guard(item):
        return (yield)


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
# runs once per way, its routers started with ``--fast-path`` set so, and
# each router's start checks its workers run that path.
# DNSROUTER_PACKET_PATHS=compiled keeps one (scripts/asan.sh: the ASan build).
_PACKET_PATHS = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    try:
        config.stash[_PACKET_PATHS] = packet_paths(os.environ.get("DNSROUTER_PACKET_PATHS", "compiled,python"))
    except ValueError as e:
        raise pytest.UsageError(f"DNSROUTER_PACKET_PATHS: {e}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "packet_path" in metafunc.fixturenames:
        metafunc.parametrize("packet_path", list(metafunc.config.stash[_PACKET_PATHS]))


@pytest.fixture
def router(request):
    """A started router with an empty routes directory; add routes with .route()."""
    instances = []
    path = request.getfixturevalue("packet_path") if "packet_path" in request.fixturenames else None

    def make(workers: int = 1, args=(), start: bool = True, **kw) -> Router:
        if path is not None:
            kw["fast_path"] = PACKET_PATHS[path]
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
