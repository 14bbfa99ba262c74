"""What the supervisor and a worker say to each other over their pipe.

Both sides import this module from the core; neither imports the other.
Each message is a frozen dataclass, sent whole with ``Connection.send``;
the receiver dispatches on its class. ``TAG`` names a kind of message in
logs and in ``dnsrouter_worker_messages_total{type}``.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from .purges import PurgeLog
from .ratelimit import RateTable
from .settings import Config

# Worker exit codes. A worker that cannot boot must not be respawned in a
# loop: the supervisor stops with the worker's message instead.
EXIT_OK = 0
EXIT_BOOT_FAILED = 3

# Upper bounds (seconds) of the backend latency histogram: the worker counts
# into them, the supervisor exposes them.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REPORT_INTERVAL = 1.0  # seconds between two reports (heartbeats) of a worker
EVIDENCE_INTERVAL = 0.1  # seconds at least between two EVIDENCE messages of a worker


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start; the sockets are already bound.

    ``config`` is the router's whole configuration, as gunicorn hands each
    worker its whole ``cfg``: a worker reads its settings there, under the
    names the settings table gives them, and keeps no defaults of its own.
    """

    index: int
    cpu: int | None
    udp_sockets: list[socket.socket]
    tcp_sockets: list[socket.socket]
    config: Config
    purges: PurgeLog | None = None  # the cache purges every worker reads (shared memory); None: a worker's own
    # The accounts of [limits] and [rrl] every worker charges (shared memory); None: off, or a worker's own
    limits: RateTable | None = None
    rrl: RateTable | None = None


# -- supervisor -> worker ------------------------------------------------------

@dataclass(frozen=True)
class NewSnapshot:
    """The routes to serve from now on; queued ones collapse to the newest."""

    TAG: ClassVar[str] = "snapshot"
    wire: bytes  # Snapshot.to_wire()


@dataclass(frozen=True)
class NewConfig:
    """SIGHUP: the configuration re-read; the worker applies its live settings
    (the ones marked ``live`` in the settings table) and answers ConfigApplied."""

    TAG: ClassVar[str] = "config"
    config: Config


@dataclass(frozen=True)
class ReopenLogs:
    """SIGUSR1: reopen the log file."""

    TAG: ClassVar[str] = "reopen_logs"


@dataclass(frozen=True)
class Stop:
    """Finish the queries in flight and exit EXIT_OK."""

    TAG: ClassVar[str] = "stop"


# -- worker -> supervisor ------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    """The worker serves, with the snapshot of ``version``."""

    TAG: ClassVar[str] = "ready"
    version: int


@dataclass(frozen=True)
class Report:
    """The heartbeat, once a REPORT_INTERVAL."""

    TAG: ClassVar[str] = "report"
    delta: dict[tuple[str, object], float]  # counts since the last report, keyed (name, label)
    version: int  # of the snapshot served
    srtt: dict[str, float]  # "ip:port": each backend's smoothed round trip, in seconds
    fast_path: bool  # the compiled UDP path serves
    cache: tuple[int, int] = (0, 0)  # the packet cache's entries and bytes now (gauges, not deltas)


@dataclass(frozen=True)
class Evidence:
    """Backends whose unanswered tries or ICMP errors grew since the last
    one; at most every EVIDENCE_INTERVAL, one message for all of them."""

    TAG: ClassVar[str] = "evidence"
    streaks: dict[str, int]  # "ip:port": failures in a row


@dataclass(frozen=True)
class ConfigApplied:
    """The answer to NewConfig: each live setting the worker applies, with
    the value it now uses, read back from where it is used (not echoed),
    beside the value the NewConfig asked for (a later SIGHUP may ask another)."""

    TAG: ClassVar[str] = "config_applied"
    effective: dict[str, Any]  # setting name (Config field): value
    wanted: dict[str, Any]


@dataclass(frozen=True)
class BootFailed:
    """Sent before exiting EXIT_BOOT_FAILED."""

    TAG: ClassVar[str] = "boot_failed"
    reason: str


ToWorker: TypeAlias = NewSnapshot | NewConfig | ReopenLogs | Stop
FromWorker: TypeAlias = Ready | Report | Evidence | ConfigApplied | BootFailed
