"""``dnsrouter-feed --config FILE``: the sharded zone follows the real zone.

One process, a thread per job: the secondary (``inbound``), the shards'
primary (``server``), NOTIFY out (``notify``), the routes in the registry,
and the metrics endpoint. Everything lasting is in the state directory
(``store``), so the process can be killed at any moment and started again.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dnsrouter import __version__, logs
from dnsrouter.errors import ConfigError

from .inbound import Secondary
from .notify import Notifier
from .routes import Routes
from .server import Server
from .settings import FeedConfig, build_parser, describe, load
from .store import Applied, StateError, Store

log = logging.getLogger("dnsrouter.feed")

COUNTERS = {
    "transfers_in": ("dnsrouter_feed_transfers_in_total", "Transfers of the zone from the primary",
                     ["type", "result"]),
    "transfers_out": ("dnsrouter_feed_transfers_out_total", "Transfers of a shard to its secondaries",
                      ["shard", "type"]),
    "notifies_sent": ("dnsrouter_feed_notifies_sent_total", "NOTIFY messages sent to a shard's secondaries",
                      ["shard"]),
    "notifies_answered": ("dnsrouter_feed_notifies_answered_total",
                          "NOTIFY messages a shard's secondaries answered", ["shard"]),
    "refused": ("dnsrouter_feed_refused_total", "Requests refused (no shard key, bad key, NOTIFY not "
                "from the primary, malformed, too many TCP connections)", ["reason"]),
}


class Feeder:
    def __init__(self, config: FeedConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.checkpoint_wanted = threading.Event()
        self.routes = Routes(config, store, self.stopping)
        self.notifier = Notifier([(s.shard_tsig, s.shard_backends) for s in config.shards], config.feed_zone,
                                 config.feed_listen.host, self.count)
        self.secondary = Secondary(store, config.feed_primary, config.feed_primary_tsig, config.feed_timeout,
                                   self.applied, self.count, config.feed_listen.host)
        self.server = Server(config.feed_listen, store, [s.shard_tsig for s in config.shards],
                             config.feed_primary, config.feed_primary_tsig, self.secondary.notified, self.count,
                             self.secondary.expired)

    def count(self, kind: str, *labels: str) -> None:
        with self.lock:
            self.counts[(kind,) + labels] += 1

    def applied(self, applied: Applied) -> None:
        """A new serial is in the store: tell every shard's secondaries, then
        copy the write-ahead log into the database, in a thread of its own
        (a first load's takes seconds, and the next transfer need not wait)."""
        self.notifier.serial(applied.serial)
        self.routes.wake.set()
        self.checkpoint_wanted.set()

    def _checkpoints(self) -> None:
        while not self.stopping.is_set():
            self.checkpoint_wanted.wait()
            self.checkpoint_wanted.clear()
            try:
                self.store.checkpoint()
            except sqlite3.Error as e:  # the log then waits for the next serial's checkpoint
                log.warning("checkpoint of %s: %s", self.store.path, e)

    # -- metrics ----------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        with self.lock:
            counts = dict(self.counts)
        families = {kind: CounterMetricFamily(name, text, labels=labels)
                    for kind, (name, text, labels) in COUNTERS.items()}
        for (kind, *labels), value in sorted(counts.items()):
            families[kind].add_metric(labels, value)
        yield from families.values()
        serial = self.store.serial()
        if serial is not None:
            yield GaugeMetricFamily("dnsrouter_feed_zone_serial", "The zone's serial in the state", value=serial)
        served = GaugeMetricFamily("dnsrouter_feed_shard_serial",
                                   "The serial of the last transfer of the shard to one of its secondaries",
                                   labels=["shard"])
        for k, shard_serial in sorted(self.server.served.items()):
            served.add_metric([str(k)], shard_serial)
        yield served
        notified = GaugeMetricFamily("dnsrouter_feed_notified_serial",
                                     "The last serial a secondary answered a NOTIFY for", labels=["shard", "backend"])
        for backend, acknowledged in sorted(self.notifier.acknowledged.items()):
            notified.add_metric([str(self.notifier.backends[backend]), str(backend)], acknowledged)
        yield notified
        serves = GaugeMetricFamily("dnsrouter_feed_backend_serial", "The serial a secondary served at the last look "
                                   "(every 2 s); its route is registered once it serves one", labels=["shard", "backend"])
        for k, backend in self.routes.backends:
            if backend in self.routes.serials:
                serves.add_metric([str(k), str(backend)], self.routes.serials[backend])
        yield serves
        if self.secondary.last_success is not None:
            yield GaugeMetricFamily("dnsrouter_feed_seconds_since_transfer",
                                    "Seconds since the zone was last found current at the primary or transferred",
                                    value=time.time() - self.secondary.last_success)
        try:
            size = sum(os.path.getsize(self.store.path + suffix) for suffix in ("", "-wal")
                       if os.path.exists(self.store.path + suffix))
            yield GaugeMetricFamily("dnsrouter_feed_state_bytes", "Size of the state on disk", value=size)
        except OSError:
            pass

    # -- the process ----------------------------------------------------------------------
    def run(self) -> int:
        # The handlers only note the signal; the loop below acts on it (as the router's supervisor does).
        received: list[int] = []
        wake = threading.Event()

        def note(number: int, _: object) -> None:
            received.append(number)
            wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, note)
        if self.config.metrics_listen is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)  # a collector is anything with collect()
            start_http_server(self.config.metrics_listen.port, self.config.metrics_listen.host, registry)
            log.info("metrics on http://%s/metrics", self.config.metrics_listen)
        self.server.start()
        self.notifier.start()
        threading.Thread(target=self.routes.run, name="feed-routes", daemon=True).start()
        threading.Thread(target=self._checkpoints, name="feed-checkpoint", daemon=True).start()
        serial = self.store.serial()
        if serial is not None:  # a secondary may have missed the last NOTIFY while we were away
            log.info("state %s at serial %d", self.config.feed_state, serial)
            self.notifier.serial(serial)
        self.secondary.start()
        while not self.stopping.is_set():
            wake.wait()
            wake.clear()
            while received:
                number = received.pop(0)
                if number == signal.SIGHUP:
                    log.warning("SIGHUP: the configuration is read at start only; restart dnsrouter-feed "
                                "to apply it (the state continues by IXFR)")
                elif number == signal.SIGUSR1:
                    logs.reopen()
                else:
                    self.stopping.set()
        log.info("stopping")
        self.routes.wake.set()
        self.server.close()
        self.secondary.stop()
        self.notifier.stop()
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"dnsrouter-feed {__version__}")
        return 0
    try:
        config = load(args)
    except ConfigError as e:
        print(f"dnsrouter-feed: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        sys.stdout.write(describe(config))
        return 0
    try:
        logs.setup(config.log_target, config.log_level, "feed")
    except OSError as e:
        print(f"dnsrouter-feed: cannot log to {config.log_target}: {e}", file=sys.stderr)
        return 2
    try:
        store = Store(config.feed_state, config.feed_zone, len(config.shards), config.feed_journal_serials)
        feeder = Feeder(config, store)
    except (StateError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # the listen address
        log.error("cannot listen on %s: %s", config.feed_listen, e.strerror or e)
        return 2
    return feeder.run()


if __name__ == "__main__":
    sys.exit(main())
