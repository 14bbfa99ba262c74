"""The table of queries in flight: a reply and the timer race for each entry."""
from __future__ import annotations

import socket
import time

from dnsrouter.address import parse_address
from dnsrouter.workers.upstream import Pending, Upstream


def test_the_timer_never_sees_an_entry_without_its_send_time():
    # The timer thread may scan the table at any moment; here it scans right
    # after the entry went in, the worst moment for a fresh or retried query.
    upstream = Upstream(socket.AF_INET, on_reply=None, counts={})
    expired = []

    class ScannedOnInsert(dict):
        def setdefault(self, key, value):
            result = super().setdefault(key, value)
            expired.extend(upstream.expired(time.monotonic() - 0.5))  # a 0.5 s forward timeout
            return result

    upstream.pending = ScannedOnInsert()
    backend = parse_address("127.0.0.1:9")
    fresh = Pending(None, None, b"\x12\x34" + bytes(10), b"", None, backend, False, False)
    retried = Pending(None, None, b"\x12\x34" + bytes(10), b"", None, backend, False, False)
    retried.sent, retried.retried = time.monotonic() - 1.0, True  # its first try timed out
    try:
        assert upstream.send(fresh) and upstream.send(retried)
        assert expired == []
        assert sorted(map(id, upstream.pending.values())) == sorted([id(fresh), id(retried)])
    finally:
        upstream.sock.close()
