"""The client's address reaches a real Knot: PROXY v2 headers and EDNS Client Subnet.

The backends are real knotd servers that answer with what they believe the
client is: mod-whoami answers the apex A with the source address it sees
(the PROXY header's, when the header comes from an address of Knot's
`proxy-allowlist`), and mod-geoip in subnet mode answers by the network of
the query's ECS option (`edns-client-subnet: on`), or by the source
address when there is none. Clients send from 127.0.0.2, 127.0.1.2, ... so
their address differs from the router's own (127.0.0.1), which is what a
backend sees without the feature; every test asks a `none` router too, or
otherwise shows the difference, so none of them passes without it.

That Knot itself takes hand-made headers and ECS options as configured here
is checked in test_support_selfcheck.py: a failure here is the router's.
"""
from __future__ import annotations

import json

import dns.edns
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from support.knot import KnotServer, geoip_subnets
from support.net import HOST, answered, wait_until
from support.zones import zone_text

pytestmark = pytest.mark.system

WHOAMI = "whoami.test."  # mod-whoami, Knot takes PROXY headers
PLAIN = "plain.test."  # mod-whoami, Knot without a proxy-allowlist
GEO = "geo.test."
WHERE = "where.geo.test."  # mod-geoip, by subnet

ROUTER_ADDRESS = "127.0.0.1"  # the source of the router's datagrams to a backend
PROXY_CLIENTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

# mod-geoip views of where.geo.test.: the most specific network holding the
# ECS address (else the source address) wins.
NET0, NET1, ROUTER_ITSELF, CLIENT_OWN = "198.51.100.10", "198.51.100.11", "198.51.100.1", "198.51.100.13"
GEO_VIEWS = {WHERE: [
    ("127.0.0.0/24", {"A": NET0}),          # ECS 127.0.0.0/24: a client 127.0.0.x through the router
    ("127.0.0.1/32", {"A": ROUTER_ITSELF}),  # no ECS: the router's own address is the source
    ("127.0.1.0/24", {"A": NET1}),          # ECS 127.0.1.0/24: a client 127.0.1.x
    ("203.0.113.0/24", {"A": CLIENT_OWN}),  # a client's own ECS option
]}
CLIENT_ECS = ("203.0.113.0", 24)

TRANSPORTS = ("udp", "tcp")


def re_of(zone: str) -> str:
    return r"(^|\.)" + zone.rstrip(".").replace(".", r"\.") + r"\.$"


# -- backends (one of each for the module; every test asks, none changes them) -----

@pytest.fixture(scope="module")
def whoami_knot():
    with KnotServer({WHOAMI: zone_text(WHOAMI, [])}, whoami=[WHOAMI], proxy_allowlist="127.0.0.0/8") as k:
        yield k


@pytest.fixture(scope="module")
def plain_knot():
    with KnotServer({PLAIN: zone_text(PLAIN, [])}, whoami=[PLAIN]) as k:
        yield k


@pytest.fixture(scope="module")
def geo_knot():
    with KnotServer({GEO: zone_text(GEO, [])}, edns_client_subnet=True,
                    geoip={GEO: geoip_subnets(GEO_VIEWS)}) as k:
        yield k


# -- clients -----------------------------------------------------------------------

def ask_from(source: str, port: int, query: dns.message.Message, transport: str,
             timeout: float = 2.0) -> dns.message.Message:
    """One query from source (a loopback address) to the router; the reply."""
    if transport == "udp":
        return dns.query.udp(query, HOST, port=port, source=source, timeout=timeout)
    return dns.query.tcp(query, HOST, port=port, source=source, timeout=timeout)


def addresses(reply: dns.message.Message, name: str) -> list[str]:
    assert reply.rcode() == dns.rcode.NOERROR, f"rcode {dns.rcode.to_text(reply.rcode())}:\n{reply}"
    rrset = next((r for r in reply.answer if r.rdtype == dns.rdatatype.A and r.name == dns.name.from_text(name)),
                 None)
    assert rrset is not None, f"no A in the answer:\n{reply}"
    return sorted(rd.address for rd in rrset)


def a_from(source: str, port: int, name: str, transport: str, **kw) -> list[str]:
    return addresses(ask_from(source, port, dns.message.make_query(name, "A", **kw), transport), name)


def ecs_options(reply: dns.message.Message) -> list[dns.edns.ECSOption]:
    return [o for o in reply.options if o.otype == dns.edns.OptionType.ECS]


def start_router(router, *routes: tuple[str, str], mode: str | None = None):
    """A started router (--client-address mode; none when not given) with these (key, value) routes."""
    r = router(args=["--client-address", mode] if mode else [])
    for key, value in routes:
        r.route(key, value)
    return r


def wait_routed(r, *names: str) -> None:
    for name in names:
        try:
            wait_until(lambda: answered(r, name), 10, message=f"{name} never routed")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{r.log()[-3000:]}") from None


# -- PROXY v2 ------------------------------------------------------------------------

