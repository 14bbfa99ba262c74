"""Registry values, pools, precedence and the RE2-set matcher."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from dnsrouter.address import Address
from dnsrouter.errors import ValueParseError
from dnsrouter.routes import (MAX_VALUE_BYTES, Matcher, Pool, Route, RouteValue,
                              build_routes, compile_set, parse_value)
from dnsrouter.wire import name_to_text

A = Address("10.0.0.1", 53)
B = Address("10.0.0.2", 53)
C = Address("10.0.0.3", 53)
D = Address("2001:db8::1", 53)


# -- the value parser --------------------------------------------------------

def test_value_ipv4():
    v = parse_value(r"10.1.1.15:5300,^[ab]*\.example\.com\.$")
    assert v == RouteValue(Address("10.1.1.15", 5300), r"^[ab]*\.example\.com\.$")
    assert v.to_text() == r"10.1.1.15:5300,^[ab]*\.example\.com\.$"


def test_value_ipv6():
    v = parse_value(r"[2001:db8::1]:53,^a\.$")
    assert v.backend == Address("2001:db8::1", 53)
    assert v.pattern == r"^a\.$"
    assert parse_value(v.to_text()) == v


def test_value_bytes_utf8():
    assert parse_value(b"10.0.0.1:53,^a\\.$") == RouteValue(A, r"^a\.$")


def test_value_split_at_first_comma_only():
    v = parse_value(r"10.0.0.1:53,^a{1,3}\.$")
    assert v == RouteValue(A, r"^a{1,3}\.$")
    v = parse_value(r"10.0.0.1:53,^(a,b|c,,d)\.$")
    assert v.pattern == r"^(a,b|c,,d)\.$"


def test_value_outer_whitespace_is_stripped():
    assert parse_value("  10.0.0.1:53,^a\\.$ \n") == RouteValue(A, r"^a\.$")


def _reason(value) -> str:
    with pytest.raises(ValueParseError) as info:
        parse_value(value)
    return str(info.value)


def test_value_without_comma():
    assert "comma" in _reason("10.0.0.1:53")
    assert "comma" in _reason(r"10.0.0.1:53 ^a\.$")


def test_value_hostname_instead_of_ip():
    assert "localhost" in _reason("localhost:53,x")


@pytest.mark.parametrize("port", ["0", "65536", "abc", "", "99999999999"])
def test_value_bad_port(port):
    assert "port" in _reason(f"10.0.0.1:{port},x")


def test_value_missing_port():
    with pytest.raises(ValueParseError):
        parse_value("10.0.0.1,x")
    with pytest.raises(ValueParseError):
        parse_value("[2001:db8::1],x")


@pytest.mark.parametrize("pattern", ["(", "a{1001}", "(?=a)", r"\Z", "[z-a]"])
def test_value_bad_regexp(pattern):
    assert "RE2" in _reason(f"10.0.0.1:53,{pattern}")


def test_value_empty_regexp():
    with pytest.raises(ValueParseError):
        parse_value("10.0.0.1:53,")


@pytest.mark.parametrize("value", ["", "   ", "\n", b""])
def test_value_empty(value):
    assert "empty" in _reason(value)


def test_value_huge():
    value = "10.0.0.1:53," + "a" * MAX_VALUE_BYTES
    assert len(value.encode()) > 4096
    assert "longer" in _reason(value)
    assert "longer" in _reason(value.encode())
    # The limit is in bytes, not characters.
    assert "longer" in _reason("10.0.0.1:53," + "\u00e9" * 2100)


def test_value_just_under_the_limit_parses():
    value = "10.0.0.1:53,^" + "a" * (MAX_VALUE_BYTES - len("10.0.0.1:53,^"))
    assert len(value.encode()) == MAX_VALUE_BYTES
    assert parse_value(value).backend == A


def test_value_non_utf8_bytes():
    assert "UTF-8" in _reason(b"10.0.0.1:53,^a\xff\\.$")


def test_value_non_utf8_str_from_surrogateescape():
    # The file registry decodes file contents with surrogateescape, so a file
    # holding invalid UTF-8 reaches parse_value as a str with lone surrogates.
    # It must be a ValueParseError (skipped and counted), nothing else.
    value = b"10.0.0.1:53,^a\xff\\.$".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueParseError):
        parse_value(value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80),
                 st.builds(lambda a, p: f"{a},{p}",
                           st.sampled_from(["10.0.0.1:53", "[::1]:53", "1.2.3.4:0", "x:1"]),
                           st.text(max_size=40))))
def test_value_parser_raises_only_value_parse_error(value):
    try:
        result = parse_value(value)
    except ValueParseError:
        return
    assert isinstance(result, RouteValue)
    assert 1 <= result.backend.port <= 65535
    compile_set([result.pattern])  # what parsed must also go into the set


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda ip: f"[{ip}]")
_pattern = st.sampled_from([r"^a\.$", r"^a{1,3}\.$", r"example\.com\.$", r"^(x|y),z\.$", "."])


@settings(max_examples=300, deadline=None)
@given(st.one_of(_ipv4, _ipv6), st.integers(1, 65535), _pattern)
def test_value_round_trip(host, port, pattern):
    value = parse_value(f"{host}:{port},{pattern}")
    assert value.backend.port == port
    assert value.pattern == pattern
    assert parse_value(value.to_text()) == value


# -- pools and precedence -----------------------------------------------------

def test_build_routes_groups_and_orders():
    values = [
        (5, RouteValue(C, r"^a\.$")),
        (1, RouteValue(B, r"^b\.$")),
        (3, RouteValue(A, r"^a\.$")),
        (4, RouteValue(A, r"^a\.$")),  # the same backend twice: once in the pool
        (2, RouteValue(D, r"^b\.$")),
    ]
    assert build_routes(values) == (
        Route(r"^b\.$", (B, D)),
        Route(r"^a\.$", (A, C)),
    )


def _matcher(records, down=()):
    """records: (order, backend, pattern) in any order."""
    return Matcher(build_routes((o, RouteValue(b, p)) for o, b, p in records), down)


@pytest.mark.parametrize("records", [
    [(1, A, r"^www\.example\.com\.$"), (2, B, r"example\.com\.$")],
    [(2, B, r"example\.com\.$"), (1, A, r"^www\.example\.com\.$")],
])
def test_smaller_order_wins_whatever_the_record_order(records):
    m = _matcher(records)
    assert m.lookup("www.example.com.").backends == (A,)
    assert m.lookup("mail.example.com.").backends == (B,)


def test_larger_order_loses_whatever_the_record_order():
    m = _matcher([(9, A, r"^www\.example\.com\.$"), (1, B, r"example\.com\.$")])
    assert m.lookup("www.example.com.").backends == (B,)


def test_pool_all_down_falls_through_to_next_match():
    records = [(1, A, r"^www\.example\.com\.$"), (2, C, r"^www\.example\.com\.$"),
               (3, B, r"example\.com\.$")]
    assert _matcher(records).lookup("www.example.com.").backends == (A, C)
    assert _matcher(records, down={A}).lookup("www.example.com.").backends == (C,)
    pool = _matcher(records, down={A, C}).lookup("www.example.com.")
    assert pool.route.pattern == r"example\.com\.$"
    assert pool.backends == (B,)


def test_none_usable_is_none():
    records = [(1, A, r"^www\.example\.com\.$"), (2, B, r"example\.com\.$")]
    assert _matcher(records, down={A, B}).lookup("www.example.com.") is None
    assert _matcher(records).lookup("www.example.org.") is None
    assert Matcher(()).lookup("www.example.com.") is None


def test_match_bytes_gives_the_index_of_every_matching_pattern():
    """What the compiled path calls on a route-cache miss: a name's bytes in,
    every matching pattern's index out, nothing for no match."""
    m = _matcher([(1, A, r"^www\.example\.com\.$"), (2, B, r"example\.com\.$"), (3, C, r"\.org\.$")])
    assert sorted(m.match_bytes(b"www.example.com.")) == [0, 1]
    assert sorted(m.match_bytes(b"mail.example.com.")) == [1]
    assert sorted(m.match_bytes(b"www.example.org.")) == [2]
    assert not m.match_bytes(b"www.example.net.")


