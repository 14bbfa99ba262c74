"""RouteTable: registry records and health turned into snapshots."""
from __future__ import annotations

import logging

from dnsrouter.address import Address
from dnsrouter.routes import Route
from dnsrouter.supervisor.registry import Record
from dnsrouter.supervisor.table import RouteTable

A = Address("10.0.0.1", 53)
B = Address("10.0.0.2", 53)
C = Address("10.0.0.3", 53)
D = Address("2001:db8::1", 53)

RECORDS = [
    Record("k-a1", r"10.0.0.1:53,^a\.example\.$", 3),
    Record("k-b", r"10.0.0.2:53,example\.$", 1),
    Record("bad-comma", "10.0.0.9:53", 2),
    Record("k-a2", r"[2001:db8::1]:53,^a\.example\.$", 5),
    Record("bad-port", "10.0.0.9:0,x", 4),
    Record("k-a3", r"10.0.0.3:53,^a\.example\.$", 0),
]


def test_set_records_groups_and_orders():
    table = RouteTable()
    assert table.set_records(RECORDS) is True
    # Order 0 (k-a3) registered ^a first; order 1 (k-b) next.
    assert table.routes == (
        Route(r"^a\.example\.$", (C, A, D)),
        Route(r"example\.$", (B,)),
    )
    assert table.backends == frozenset({A, B, C, D})


def test_set_records_counts_invalid_with_reasons():
    table = RouteTable()
    table.set_records(RECORDS)
    assert set(table.invalid) == {"bad-comma", "bad-port"}
    assert "comma" in table.invalid["bad-comma"]
    assert "port" in table.invalid["bad-port"]
    # Fixing a value takes it out of the invalid set and into the routes.
    fixed = [r if r.key != "bad-port" else Record("bad-port", r"10.0.0.9:53,^z\.$", 4)
             for r in RECORDS]
    assert table.set_records(fixed) is True
    assert set(table.invalid) == {"bad-comma"}
    assert Route(r"^z\.$", (Address("10.0.0.9", 53),)) in table.routes


def test_unchanged_records_are_no_change():
    table = RouteTable()
    assert table.set_records(RECORDS) is True
    assert table.set_records(list(RECORDS)) is False
    assert table.set_records(list(reversed(RECORDS))) is False  # order comes from .order
    assert table.set_records([]) is True
    assert table.routes == ()


def test_invalid_value_logged_once(caplog):
    table = RouteTable()
    with caplog.at_level(logging.WARNING, logger="dnsrouter.routes"):
        table.set_records(RECORDS)
        table.set_records(RECORDS)
        table.set_records(list(reversed(RECORDS)))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    messages = sorted(r.getMessage() for r in warnings)
    assert "bad-comma" in messages[0] and "comma" in messages[0]
    assert "bad-port" in messages[1] and "port" in messages[1]
    # A new bad value under the same key is a new problem: logged again.
    caplog.clear()
    changed = [r if r.key != "bad-port" else Record("bad-port", "10.0.0.9:65536,x", 4)
               for r in RECORDS]
    with caplog.at_level(logging.WARNING, logger="dnsrouter.routes"):
        table.set_records(changed)
        table.set_records(changed)
    assert len(caplog.records) == 1
    assert "bad-port" in caplog.records[0].getMessage()
    assert "65536" in caplog.records[0].getMessage()


def test_non_utf8_value_is_invalid_not_a_crash():
    # The file registry hands over undecodable bytes as surrogateescape text.
    value = b"10.0.0.1:53,^a\xff$".decode("utf-8", "surrogateescape")
    table = RouteTable()
    table.set_records([Record("binary", value, 0), Record("ok", r"10.0.0.2:53,^b\.$", 1)])
    assert set(table.invalid) == {"binary"}
    assert table.routes == (Route(r"^b\.$", (B,)),)


def test_health_verdict_sets_snapshot_down():
    # Health comes in as the set of backends known to be up (set_up); every
    # other backend of the routes is down, a new one until its first check.
    table = RouteTable()
    table.set_records(RECORDS)
    first = table.snapshot()
    assert first.down == frozenset({A, B, C, D})
    assert first.routes == table.routes
    assert table.set_up({A, B, C, D}) is True
    assert table.set_up([D, C, B, A]) is False
    second = table.snapshot()
    assert second.down == frozenset()
    assert second.version > first.version
    assert table.set_up({B, C, D}) is True
    third = table.snapshot()
    assert third.down == frozenset({A})
    assert third.version > second.version
    # An up backend that no route uses changes nothing.
    assert table.set_up({B, C, D, Address("192.0.2.1", 53)}) is False
    assert table.snapshot().down == frozenset({A})


def test_new_backend_is_down_until_checked():
    table = RouteTable()
    table.set_records(RECORDS[:1])
    table.set_up({A})
    assert table.snapshot().down == frozenset()
    table.set_records(RECORDS[:2])
    assert table.snapshot().down == frozenset({B})
    # A backend gone from the routes is not reported down.
    table.set_records([])
    assert table.snapshot().down == frozenset()


def test_snapshot_version_increases_every_time():
    table = RouteTable()
    versions = [table.snapshot().version for _ in range(5)]
    assert versions == sorted(set(versions))
    assert versions[0] >= 1