def test_proxy_backend_sees_each_clients_address_over_udp_and_tcp(router, whoami_knot):
    route = ("whoami", f"{whoami_knot.addr},{re_of(WHOAMI)}")
    plain = start_router(router, route)
    proxied = start_router(router, route, mode="proxy")
    wait_routed(plain, WHOAMI)
    wait_routed(proxied, WHOAMI)
    for transport in TRANSPORTS:
        # Without the header Knot sees the router: that is the difference the feature makes.
        assert a_from(PROXY_CLIENTS[0], plain.port, WHOAMI, transport) == [ROUTER_ADDRESS], transport
        for client in PROXY_CLIENTS:
            got = a_from(client, proxied.port, WHOAMI, transport)
            assert got == [client], (f"client {client} over {transport}: the backend saw {got}, "
                                     f"not the client\n{proxied.log()[-3000:]}")


def test_proxy_is_per_backend_with_a_json_value(router, whoami_knot, plain_knot):
    # Global none; only the JSON value's backend gets headers. The other
    # backend has no allowlist: a header sent to it would not be understood.
    r = start_router(
        router,
        ("plain", f"{plain_knot.addr},{re_of(PLAIN)}"),
        ("proxied", json.dumps({"backend": whoami_knot.addr, "regexp": re_of(WHOAMI),
                                "client_address": "proxy"})),
    )
    wait_routed(r, PLAIN, WHOAMI)
    for transport in TRANSPORTS:
        for client in PROXY_CLIENTS[:2]:
            assert a_from(client, r.port, PLAIN, transport) == [ROUTER_ADDRESS], (client, transport)
            got = a_from(client, r.port, WHOAMI, transport)
            assert got == [client], (f"client {client} over {transport}: the JSON route's backend saw "
                                     f"{got}\n{r.log()[-3000:]}")


# -- EDNS Client Subnet ----------------------------------------------------------------

def test_ecs_backend_answers_by_the_clients_network_over_udp_and_tcp(router, geo_knot):
    route = ("geo", f"{geo_knot.addr},{re_of(GEO)}")
    plain = start_router(router, route)
    ecs = start_router(router, route, mode="ecs")
    wait_routed(plain, WHERE)
    wait_routed(ecs, WHERE)
    for transport in TRANSPORTS:
        # Without ECS the backend can only go by the router's address.
        assert a_from("127.0.1.2", plain.port, WHERE, transport) == [ROUTER_ITSELF], transport
        for client, expected in (("127.0.0.2", NET0), ("127.0.1.2", NET1)):
            for kw in ({}, {"use_edns": 0}):
                got = a_from(client, ecs.port, WHERE, transport, **kw)
                assert got == [expected], (f"client {client} over {transport} ({kw or 'no OPT'}): "
                                           f"answer {got}, not its network's {expected}\n{ecs.log()[-3000:]}")


def test_ecs_the_router_takes_its_option_out_of_the_reply(router, geo_knot):
    r = start_router(router, ("geo", f"{geo_knot.addr},{re_of(GEO)}"), mode="ecs")
    wait_routed(r, WHERE)
    for transport in TRANSPORTS:
        # No OPT in the query: none in the reply, though Knot answered an OPT with ECS.
        reply = ask_from("127.0.1.2", r.port, dns.message.make_query(WHERE, "A"), transport)
        assert addresses(reply, WHERE) == [NET1], f"the backend saw no ECS ({transport}):\n{reply}"
        assert reply.edns < 0, f"an OPT came back to a client that sent none ({transport}):\n{reply}"
        # An OPT without ECS: an OPT back, without ECS, with the client's own options untouched.
        query = dns.message.make_query(WHERE, "A", use_edns=0, payload=1232,
                                       options=[dns.edns.GenericOption(65001, b"mine")])
        reply = ask_from("127.0.1.2", r.port, query, transport)
        assert addresses(reply, WHERE) == [NET1], f"the backend saw no ECS ({transport}):\n{reply}"
        assert reply.edns == 0, f"the client's OPT is gone ({transport}):\n{reply}"
        assert not ecs_options(reply), f"the router's ECS reached the client ({transport}):\n{reply}"


def test_ecs_a_clients_own_option_is_kept_and_echoed(router, geo_knot):
    r = start_router(router, ("geo", f"{geo_knot.addr},{re_of(GEO)}"), mode="ecs")
    wait_routed(r, WHERE)
    own = dns.edns.ECSOption(*CLIENT_ECS)
    for transport in TRANSPORTS:
        # The router's own option where the client sent none...
        assert a_from("127.0.1.2", r.port, WHERE, transport, use_edns=0) == [NET1], transport
        # ...and the client's where it sent one (ecs_override = no): the
        # backend answered for 203.0.113.0/24 and says so.
        reply = ask_from("127.0.1.2", r.port,
                         dns.message.make_query(WHERE, "A", use_edns=0, options=[own]), transport)
        assert addresses(reply, WHERE) == [CLIENT_OWN], f"the client's ECS was not used ({transport}):\n{reply}"
        echoed = ecs_options(reply)
        assert len(echoed) == 1, f"expected the client's ECS echoed once ({transport}):\n{reply}"
        assert (echoed[0].address, echoed[0].srclen, echoed[0].scopelen) == (*CLIENT_ECS, 24), str(reply)
