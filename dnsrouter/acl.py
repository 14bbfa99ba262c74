"""Which clients a list of networks takes: ``[server] allow``, ``[cache]
notify_allow``, and the ``exempt`` lists of ``[limits]`` and ``[rrl]``."""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Sequence

CACHE_SIZE = 65536

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _text(ip: str) -> IPAddress:
    return ipaddress.ip_address(ip.split("%", 1)[0])


def make(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
         address: Callable[[Any], IPAddress] = _text) -> Callable[[Any], bool] | None:
    """A test ``allowed(client)``, or None when everyone is allowed (no cost
    at all). A client is its address as text, or whatever ``address`` makes
    one of (``ipaddress.ip_address``: packed, 4 or 16 bytes); verdicts are
    remembered by client."""
    if not networks:
        return None
    networks = tuple(networks)
    cache: dict[Any, bool] = {}

    def allowed(client: Any) -> bool:
        try:
            return cache[client]
        except KeyError:
            pass
        ip = address(client)
        verdict = any(ip in network for network in networks)
        if len(cache) >= CACHE_SIZE:
            cache.clear()  # bounded (a spoofed flood has millions of sources); clients that keep coming are cached again
        cache[client] = verdict
        return verdict

    return allowed
