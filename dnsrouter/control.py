"""What the supervisor and a worker say to each other over their pipe.

Both sides import this module from the core; neither imports the other.
Messages are small tuples ``(tag, payload)`` sent with ``Connection.send``.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

# supervisor -> worker
SNAPSHOT = "snapshot"  # payload: Snapshot.to_wire() bytes
SETTINGS = "settings"  # payload: dict of live settings (forward_timeout, log_level)
STOP = "stop"  # payload: None; finish in-flight queries and exit 0

# worker -> supervisor
READY = "ready"  # payload: snapshot version applied; the worker serves
REPORT = "report"  # payload: dict of counter deltas; also the heartbeat
TIMEOUT = "timeout"  # payload: ("ip:port", timeouts in a row) of a backend that did not answer
BOOT_FAILED = "boot_failed"  # payload: the reason, before exiting EXIT_BOOT_FAILED

# Worker exit codes. A worker that cannot boot must not be respawned in a
# loop: the supervisor stops with the worker's message instead.
EXIT_OK = 0
EXIT_BOOT_FAILED = 3

REPORT_INTERVAL = 1.0  # seconds between two reports (heartbeats) of a worker


@dataclass
class WorkerSpec:
    """Everything a worker needs to start; the sockets are already bound."""

    index: int
    cpu: int | None
    udp_sockets: list[socket.socket]
    tcp_sockets: list[socket.socket]
    forward_timeout: float
    tcp_connections: int
    tcp_idle_timeout: float
    log_level: str
