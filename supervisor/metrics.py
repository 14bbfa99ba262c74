"""Metrics and the HTTP endpoint: /metrics, /routes, /healthz; POST /purge.

Workers count locally and send deltas about once a second; the supervisor
adds them up here. A custom collector turns the sums into Prometheus
families at scrape time (prometheus-client renders the text format), so
there is one copy of every number, not one per metric object.
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import dns.rcode
import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from dnsrouter.address import Address
from dnsrouter.counters import COUNTERS, LATENCY_BUCKET, LATENCY_SUM

log = logging.getLogger("dnsrouter.metrics")

def _label(kind: str, label: Any) -> str:
    if kind == "responses":
        try:
            return dns.rcode.to_text(dns.rcode.Rcode.make(int(label)))
        except (ValueError, TypeError):
            return str(label)
    return str(label)


class Metrics:
    def __init__(self, state: Callable[[], dict], buckets: tuple[float, ...]) -> None:
        """``state`` returns the supervisor's gauges and tables, called per scrape."""
        self.totals: Counter = Counter()
        self.lock = threading.Lock()  # per report and per scrape, never per packet
        self.state = state
        self.buckets = buckets
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server: ThreadingHTTPServer | None = None

    def add(self, delta: dict) -> None:
        with self.lock:
            self.totals.update(delta)

    # -- the collector ----------------------------------------------------------
    def collect(self):
        with self.lock:
            totals = dict(self.totals)
        state = self.state()
        families = {c.kind: CounterMetricFamily(c.name, c.help, labels=[c.label]) for c in COUNTERS}
        for (kind, label), value in sorted(totals.items(), key=str):
            if kind in families:
                families[kind].add_metric([_label(kind, label)], value)
        yield from families.values()

        counts = [totals.get((LATENCY_BUCKET, i), 0) for i in range(len(self.buckets) + 1)]
        cumulative, running = [], 0
        for bound, count in zip(list(self.buckets) + [float("inf")], counts):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        yield HistogramMetricFamily("dnsrouter_backend_latency_seconds",
                                    "Time from forwarding a query to its reply",
                                    buckets=cumulative, sum_value=totals.get((LATENCY_SUM, ""), 0.0))

        up = GaugeMetricFamily("dnsrouter_backend_up", "1 when the backend takes queries", labels=["backend"])
        check = GaugeMetricFamily("dnsrouter_health_check_seconds", "Latency of the last passing health check",
                                  labels=["backend"])
        for backend, health in sorted(state["health"].items(), key=str):
            up.add_metric([str(backend)], 1.0 if health.up else 0.0)
            if health.latency is not None:
                check.add_metric([str(backend)], health.latency)
        yield up
        yield check
        # Each worker keeps its own estimate; the mean of theirs is the backend's.
        estimates: dict[str, list[float]] = {}
        for worker in state["srtt"]:
            for backend, seconds in worker.items():
                estimates.setdefault(backend, []).append(seconds)
        srtt = GaugeMetricFamily("dnsrouter_backend_srtt_seconds",
                                 "Smoothed round trip of forwarded queries (RFC 6298), mean over workers",
                                 labels=["backend"])
        for backend, values in sorted(estimates.items()):
            srtt.add_metric([backend], sum(values) / len(values))
        yield srtt
        yield GaugeMetricFamily("dnsrouter_registry_invalid_values", "Registry values that do not parse",
                                value=state["invalid"])
        yield GaugeMetricFamily("dnsrouter_snapshot_version", "Version of the route snapshot",
                                value=state["version"])
        yield GaugeMetricFamily("dnsrouter_snapshot_updated_timestamp_seconds",
                                "When the route snapshot last changed", value=state["updated"])
        yield GaugeMetricFamily("dnsrouter_routes", "Routes (pools) in the table", value=state["routes"])
        yield CounterMetricFamily("dnsrouter_worker_restarts_total", "Workers replaced after dying",
                                  value=state["restarts"])
        rss = GaugeMetricFamily("dnsrouter_worker_rss_bytes", "Resident memory of a worker", labels=["worker"])
        cpu = CounterMetricFamily("dnsrouter_worker_cpu_seconds_total", "CPU time of a worker", labels=["worker"])
        for index, pid in sorted(state["workers"].items()):
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    rss.add_metric([str(index)], process.memory_info().rss)
                    times = process.cpu_times()
                    cpu.add_metric([str(index)], times.user + times.system)
            except (psutil.Error, TypeError):
                continue
        yield rss
        yield cpu
        fast = GaugeMetricFamily("dnsrouter_fast_path", "1 when the worker's UDP path runs compiled "
                                 "(dnsrouter --version says why not)", labels=["worker"])
        for index, on in sorted(state["fast_path"].items()):
            fast.add_metric([str(index)], on)
        yield fast
        # Each worker has a cache of its own: the router's is their sum.
        yield GaugeMetricFamily("dnsrouter_cache_entries", "Replies in the packet caches of all workers",
                                value=sum(entries for entries, _ in state["cache"]))
        yield GaugeMetricFamily("dnsrouter_cache_bytes", "Memory the packet caches of all workers hold",
                                value=sum(size for _, size in state["cache"]))
        # The limits' tables are the workers' shared memory, which the supervisor made and reads.
        yield GaugeMetricFamily("dnsrouter_limits_networks", "Client networks whose [limits] account "
                                "holds anything now (charged within the last burst / client_qps seconds; at most "
                                "table_size)", value=state["limits_networks"])
        yield GaugeMetricFamily("dnsrouter_rrl_accounts", "(Network, answer) accounts of response rate "
                                "limiting that hold anything now (at most [rrl] table_size)", value=state["rrl_accounts"])

    # -- HTTP -------------------------------------------------------------------------
    def serve(self, address: Address, routes: Callable[[], dict], healthy: Callable[[], tuple[bool, str]],
              purge: Callable[[str, bool], dict]) -> None:
        """``purge(name, subtree)`` serves ``POST /purge?name=NAME[&subtree=1]``."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), "text/plain; version=0.0.4")
                elif path == "/routes":
                    self._send(200, json.dumps(routes(), indent=1).encode(), "application/json")
                elif path == "/healthz":
                    ok, why = healthy()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found: try /metrics, /routes or /healthz\n", "text/plain")

            def do_POST(self) -> None:
                path, _, query = self.path.partition("?")
                if path != "/purge":
                    self._send(404, b"not found: POST /purge?name=NAME[&subtree=1]\n", "text/plain")
                    return
                self.rfile.read(int(self.headers.get("Content-Length") or 0))  # a body means nothing here
                form = urllib.parse.parse_qs(query)
                names = form.get("name", [])
                if len(names) != 1:
                    self._send(400, b"give one name: POST /purge?name=NAME[&subtree=1]\n", "text/plain")
                    return
                try:
                    done = purge(names[0], form.get("subtree", ["0"])[-1] in ("1", "yes", "true", "on"))
                except ValueError as e:
                    self._send(400, f"{e}\n".encode(), "text/plain")
                    return
                self._send(200, json.dumps(done).encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # scrapes every few seconds would drown the log

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = address.family

        self._server = Server((address.host, address.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s/metrics", address)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
