"""parse_address: literal IPs only, ``ip:port`` and ``[ipv6]:port``."""
from __future__ import annotations

import socket

import pytest

from dnsrouter.address import Address, parse_address


def test_ipv4():
    a = parse_address("10.1.1.15:5300")
    assert a == Address("10.1.1.15", 5300)
    assert a.family == socket.AF_INET
    assert a.sockaddr == ("10.1.1.15", 5300)
    assert str(a) == "10.1.1.15:5300"


def test_ipv6_is_normalised():
    a = parse_address("[2001:DB8:0:0::1]:53")
    assert a == Address("2001:db8::1", 53)
    assert a.family == socket.AF_INET6
    assert a.sockaddr == ("2001:db8::1", 53, 0, 0)
    assert str(a) == "[2001:db8::1]:53"
    assert parse_address(str(a)) == a


def test_surrounding_whitespace_is_ignored():
    assert parse_address("  127.0.0.1:53\n") == Address("127.0.0.1", 53)


@pytest.mark.parametrize("port", [1, 53, 65535])
def test_port_bounds_accepted(port):
    assert parse_address(f"127.0.0.1:{port}").port == port
    assert parse_address(f"[::1]:{port}").port == port


@pytest.mark.parametrize("text", [
    "localhost:53",          # a host name, not a literal IP
    "example.com:53",
    "127.0.0.1",             # no port
    "127.0.0.1:",            # empty port
    ":53",                   # no host
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "127.0.0.1:abc",
    "127.0.0.1:-1",
    "127.0.0.1:+53",
    "2001:db8::1:53",        # IPv6 must be bracketed
    "[127.0.0.1]:53",        # IPv4 must not be
    "[::1]53",
    "[::1]",
    "[::1]:",
    "256.1.1.1:53",
    "",
])
def test_invalid(text):
    with pytest.raises(ValueError):
        parse_address(text)


@pytest.mark.parametrize("port", ["\u0665\u0663", "\uff15\uff13"])
def test_non_ascii_digits_are_not_a_port(port):
    # str.isdigit() is true for Arabic-Indic and full-width digits, and int()
    # converts them: "10.0.0.1:٥٣" must not silently become port 53.
    with pytest.raises(ValueError):
        parse_address(f"10.0.0.1:{port}")
