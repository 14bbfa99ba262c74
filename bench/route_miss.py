#!/usr/bin/env python3
"""What a name the route cache has not seen costs the compiled path.

A random-subdomain flood makes every query a miss: the compiled thread's
``RouteCache`` writes the name's text, runs the matcher's RE2 set once and
keeps the pool in place of an older entry. This times, in one process, a miss (new names), a hit (names already
cached) and the match alone (``Matcher.match_bytes``, the call a miss
makes: RE2's binding) on the same texts, in microseconds per
name, so that a change to the miss path can be held against the match
itself:

    .venv/bin/python bench/route_miss.py [--names 200000] [--routes 1]
"""
from __future__ import annotations

import argparse
import random
import time

from dnsrouter import wire
from dnsrouter.address import parse_address
from dnsrouter.routes import Matcher, Route
from dnsrouter.workers import fastpath


def question(label: bytes) -> bytes:
    return bytes([len(label)]) + label + b"\x07example\x03com\x00\x00\x01\x00\x01"  # A, IN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=200_000, help="new names to look up")
    p.add_argument("--routes", type=int, default=1, help="routes in the table (the last one matches)")
    args = p.parse_args()
    fast, why = fastpath.load()
    if fast is None:
        raise SystemExit(f"the compiled path is not built: {why}")
    backend = parse_address("127.0.0.1:53")
    routes = [Route(rf"^x\.zone{i}\.example\.com\.$", (backend,)) for i in range(args.routes - 1)]
    matcher = Matcher(routes + [Route(r"\.example\.com\.$", (backend,))])
    rng = random.Random(1)
    names = [question(b"h%012d" % rng.randrange(10**12)) for _ in range(args.names)]
    cached = names[:5000]  # the benchmark's zone: fits, so nothing is replaced while timed
    cache, lookup = fast.RouteCache(), fast.RouteCache.lookup

    start = time.perf_counter()
    for name in names:
        lookup(cache, matcher, name)
    miss = (time.perf_counter() - start) / len(names)

    cache = fast.RouteCache()
    for name in cached:
        lookup(cache, matcher, name)
    rounds = max(1, len(names) // len(cached))
    start = time.perf_counter()
    for _ in range(rounds):
        for name in cached:
            lookup(cache, matcher, name)
    hit = (time.perf_counter() - start) / (rounds * len(cached))

    texts = [wire.name_to_text(name[:-4]).encode() for name in names]
    match = matcher.match_bytes
    start = time.perf_counter()
    for text in texts:
        match(text)
    alone = (time.perf_counter() - start) / len(texts)
    print(f"{args.routes} route(s), {len(names)} names: miss {miss * 1e6:.2f} us, hit {hit * 1e6:.2f} us, "
          f"the match alone {alone * 1e6:.2f} us")


if __name__ == "__main__":
    main()
