"""The router's HTTP endpoints (--metrics): /metrics parsed, /routes, /healthz.

Samples are a dict {(name, sorted label pairs): value}, so that two
scrapes subtract key by key and a test asserts exact deltas.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterable

from prometheus_client.parser import text_string_to_metric_families

from dnsrouter.control import REPORT_INTERVAL
from support.net import HOST, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def text(port: int) -> str:
    """The /metrics page of the router whose --metrics listens on port."""
    return http_get(f"http://{HOST}:{port}/metrics", timeout=5)[1].decode()


def parse(page: str) -> Samples:
    """Every sample of a Prometheus text page, by name and labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def samples(port: int) -> Samples:
    """parse() of the router's /metrics now."""
    return parse(text(port))


def value(snapshot: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when absent (a counter not moved yet)."""
    return snapshot.get((name, tuple(sorted(labels.items()))), 0)


def settled(port: int, names: Iterable[str] = ("dnsrouter_queries_total",), timeout: float = 10.0) -> Samples:
    """/metrics once the counters called ``names`` stopped moving: unchanged for
    longer than the workers' report interval (each worker reports its counts
    once in it), so every query sent before the call is in them."""
    watched = frozenset(names)
    last: list = [None, 0.0]  # the watched samples, since when they are so

    def still() -> Samples | None:
        now = samples(port)
        counted = {k: v for k, v in now.items() if k[0] in watched}
        if counted != last[0]:
            last[:] = [counted, time.monotonic()]
            return None
        return now if time.monotonic() - last[1] > REPORT_INTERVAL + 0.2 else None

    return wait_until(still, timeout, interval=0.2, message=f"{sorted(watched)} never settled")


def first(port: int, name: str) -> float | None:
    """The value of the first sample called name, whatever its labels (None if absent)."""
    return next((v for (n, _), v in samples(port).items() if n == name), None)


def lines(page: str, *prefixes: str) -> list[str]:
    """The sample lines of a /metrics page that start with one of prefixes (for printing)."""
    return [line for line in page.splitlines() if not line.startswith("#") and line.startswith(prefixes)]


def routes(port: int) -> dict[str, Any]:
    """The /routes table: {"routes": [...], "invalid": {...}, ...}."""
    return json.loads(http_get(f"http://{HOST}:{port}/routes")[1])


def backends_up(port: int) -> dict[str, bool]:
    """backend address -> up, from /routes."""
    return {b["address"]: b["up"] for route in routes(port)["routes"] for b in route["backends"]}
