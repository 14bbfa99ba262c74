"""PROXY protocol v2 headers, checked byte by byte against the specification's layout."""
from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from dnsrouter import proxy
from dnsrouter.address import Address
from dnsrouter.proxy import ProxyHeader
from dnsrouter.workers import mmsg

FAST = settings(max_examples=300, deadline=None)

# Section 2.2 of the specification, spelled out rather than taken from the module.
SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])

IPV4_DGRAM = (
    SIG
    + b"\x21"  # version 2, command PROXY
    + b"\x12"  # AF_INET, DGRAM
    + b"\x00\x0c"  # 12 bytes of addresses follow
    + bytes([192, 0, 2, 1])  # source address
    + bytes([198, 51, 100, 7])  # destination address
    + b"\xcf\x08"  # source port 53000
    + b"\x00\x35"  # destination port 53
)

IPV6_DGRAM = (
    SIG
    + b"\x21"
    + b"\x22"  # AF_INET6, DGRAM
    + b"\x00\x24"  # 36 bytes of addresses follow
    + bytes.fromhex("20010db8000000000000000000000001")  # 2001:db8::1
    + bytes.fromhex("20010db8000000000000000000000053")  # 2001:db8::53
    + b"\x10\x92"  # source port 4242
    + b"\x14\xe9"  # destination port 5353
)


def test_ipv4_datagram_header_is_the_specifications_layout():
    got = proxy.header(("192.0.2.1", 53000), ("198.51.100.7", 53))
    assert got == IPV4_DGRAM
    assert len(got) == 16 + 12


def test_ipv6_datagram_header_is_the_specifications_layout():
    got = proxy.header(("2001:db8::1", 4242), ("2001:db8::53", 5353))
    assert got == IPV6_DGRAM
    assert len(got) == 16 + 36


@pytest.mark.parametrize("source, destination, expected", [
    (("192.0.2.1", 53000), ("198.51.100.7", 53), IPV4_DGRAM[:13] + b"\x11" + IPV4_DGRAM[14:]),
    (("2001:db8::1", 4242), ("2001:db8::53", 5353), IPV6_DGRAM[:13] + b"\x21" + IPV6_DGRAM[14:]),
])
def test_stream_headers_differ_in_the_protocol_nibble_only(source, destination, expected):
    assert proxy.header(source, destination, stream=True) == expected


def test_the_fast_builders_write_the_same_bytes():
    v4 = proxy.prefix_for(("198.51.100.7", 53))
    assert v4(("192.0.2.1", 53000)) == IPV4_DGRAM
    v6 = proxy.prefix_for(("2001:db8::53", 5353))
    assert v6(("2001:db8::1", 4242, 0, 0)) == IPV6_DGRAM  # recvfrom's four-tuple
    raw4 = proxy.sockaddr_prefix_for(("198.51.100.7", 53))
    raw6 = proxy.sockaddr_prefix_for(("2001:db8::53", 5353))
    # The packet path's raw peers, as the kernel writes them.
    assert raw4(mmsg.raw_address(Address("192.0.2.1", 53000))) == IPV4_DGRAM
    assert raw6(mmsg.raw_address(Address("2001:db8::1", 4242))) == IPV6_DGRAM


def test_raw_sockaddr_copies_address_and_port_ignoring_flow_and_scope():
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 4242, 0xABCDE) + \
        socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("=I", 7)
    assert proxy.sockaddr_prefix_for(("2001:db8::53", 5353))(raw) == IPV6_DGRAM


def test_ipv6_zone_is_left_out():
    assert proxy.header(("fe80::1%eth0", 4242), ("fe80::53%eth0", 5353)) == \
        proxy.header(("fe80::1", 4242), ("fe80::53", 5353))


def test_v4_mapped_source_on_a_dual_stack_socket_is_ipv6():
    got = proxy.header(("::ffff:192.0.2.1", 53000), ("2001:db8::53", 53))
    assert got[13] == 0x22
    assert got[16:32] == socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1")


@pytest.mark.parametrize("source, destination", [
    (("2001:db8::1", 1), ("192.0.2.53", 53)),  # mixed families
    (("192.0.2.1", 1), ("2001:db8::53", 53)),
    (("::ffff:192.0.2.1", 1), ("192.0.2.53", 53)),
    (("192.0.2.1", -1), ("192.0.2.53", 53)),  # ports
    (("192.0.2.1", 65536), ("192.0.2.53", 53)),
    (("192.0.2.1", 1), ("192.0.2.53", 65536)),
    (("192.0.2.1", "53"), ("192.0.2.53", 53)),
    (("localhost", 1), ("192.0.2.53", 53)),  # not literal addresses
    (("192.0.2.1", 1), ("example.com", 53)),
    (("192.0.2.256", 1), ("192.0.2.53", 53)),
    (("", 1), ("192.0.2.53", 53)),
])
def test_header_rejects(source, destination):
    with pytest.raises(ValueError):
        proxy.header(source, destination)
    with pytest.raises(ValueError):
        proxy.prefix_for(destination)(source)


@pytest.mark.parametrize("destination, size", [(("192.0.2.53", 53), 28), (("2001:db8::53", 53), 16),
                                              (("192.0.2.53", 53), 8)])
def test_raw_sockaddr_of_the_other_family_is_refused(destination, size):
    with pytest.raises(ValueError):
        proxy.sockaddr_prefix_for(destination)(bytes(size))


