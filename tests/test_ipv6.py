"""IPv6: listening on [::1] and routing to a backend at [::1]."""
from __future__ import annotations

import socket
import struct
import threading

import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest

from netutil import wait_until


class V6Backend:
    """A minimal backend on [::1]: answers every query (UDP and TCP) with AAAA ::53."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.udp.bind(("::1", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("::1", self.port))
        self.tcp.listen(16)
        self.udp_queries = 0
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    @staticmethod
    def answer(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        if query.question[0].rdtype == dns.rdatatype.AAAA:
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "AAAA", "::53"))
        return response.to_wire()

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            self.udp_queries += 1
            self.udp.sendto(self.answer(data), peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    length = struct.unpack("!H", conn.recv(2))[0]
                    reply = self.answer(conn.recv(length))
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except (OSError, struct.error):
                    pass

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def v6_backend():
    try:
        backend = V6Backend()
    except OSError as e:
        pytest.fail(f"IPv6 loopback unavailable: {e}")
    yield backend
    backend.close()


def test_ipv6_listener_and_ipv6_backend(router, v6_backend):
    r = router(start=False)
    r.args = ["--listen", f"[::1]:{r.port}"]  # the IPv4 listener's port, on ::1 too
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
    assert v6_backend.udp_queries >= 1
    tcp = dns.query.tcp(query, "::1", port=r.port, timeout=2)
    assert tcp.answer[0][0].address == "::53"