def test_search_semantics():
    m = _matcher([(1, A, r"example\.com")])
    assert m.lookup("www.example.com.").backends == (A,)
    assert m.lookup("example.community.").backends == (A,)
    assert _matcher([(1, A, r"^example\.com\.$")]).lookup("www.example.com.") is None


def test_round_robin_even_over_300_picks():
    pool = Pool(Route("x", (A, B, C)), (A, B, C))
    picks = [pool.next() for _ in range(300)]
    assert Counter(picks) == {A: 100, B: 100, C: 100}
    assert picks[:6] == [A, B, C, A, B, C]


def test_pool_only_has_usable_backends():
    m = Matcher([Route("x", (A, B, C))], down={B})
    pool = m.lookup("x.")
    assert pool.backends == (A, C)
    assert {pool.next() for _ in range(10)} == {A, C}


@pytest.mark.parametrize("backends", [(A, B), (A, B, C), (A, B, C, D)])
def test_pool_other_never_returns_tried(backends):
    pool = Pool(Route("x", backends), backends)
    for _ in range(50):
        for tried in backends:
            other = pool.other(tried)
            assert other is not None
            assert other != tried
            assert other in backends
            pool.next()  # interleave with ordinary picks


def test_pool_other_with_two_is_the_other_one():
    pool = Pool(Route("x", (A, B)), (A, B))
    for _ in range(10):
        assert pool.other(A) == B
        assert pool.other(B) == A


def test_pool_other_single_backend_is_none():
    pool = Pool(Route("x", (A,)), (A,))
    assert pool.other(A) is None
    assert pool.next() == A


# -- the matcher at scale ------------------------------------------------------

N = 10_000


@pytest.fixture(scope="module")
def big_matcher():
    routes = [Route(rf"^h\.zone{i}\.example\.com\.$", (Address("10.0.0.1", 1 + i),))
              for i in range(N)]
    return Matcher(routes)


