"""The feeder's routes in the router's registry: one per secondary of each
shard, ``<secondary>,<the shard's pattern>``, written once that secondary
serves the zone, so the router never sends a name to a secondary that has
not loaded its shard yet.

Keys are ``feed-<zone>-<feeder id>-<shard>-<secondary>``: the id is made
with the state directory and kept in it, so a restart writes nothing, and a
second feeder for the same zone (a new number of shards, a new state
directory) has keys of its own: the two never remove each other's routes.
A feeder removes only its own keys whose secondary left the configuration;
a secondary that stops answering keeps its route (the router's health
checks take it out of rotation, and back).
"""
from __future__ import annotations

import logging
import threading

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from dnsrouter.address import Address

from ...registry import RegistryError, open_registry
from .settings import FeedConfig
from .store import Store

log = logging.getLogger("dnsrouter.feed.routes")

LOOK_EVERY = 2.0  # seconds between two SOA queries to each secondary
RETRY = 5.0  # seconds before writing the routes again while the registry does not answer


class Routes:
    def __init__(self, config: FeedConfig, store: Store, stopping: threading.Event) -> None:
        self.config = config
        self.store = store
        self.stopping = stopping
        self.wake = threading.Event()
        zone = config.feed_zone.to_text(omit_final_dot=True) or "root"
        self.prefix = f"feed-{zone}-{store.feeder_id}-"
        self.backends = [(k, backend) for k, shard in enumerate(config.shards) for backend in shard.shard_backends]
        self.serials: dict[Address, int] = {}  # the serial each secondary served at its last look
        self._synced: frozenset[Address] | None = None  # the serving secondaries the registry has routes for

    def key(self, shard: int, backend: Address) -> str:
        return f"{self.prefix}{shard}-{backend}"

    def run(self) -> None:
        log.info("route keys %s<shard>-<secondary>", self.prefix)
        while not self.stopping.is_set():
            shards = self.store.shard_map()
            if shards is not None:
                self._look()
                serving = frozenset(backend for _, backend in self.backends if backend in self.serials)
                if serving != self._synced:
                    try:
                        self._sync(shards.pattern, serving)
                        self._synced = serving
                    except (RegistryError, OSError) as e:
                        log.warning("routes not written (%s): again in %.0f s", e, RETRY)
                        self.stopping.wait(RETRY)
            self.wake.wait(LOOK_EVERY)
            self.wake.clear()

    def _look(self) -> None:
        for shard, backend in self.backends:
            query = dns.message.make_query(self.config.feed_zone, dns.rdatatype.SOA)
            try:
                reply = dns.query.udp(query, backend.host, port=backend.port, timeout=0.5)
            except (dns.exception.DNSException, OSError):
                continue
            soa = [r for r in reply.answer if r.rdtype == dns.rdatatype.SOA and r.name == self.config.feed_zone]
            if reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA and soa:
                if backend not in self.serials:
                    log.info("shard %d: %s serves serial %d", shard, backend, soa[0][0].serial)
                self.serials[backend] = soa[0][0].serial

    def _sync(self, pattern, serving: frozenset[Address]) -> None:
        registry = open_registry(self.config)
        configured = {self.key(k, backend): f"{backend},{pattern(k)}" for k, backend in self.backends}
        wanted = {self.key(k, backend): configured[self.key(k, backend)]
                  for k, backend in self.backends if backend in serving}
        have = {r.key: r.value.strip() for r in registry.read() if r.key.startswith(self.prefix)}
        written = [key for key, value in wanted.items() if have.get(key) != value]
        for key in written:
            registry.put(key, wanted[key])
            log.info("route %s = %s", key, wanted[key])
        stale = sorted(set(have) - set(configured))
        for key in stale:
            registry.delete(key)
            log.info("route %s removed (no such secondary in the configuration)", key)
        log.info("routes: %d of %d secondaries serve the zone, %d written, %d removed",
                 len(wanted), len(configured), len(written), len(stale))
