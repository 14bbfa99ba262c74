"""Small random changes to a valid DNS message, for the property tests of
the parsers (test_wire, test_cache, test_cache_compiled)."""
from __future__ import annotations

from typing import Sequence

from hypothesis import strategies as st


def mutations(values: Sequence[int]) -> st.SearchStrategy:
    """Up to two changes: flip bits at a place, set a byte to one of
    ``values`` (label length edges, types), cut the message, insert bytes."""
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),  # at, xor mask
        st.tuples(st.just("set"), st.integers(0, 1 << 16), st.sampled_from(list(values))),
        st.tuples(st.just("cut"), st.integers(0, 1 << 16)),  # at
        st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=3)),
    ), max_size=2)


def mutate(packet: bytes, changes, set_after_header: bool = False) -> tuple[bytes, list[str]]:
    """``packet`` with ``changes`` (from ``mutations``) made, and their kinds.
    ``set_after_header``: a set lands past the 12-byte header."""
    data = bytearray(packet)
    kinds = []
    for kind, at, *arg in changes:
        at %= len(data) + 1
        if kind == "flip" and at < len(data):
            data[at] ^= arg[0]
        elif kind == "set" and set_after_header and len(data) > 12:
            data[12 + at % (len(data) - 12)] = arg[0]
        elif kind == "set" and not set_after_header and at < len(data):
            data[at] = arg[0]
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = arg[0]
        kinds.append(kind)
    return bytes(data), kinds
