"""Which clients may ask: ``[server] allow``."""
from __future__ import annotations

import ipaddress
from typing import Callable, Sequence

CACHE_SIZE = 65536


def make(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Callable[[str], bool] | None:
    """A test ``allowed(ip)``, or None when everyone is allowed (no cost at all)."""
    if not networks:
        return None
    networks = tuple(networks)
    cache: dict[str, bool] = {}

    def allowed(ip: str) -> bool:
        try:
            return cache[ip]
        except KeyError:
            pass
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        verdict = any(address in network for network in networks)
        if len(cache) >= CACHE_SIZE:
            cache.clear()  # bounded; clients that keep coming are cached again at once
        cache[ip] = verdict
        return verdict

    return allowed