def test_10000_routes_last_registered_matches(big_matcher):
    pool = big_matcher.lookup(f"h.zone{N - 1}.example.com.")
    assert pool is not None
    assert pool.route.pattern == rf"^h\.zone{N - 1}\.example\.com\.$"
    assert pool.backends == (Address("10.0.0.1", N),)


def test_10000_routes_samples_match_their_own_route(big_matcher):
    for i in range(0, N, 379):
        assert big_matcher.lookup(f"h.zone{i}.example.com.").backends == (Address("10.0.0.1", 1 + i),)


def test_10000_routes_no_match_is_none(big_matcher):
    assert big_matcher.lookup("h.zone10000.example.com.") is None
    assert big_matcher.lookup("h.zone1.example.org.") is None
    assert big_matcher.lookup(".") is None


def test_catch_all_registered_last_loses_to_specific_first():
    specific = [(i, Address("10.0.0.1", 1 + i), rf"^h\.zone{i}\.example\.com\.$") for i in range(N)]
    catch_all = (N, B, r"\.example\.com\.$")
    m = _matcher(specific + [catch_all])
    assert m.lookup("h.zone17.example.com.").backends == (Address("10.0.0.1", 18),)
    assert m.lookup(f"h.zone{N - 1}.example.com.").backends == (Address("10.0.0.1", N),)
    assert m.lookup("other.example.com.").backends == (B,)


def test_lookup_wire_lower_case_and_cache():
    m = _matcher([(1, A, r"^www\.example\.com\.$")])
    calls = []

    def to_text(w):
        calls.append(w)
        return name_to_text(w)

    wire = b"\x03WWW\x07Example\x03COM\x00".lower()  # the worker lower-cases first
    first = m.lookup_wire(wire, to_text)
    assert first is not None and first.backends == (A,)
    second = m.lookup_wire(wire, to_text)
    assert second is first
    assert calls == [wire]  # the second look-up came from the cache
    assert m.lookup_wire(b"\x03www\x07example\x03org\x00", to_text) is None
    assert m.lookup_wire(b"\x03www\x07example\x03org\x00", to_text) is None
    assert len(calls) == 2  # a miss is cached too


def test_lookup_wire_cache_is_bounded():
    m = _matcher([(1, A, r"example\.com\.$")])
    m.CACHE_SIZE = 10
    for i in range(35):
        label = f"h{i}".encode()
        pool = m.lookup_wire(bytes([len(label)]) + label + b"\x07example\x03com\x00", name_to_text)
        assert pool.backends == (A,)
        assert len(m._cache) <= 10


def test_matcher_accepts_a_precompiled_set():
    routes = [Route(r"^a\.$", (A,)), Route(r"^b\.$", (B,))]
    m = Matcher(routes, down={A}, patterns=compile_set(r.pattern for r in routes))
    assert m.lookup("a.") is None
    assert m.lookup("b.").backends == (B,)


def test_a_regexp_too_big_for_re2_is_refused_not_compiled():
    # Valid syntax, but its program exceeds RE2's memory budget: a registry
    # value must not make a worker build it.
    with pytest.raises(ValueParseError, match="pattern too large"):
        parse_value(r"127.0.0.1:53,\pL{1000}")  # any letter, a thousand times: a huge program


# -- JSON values: per-backend options -----------------------------------------

def test_json_value_with_client_address():
    v = parse_value(r'{"backend": "10.1.1.15:5300", "regexp": "^[ab]*\\.example\\.com\\.$", '
                    r'"client_address": "proxy"}')
    assert v == RouteValue(Address("10.1.1.15", 5300), r"^[ab]*\.example\.com\.$", "proxy")
    assert parse_value(v.to_text()) == v
    assert parse_value('{"backend": "[2001:db8::1]:53", "regexp": "x"}') == RouteValue(D, "x")


@pytest.mark.parametrize("value, reason", [
    ('{"backend": "10.0.0.1:53", "regexp": "x", "weight": 2}', "unknown key 'weight'"),
    ('{"backend": "10.0.0.1:53", "regexp": "x", "client_address": "both"}', "client_address 'both'"),
    ('{"backend": "10.0.0.1:53"}', "'regexp' must be a string"),
    ('{"backend": 53, "regexp": "x"}', "'backend' must be a string"),
    ('{"backend": "host:53", "regexp": "x"}', "not a literal IP"),
    ('{"backend": "10.0.0.1:53", "regexp": "("}', "RE2"),
    ('{"backend": "10.0.0.1:53", "regexp": "x"', "not valid JSON"),
    ('{' * 5000, "longer than"),
])
def test_bad_json_values_say_why(value, reason):
    assert reason in _reason(value)


def test_a_backend_option_rides_with_its_route():
    values = [(1, parse_value(r"10.0.0.1:53,^a\.$")),
              (2, parse_value('{"backend": "10.0.0.2:53", "regexp": "^a\\\\.$", "client_address": "ecs"}')),
              (3, parse_value(r"10.0.0.3:53,^b\.$"))]
    assert build_routes(values) == (Route(r"^a\.$", (A, B), (None, "ecs")), Route(r"^b\.$", (C,)))
