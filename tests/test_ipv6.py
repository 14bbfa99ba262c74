"""IPv6: listening on [::1] and routing to a backend at [::1]."""
from __future__ import annotations

import dns.message
import dns.query
import dns.rcode
import pytest

from support.fake_backend import FakeBackend
from support.net import wait_until

# Every test here runs against both UDP packet paths (conftest.PACKET_PATHS).
pytestmark = [pytest.mark.system, pytest.mark.usefixtures("packet_path")]


@pytest.fixture
def v6_backend():
    try:
        backend = FakeBackend("ok", host="::1").start()
    except OSError as e:
        pytest.fail(f"IPv6 loopback unavailable: {e}")
    yield backend
    backend.stop()


def test_ipv6_listener_and_ipv6_backend(router, v6_backend):
    r = router(start=False)
    r.args += ["--listen", f"[::1]:{r.port}"]  # the IPv4 listener's port, on ::1 too
    r.route("v6", rf"[::1]:{v6_backend.port},\.six\.$")
    r.start()
    query = dns.message.make_query("host.six.", "AAAA")

    def answered():
        try:
            reply = dns.query.udp(query, "::1", port=r.port, timeout=0.5)
        except dns.exception.Timeout:
            return None
        return reply if reply.rcode() == dns.rcode.NOERROR else None

    reply = wait_until(answered, 5, message="no answer over IPv6")
    assert reply.answer[0][0].address == "::53"
    assert v6_backend.count("udp") >= 1
    tcp = dns.query.tcp(query, "::1", port=r.port, timeout=2)
    assert tcp.answer[0][0].address == "::53"
