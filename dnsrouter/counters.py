"""Every counter a worker (or the supervisor) counts, declared once.

A count is keyed ``(kind, label)``: ``counts["responses", 2] += 1`` on the
Python packet path, a C array slot on the compiled one (whose fixed keys are
made here, with ``key``), one labelled Prometheus family per kind in
``supervisor/metrics.py``. A kind counted but not declared here would never
be exported; tests/test_counters.py reads both packet paths' sources for the
kinds they count and checks them against this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counter:
    """One kind of count and the Prometheus counter family it is exported as."""

    kind: str  # the first element of a count's key
    name: str  # the family's name
    help: str
    label: str  # the name of the label the key's second element becomes


COUNTERS: tuple[Counter, ...] = (
    Counter("queries", "dnsrouter_queries_total", "Queries received from clients", "transport"),
    Counter("responses", "dnsrouter_responses_total", "Responses sent to clients", "rcode"),
    Counter("dropped", "dnsrouter_dropped_total",
            "Packets dropped without an answer, by why (client_qps: over [limits] client_qps)", "reason"),
    Counter("backend_queries", "dnsrouter_backend_queries_total", "Queries forwarded to a backend", "backend"),
    Counter("backend_timeouts", "dnsrouter_backend_timeouts_total",
            "Forwarded queries a backend did not answer in time", "backend"),
    Counter("ignored_replies", "dnsrouter_ignored_replies_total",
            "Replies from backends ignored (wrong source, ID or question)", "reason"),
    Counter("tcp_closed", "dnsrouter_tcp_closed_total", "TCP client connections closed by the router", "reason"),
    Counter("backend_retries", "dnsrouter_backend_retries_total",
            "Queries also sent to another backend because this one had not answered within its retry time, "
            "or was unreachable", "backend"),
    Counter("late_replies", "dnsrouter_backend_late_replies_total",
            "Replies dropped because the query was already answered (or had timed out)", "backend"),
    Counter("backend_icmp_errors", "dnsrouter_backend_icmp_errors_total",
            "ICMP errors (port or host unreachable) for queries sent to a backend", "backend"),
    Counter("client_address_failed", "dnsrouter_client_address_failed_total",
            "Queries forwarded without the client's address (one no header or option can carry)", "mode"),
    Counter("fast_path_handoffs", "dnsrouter_fast_path_handoffs_total",
            "Queries the compiled UDP path handed to the Python path, by why (the query log hands over every "
            "query to route; an allowed NOTIFY is purged there)", "reason"),
    Counter("cache_lookups", "dnsrouter_cache_lookups_total",
            "Packet cache lookups, by result: hit (answered from the cache) or miss (forwarded; a cached "
            "reply too big for the client counts here)", "result"),
    Counter("cache_evictions", "dnsrouter_cache_evictions_total",
            "Entries the packet cache dropped: room (for a new one, by CLOCK) or expired (found past their "
            "lifetime)", "reason"),
    Counter("cache_purges", "dnsrouter_cache_purges_total",
            "Purges each worker's packet cache applied, by cause: notify, ctl (dnsrouterctl purge), routes "
            "(a route table change), behind (a worker missed purges and forgot everything)", "cause"),
    Counter("cache_purged", "dnsrouter_cache_purged_entries_total", "Entries the purges removed, by cause",
            "cause"),
    Counter("rrl", "dnsrouter_rrl_total",
            "UDP responses response rate limiting held back, by action: dropped, or slipped (sent truncated, "
            "so that a real client asks again over TCP)", "action"),
    Counter("rrl_limited", "dnsrouter_rrl_limited_total",
            "UDP responses response rate limiting held back, by the kind of account over its rate: responses "
            "(a name and type), nxdomains (a zone), errors", "kind"),
    Counter("worker_messages", "dnsrouter_worker_messages_total", "Messages the supervisor received from workers",
            "type"),
)

BY_KIND: dict[str, Counter] = {c.kind: c for c in COUNTERS}

# The backend latency histogram's counts: ("latency_bucket", index of the
# bucket) and ("latency_sum", ""), exported as one histogram family.
LATENCY_BUCKET = "latency_bucket"
LATENCY_SUM = "latency_sum"
HISTOGRAM_KINDS = frozenset({LATENCY_BUCKET, LATENCY_SUM})


def key(kind: str, label: object) -> tuple[str, object]:
    """The key of a count of ``kind``, which must be declared: for keys made
    once, at import (the compiled path's fixed keys), never per packet."""
    if kind not in BY_KIND and kind not in HISTOGRAM_KINDS:
        raise KeyError(f"counter kind {kind!r} is not declared in dnsrouter.counters")
    return kind, label
