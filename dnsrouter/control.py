"""What the supervisor and a worker say to each other over their pipe.

Both sides import this module from the core; neither imports the other.
Messages are small tuples ``(tag, payload)`` sent with ``Connection.send``.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

# supervisor -> worker
SNAPSHOT = "snapshot"  # payload: Snapshot.to_wire() bytes
SETTINGS = "settings"  # payload: dict of live settings (forward_timeout, retry_min, log_level, log_queries)
REOPEN_LOGS = "reopen_logs"  # payload: None (SIGUSR1)
STOP = "stop"  # payload: None; finish in-flight queries and exit 0

# worker -> supervisor
READY = "ready"  # payload: snapshot version applied; the worker serves
# payload: {"delta": counter deltas, "version": snapshot served, "srtt": {"ip:port": s},
# "fast_path": 1 if the compiled UDP path serves, else 0}; the heartbeat
REPORT = "report"
# payload: {"ip:port": failures in a row} of the backends whose unanswered
# tries or ICMP errors grew since the last one; at most every EVIDENCE_INTERVAL
EVIDENCE = "evidence"
BOOT_FAILED = "boot_failed"  # payload: the reason, before exiting EXIT_BOOT_FAILED

# Worker exit codes. A worker that cannot boot must not be respawned in a
# loop: the supervisor stops with the worker's message instead.
EXIT_OK = 0
EXIT_BOOT_FAILED = 3

# Upper bounds (seconds) of the backend latency histogram: the worker counts
# into them, the supervisor exposes them.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REPORT_INTERVAL = 1.0  # seconds between two reports (heartbeats) of a worker
EVIDENCE_INTERVAL = 0.1  # seconds at least between two EVIDENCE messages of a worker


@dataclass
class WorkerSpec:
    """Everything a worker needs to start; the sockets are already bound."""

    index: int
    cpu: int | None
    udp_sockets: list[socket.socket]
    tcp_sockets: list[socket.socket]
    forward_timeout: float
    tcp_connections: int
    max_in_flight: int
    allow: tuple  # ip_network objects; empty: everyone
    deny_action: str
    tcp_idle_timeout: float
    tcp_output_limit: int
    retry_min: float
    tcp_fetches: int
    client_address: str
    proxy_tcp: bool
    ecs_ipv4_prefix: int
    ecs_ipv6_prefix: int
    ecs_override: bool
    log_level: str
    log_target: str
    log_queries: bool
    fast_path: str  # [server] fast_path: auto or off
