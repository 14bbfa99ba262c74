"""Zone file text for the Knot servers of tests and benchmarks.

Every zone starts the same way (SOA, NS and the name server's address) and
holds numbered hosts h0001, h0002, ... whose A addresses tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

HEAD = ["$TTL 300", "@ SOA ns hostmaster 1 3600 900 604800 300", "@ NS ns", "ns A 192.0.2.53"]


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def zone_text(origin: str, lines: Iterable[str]) -> str:
    """A zone file for origin: the common head (SOA, NS, ns A), then lines."""
    return "\n".join([f"$ORIGIN {fqdn(origin)}", *HEAD, *lines]) + "\n"


def host(i: int, width: int = 4) -> str:
    """The owner label of host number i: h0001 (width 4), h00001 (width 5)."""
    return f"h{i:0{width}d}"


def host_address(i: int, net: int = 0) -> str:
    """Host i's A address, 10.<net>.x.y: distinct per host (below 65,536) and per net."""
    return f"10.{net + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def numbered_zone(origin: str, n: int, *, width: int = 4, net: int = 0) -> str:
    """origin with hosts 1..n, each with an A record (what the benchmarks query)."""
    return zone_text(origin, (f"{host(i, width)} A {host_address(i, net)}" for i in range(1, n + 1)))


@dataclass(frozen=True)
class SplitZone:
    """Two backend halves of one namespace, as two separate zones.

    dnsrouter routes by regexp over names, so each Knot gets its own zone
    (a.<origin> and b.<origin>) rather than half of one zone.
    """

    origin: str
    zones: dict[str, str]            # zone name -> zone file text
    names: dict[str, list[str]]      # zone name -> owner names that have an A record
    addresses: dict[str, str]        # owner name -> its A address
    big_txt: dict[str, str]          # zone name -> owner of the big TXT RRset
    big_txt_strings: dict[str, list[str]]  # zone name -> the TXT strings at big_txt

    @property
    def zone_names(self) -> list[str]:
        return list(self.zones)


def make_split_zone(origin: str = "example.com.", n: int = 300, big_txt_count: int = 8) -> SplitZone:
    """Zones a.<origin> and b.<origin>, each with n A records h0001..hNNNN.

    Each zone also has big.<zone> with big_txt_count TXT records of 200
    characters: about 1.7 KB on the wire with the defaults, so over UDP it
    exceeds both 512 (no EDNS) and Knot's 1232-byte EDNS cap and comes back
    with TC, while over TCP it arrives whole (and stays below 4000 bytes).
    """
    origin = fqdn(origin)
    zones: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    addresses: dict[str, str] = {}
    big_txt: dict[str, str] = {}
    big_strings: dict[str, list[str]] = {}
    for half, label in enumerate(("a", "b"), start=1):
        zone = f"{label}.{origin}"
        lines = []
        names[zone] = []
        for i in range(1, n + 1):
            owner = f"{host(i)}.{zone}"
            # 10.<half>.x.y: distinct per name, so answers identify the zone too.
            addr = host_address(i, net=half)
            lines.append(f"{host(i)} A {addr}")
            names[zone].append(owner)
            addresses[owner] = addr
        strings = [(f"{label}-{j:02d}-" + "x" * 200)[:200] for j in range(big_txt_count)]
        lines += [f'big TXT "{s}"' for s in strings]
        zones[zone] = zone_text(zone, lines)
        big_txt[zone] = f"big.{zone}"
        big_strings[zone] = strings
    return SplitZone(origin, zones, names, addresses, big_txt, big_strings)