# -- parse --------------------------------------------------------------------------

def test_parse_known_examples():
    assert proxy.parse(IPV4_DGRAM + b"query") == (
        ProxyHeader(("192.0.2.1", 53000), ("198.51.100.7", 53), False), 28)
    assert proxy.parse(IPV6_DGRAM) == (ProxyHeader(("2001:db8::1", 4242), ("2001:db8::53", 5353)), 52)


def test_parse_skips_tlvs():
    tlv = b"\x04\x00\x00"  # PP2_TYPE_NOOP, empty
    data = IPV4_DGRAM[:14] + struct.pack("!H", 12 + len(tlv)) + IPV4_DGRAM[16:] + tlv + b"payload"
    header, offset = proxy.parse(data)
    assert header == proxy.parse(IPV4_DGRAM)[0]
    assert data[offset:] == b"payload"


_addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
)
_ports = st.integers(0, 65535)


@FAST
@given(_addresses, _ports, _ports, st.booleans(), st.binary(max_size=64))
def test_parse_of_header_round_trips(addresses, source_port, destination_port, stream, payload):
    source = (str(addresses[0]), source_port)
    destination = (str(addresses[1]), destination_port)
    data = proxy.header(source, destination, stream)
    parsed, offset = proxy.parse(data + payload)
    assert parsed.stream == stream
    # inet_ntop's text, which may spell an address differently from ipaddress's
    assert (ipaddress.ip_address(parsed.source[0]), parsed.source[1]) == (addresses[0], source_port)
    assert (ipaddress.ip_address(parsed.destination[0]), parsed.destination[1]) == (addresses[1], destination_port)
    assert proxy.header(parsed.source, parsed.destination, parsed.stream) == data
    assert offset == len(data) == 16 + (12 if addresses[0].version == 4 else 36)
    assert (data + payload)[offset:] == payload
    # The layout, field by field.
    size = 4 if addresses[0].version == 4 else 16
    assert data[:12] == SIG
    assert data[12] == 0x21
    assert data[13] == (0x10 if size == 4 else 0x20) | (0x01 if stream else 0x02)
    assert struct.unpack("!H", data[14:16])[0] == 2 * size + 4
    assert data[16:16 + size] == addresses[0].packed
    assert data[16 + size:16 + 2 * size] == addresses[1].packed
    assert struct.unpack("!HH", data[16 + 2 * size:]) == (source_port, destination_port)
    # The fast builders agree.
    assert proxy.prefix_for(destination, stream)(source) == data
    raw = _raw(addresses[0], source_port)
    assert proxy.sockaddr_prefix_for(destination, stream)(raw) == data


def _raw(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    if address.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + address.packed + bytes(8)
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + address.packed + bytes(4)


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (IPV4_DGRAM[:15], "shorter than the fixed part"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.7 53000 53\r\n", "version 1"),
    (b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0b" + IPV4_DGRAM[12:], "signature off by a bit"),
    (IPV4_DGRAM[:12] + b"\x11" + IPV4_DGRAM[13:], "version 1 binary"),
    (IPV4_DGRAM[:12] + b"\x31" + IPV4_DGRAM[13:], "version 3"),
    (IPV4_DGRAM[:12] + b"\x20" + IPV4_DGRAM[13:], "command LOCAL"),
    (IPV4_DGRAM[:12] + b"\x22" + IPV4_DGRAM[13:], "command 2"),
    (IPV4_DGRAM[:13] + b"\x00" + IPV4_DGRAM[14:], "UNSPEC"),
    (IPV4_DGRAM[:13] + b"\x31" + IPV4_DGRAM[14:], "AF_UNIX"),
    (IPV4_DGRAM[:13] + b"\x10" + IPV4_DGRAM[14:], "protocol UNSPEC"),
    (IPV4_DGRAM[:13] + b"\x13" + IPV4_DGRAM[14:], "protocol 3"),
    (IPV4_DGRAM[:-1], "addresses cut"),
    (IPV4_DGRAM[:14] + b"\x00\x0d" + IPV4_DGRAM[16:], "length past the data"),
    (IPV4_DGRAM[:14] + b"\x00\x0b" + IPV4_DGRAM[16:], "length short of the IPv4 block"),
    (IPV6_DGRAM[:14] + b"\x00\x0c" + IPV6_DGRAM[16:], "IPv6 with an IPv4-sized block"),
    (IPV4_DGRAM[:13] + b"\x22" + IPV4_DGRAM[14:], "IPv6 family over IPv4 addresses"),
])
def test_parse_rejects(data, why):
    with pytest.raises(ValueError):
        proxy.parse(data)


@FAST
@given(st.binary(max_size=80))
def test_parse_arbitrary_bytes_raises_only_value_error(tail):
    for data in (tail, SIG + tail, SIG + b"\x21" + tail):
        try:
            header, offset = proxy.parse(data)
        except ValueError:
            continue
        assert 28 <= offset <= len(data)
        block = 12 if data[13] >> 4 == 1 else 36
        # What parse read is what header writes (TLVs aside).
        assert proxy.header(header.source, header.destination, header.stream) == \
            data[:14] + struct.pack("!H", block) + data[16:16 + block]


@FAST
@given(_addresses, _ports, _ports)
def test_every_cut_of_a_header_is_refused(addresses, source_port, destination_port):
    data = proxy.header((str(addresses[0]), source_port), (str(addresses[1]), destination_port))
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            proxy.parse(data[:cut])
