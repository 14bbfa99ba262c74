"""Route snapshots: what the supervisor pipes to the workers."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from dnsrouter.address import Address
from dnsrouter.errors import SnapshotError
from dnsrouter.routes import Route
from dnsrouter.snapshot import Snapshot

A = Address("10.0.0.1", 53)
B = Address("10.0.0.2", 5300)
V6 = Address("2001:db8::1", 53)
V6B = Address("fe80::1", 65535)


def _snapshot() -> Snapshot:
    return Snapshot(
        version=42,
        routes=(Route(r"^a{1,3}\.example\.com\.$", (A, V6)),
                Route(r"example\.com\.$", (B, V6B)),
                Route(r"^\[x,y\]\.$", (A,))),
        down=frozenset({V6, B}),
        rtt={A: 0.0012, V6: 0.25},
    )


def test_round_trip():
    snap = _snapshot()
    back = Snapshot.from_wire(snap.to_wire())
    assert back == snap
    assert back.version == 42
    assert back.routes[0].backends == (A, V6)
    assert back.routes[1].pattern == r"example\.com\.$"
    assert back.down == frozenset({V6, B})
    assert back.rtt == {A: 0.0012, V6: 0.25}
    assert all(isinstance(b, Address) for r in back.routes for b in r.backends)


def test_round_trip_empty():
    snap = Snapshot(1)
    assert Snapshot.from_wire(snap.to_wire()) == snap


def test_to_wire_is_deterministic():
    # The down set is a frozenset; its bytes must not depend on hash order.
    one = Snapshot(3, (Route("x", (A, B, V6)),), frozenset([A, B, V6]), {A: 0.001, B: 0.002})
    two = Snapshot(3, (Route("x", (A, B, V6)),), frozenset([V6, B, A]), {B: 0.002, A: 0.001})
    assert one.to_wire() == two.to_wire()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_raise_snapshot_error(data):
    with pytest.raises(SnapshotError):
        Snapshot.from_wire(data)


@pytest.mark.parametrize("data", [
    b"",
    b"\xff\xfe\x00garbage",
    b"null",
    b"[]",
    b'"version"',
    b'{"version": 1}',
    b'{"version": "x", "created": 0, "routes": [], "down": []}',
    b'{"version": 1, "created": 0, "routes": null, "down": []}',
    b'{"version": 1, "created": 0, "routes": [["p"]], "down": []}',
    b'{"version": 1, "created": 0, "routes": [["p", ["host:53"]]], "down": []}',
    b'{"version": 1, "created": 0, "routes": [], "down": ["1.2.3.4:0"]}',
])
def test_malformed_snapshots(data):
    with pytest.raises(SnapshotError):
        Snapshot.from_wire(data)


@pytest.mark.parametrize("data", [
    # Well-formed JSON with the wrong types inside: still "does not decode".
    b'{"version": 1, "created": 0, "routes": [], "down": [1]}',
    b'{"version": 1, "created": 0, "routes": [["p", [53]]], "down": []}',
    b'{"version": 1, "created": 0, "routes": [["p", [null]]], "down": []}',
])
def test_wrongly_typed_members_raise_snapshot_error(data):
    json.loads(data)  # valid JSON
    with pytest.raises(SnapshotError):
        Snapshot.from_wire(data)


def test_deeply_nested_garbage_raises_snapshot_error():
    with pytest.raises(SnapshotError):
        Snapshot.from_wire(b"[" * 100_000)


def test_unchanged_routes_are_reused_not_decoded_again():
    backend = Address("192.0.2.1", 53)
    routes = (Route(r"^a\.$", (backend,)), Route(r"^b\.$", (backend,)))
    first = Snapshot.from_wire(Snapshot(1, routes, frozenset([backend])).to_wire())
    health_only = Snapshot.from_wire(Snapshot(2, routes, frozenset()).to_wire(), first)
    assert health_only.routes is first.routes and health_only.down == frozenset()
    changed = Snapshot.from_wire(Snapshot(3, routes[:1], frozenset()).to_wire(), health_only)
    assert changed.routes == routes[:1] and changed.routes is not first.routes


def test_a_backend_option_survives_the_wire():
    snap = Snapshot(7, (Route(r"^a\.$", (A, B), (None, "proxy")), Route(r"^b\.$", (B,))))
    back = Snapshot.from_wire(snap.to_wire())
    assert back.routes == snap.routes
    assert back.routes[0].client_address == (None, "proxy") and back.routes[1].client_address == ()
