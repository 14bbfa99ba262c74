"""bench/run.py's tables: one row per measurement, ratios to dnsdist and to the backend."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from common import Perf

@dataclass
class Row:
    kind: str          # 'throughput' or 'fixed-rate'
    scenario: str      # 'backend', 'dnsrouter', 'dnsdist'
    transport: str
    routes: int | None
    workers: int | None
    perf: Perf
    rss_mb: list[float] = field(default_factory=list)
    notes: str = ""
    client_address: str = "none"  # dnsrouter --client-address (none for backend, dnsdist)


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def ratio(a: float, b: float) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}"


def spread(p: Perf, of: str) -> str:
    """The range over the repeated runs of the figure the row is judged by."""
    if len(p.spread) < 2 or of != "qps":
        return ""
    return f" ({min(p.spread):.0f}-{max(p.spread):.0f})"


def rcode_str(p: Perf) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(p.rcodes.items(), key=lambda kv: -kv[1])) or "-"


def line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables(rows: list[Row], header: str) -> str:
    """The throughput and fixed-rate tables (client address none: as without
    --client-address), then the client-address table when other modes ran."""
    text = _main_tables([r for r in rows if r.client_address == "none"], header)
    if any(r.client_address != "none" for r in rows):
        text += "\n" + client_address_table([r for r in rows if r.scenario == "dnsrouter"])
    return text


def client_address_table(rows: list[Row]) -> str:
    """dnsrouter rows of every mode, each with its ratios to the none row of
    the same kind, transport, routes and workers (mode / none)."""
    none = {(r.kind, r.transport, r.routes, r.workers): r for r in rows if r.client_address == "none"}
    cols = ["client address", "kind", "transport", "routes", "workers", "qps", "avg latency ms", "p99 ms",
            "qps / none", "avg latency / none", "p99 / none", "lost", "rcodes"]
    out = ["### Client address and packet path (dnsrouter --client-address, python: --fast-path off; "
           "each mode its own router, runs interleaved; "
           "qps / none: higher is better, latency / none: lower is better)", "",
           line(cols), line(["---"] * len(cols))]
    for r in sorted(rows, key=lambda r: (r.kind != "throughput", r.transport, r.routes, r.workers)):
        n = none.get((r.kind, r.transport, r.routes, r.workers))
        out.append(line([
            r.client_address, r.kind, r.transport, str(r.routes), str(r.workers),
            f"{r.perf.qps:.0f}" + spread(r.perf, "qps" if r.kind == "throughput" else "avg_ms"),
            fmt(r.perf.avg_ms), fmt(r.perf.p99_ms),
            "-" if n is None or r.kind != "throughput" else ratio(r.perf.qps, n.perf.qps),
            "-" if n is None else ratio(r.perf.avg_ms, n.perf.avg_ms),
            "-" if n is None else ratio(r.perf.p99_ms, n.perf.p99_ms),
            str(r.perf.lost), rcode_str(r.perf),
        ]))
    return "\n".join(out) + "\n"


def _main_tables(rows: list[Row], header: str) -> str:
    thr = [r for r in rows if r.kind == "throughput"]
    fix = [r for r in rows if r.kind == "fixed-rate"]
    backend = {r.transport: r for r in thr if r.scenario == "backend"}
    dnsdist = {(r.transport, r.routes): r for r in thr if r.scenario == "dnsdist"}
    cols = ["scenario", "transport", "routes", "workers", "qps", "avg latency ms", "p99 ms",
            "worker RSS MB", "ratio to dnsdist", "ratio to backend", "lost", "rcodes"]

    def cells(r: Row, d: Row | None, b: Row | None, of: str) -> list[str]:
        """A row's columns; the ratios are of r.perf.<of> (qps or avg_ms)."""
        v = getattr(r.perf, of)
        return [
            r.scenario, r.transport, "-" if r.routes is None else str(r.routes),
            "-" if r.workers is None else str(r.workers),
            f"{r.perf.qps:.0f}" + spread(r.perf, of), fmt(r.perf.avg_ms), fmt(r.perf.p99_ms),
            " / ".join(f"{x:.1f}" for x in r.rss_mb) or "-",
            "-" if r.scenario != "dnsrouter" or d is None else ratio(v, getattr(d.perf, of)),
            "-" if r.scenario == "backend" or b is None else ratio(v, getattr(b.perf, of)),
            str(r.perf.lost), rcode_str(r.perf),
        ]

    out = [header, "", "### Throughput (dnsperf saturating; ratios are of qps, higher is better)", "",
           line(cols), line(["---"] * len(cols))]
    for r in thr:
        out.append(line(cells(r, dnsdist.get((r.transport, r.routes)), backend.get(r.transport), "qps")))
    if fix:
        fb = {r.transport: r for r in fix if r.scenario == "backend"}
        fd = {r.transport: r for r in fix if r.scenario == "dnsdist"}
        out += ["", "### Fixed rate (dnsperf -Q; ratios are of average latency, lower is better;"
                " added = avg latency minus the backend's)", "",
                line(cols + ["added avg ms"]), line(["---"] * (len(cols) + 1))]
        for r in fix:
            b = fb.get(r.transport)
            added = "-" if r.scenario == "backend" or b is None else fmt(r.perf.avg_ms - b.perf.avg_ms)
            out.append(line(cells(r, fd.get(r.transport), b, "avg_ms") + [added]))
    return "\n".join(out) + "\n"
