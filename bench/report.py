"""bench/run.py's tables: one row per measurement, ratios to dnsdist and to the backend."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from common import Perf

@dataclass
class Row:
    kind: str          # 'throughput', 'flood' (saturating, every name new: NXDOMAIN) or 'fixed-rate'
    scenario: str      # 'backend', 'dnsrouter', 'dnsdist'
    transport: str
    routes: int | None
    workers: int | None
    perf: Perf
    rss_mb: list[float] = field(default_factory=list)
    notes: str = ""
    client_address: str = "none"  # dnsrouter --client-address (none for backend, dnsdist)


# The kinds measured at saturation (judged by qps), in table order, and what
# their rows are called where kinds share a table.
SATURATING = {"throughput": "repeated names", "flood": "flood"}
KIND_ORDER = [*SATURATING, "fixed-rate"]


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


def cpu_str(p: Perf) -> str:
    """CPU us/q, with how many processes exited in the run (a crashed worker's time is missing)."""
    return fmt(p.cpu_us, 1) + (f" ({p.cpu_exited} exited)" if p.cpu_exited else "")


def rcode_str(p: Perf) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(p.rcodes.items(), key=lambda kv: -kv[1])) or "-"


def line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables(rows: list[Row], header: str) -> str:
    """The throughput, flood and fixed-rate tables (client address none: as
    without --client-address), the targets when dnsdist ran, then the
    client-address table when other modes ran."""
    none = [r for r in rows if r.client_address == "none"]
    text = _main_tables(none, header)
    if any(r.scenario == "dnsdist" for r in none):
        text += "\n" + targets_table(none)
    if any(r.client_address != "none" for r in rows):
        text += "\n" + client_address_table([r for r in rows if r.scenario == "dnsrouter"])
    if any(r.client_address == "cache" for r in rows):
        text += "\n" + cache_table(rows)
    return text


def cache_table(rows: list[Row]) -> str:
    """dnsrouter with its packet cache (mode cache) against itself without
    (none) and against dnsdist with its packet cache, measured in the same
    rounds: qps for the saturating kinds, average and p99 latency at the
    fixed rate."""
    def key(r: Row) -> tuple:
        return r.kind, r.transport, r.routes
    cached = [r for r in rows if r.scenario == "dnsrouter" and r.client_address == "cache"]
    off = {key(r) + (r.workers,): r for r in rows if r.scenario == "dnsrouter" and r.client_address == "none"}
    dnsdist = {key(r): r for r in rows if r.scenario == "dnsdist" and r.client_address == "cache"}
    cols = ["kind", "transport", "routes", "workers", "qps", "avg latency ms", "p99 ms", "CPU us/q",
            "x cache off", "x dnsdist cache", "dnsdist cache qps", "dnsdist cache avg ms", "dnsdist cache p99 ms",
            "dnsdist cache CPU us/q", "lost", "rcodes"]
    out = ["### Packet cache (dnsrouter --cache-size, dnsdist newPacketCache with dontAge; same rounds; "
           "x: ratio of qps for the saturating kinds, of average latency at the fixed rate)", "",
           line(cols), line(["---"] * len(cols))]
    for r in sorted(cached, key=lambda r: (KIND_ORDER.index(r.kind), r.transport, r.routes, r.workers)):
        of = "qps" if r.kind in SATURATING else "avg_ms"
        n, d = off.get(key(r) + (r.workers,)), dnsdist.get(key(r))
        out.append(line([
            r.kind, r.transport, str(r.routes), str(r.workers),
            f"{r.perf.qps:.0f}" + spread(r.perf, of), fmt(r.perf.avg_ms), fmt(r.perf.p99_ms), cpu_str(r.perf),
            "-" if n is None else ratio(getattr(r.perf, of), getattr(n.perf, of)),
            "-" if d is None else ratio(getattr(r.perf, of), getattr(d.perf, of)),
            "-" if d is None else f"{d.perf.qps:.0f}" + spread(d.perf, of),
            "-" if d is None else fmt(d.perf.avg_ms), "-" if d is None else fmt(d.perf.p99_ms),
            "-" if d is None else cpu_str(d.perf),
            str(r.perf.lost), rcode_str(r.perf),
        ]))
    return "\n".join(out) + "\n"


def targets_table(rows: list[Row]) -> str:
    """The figures the targets are stated in, per saturating kind, transport
    and worker count: dnsrouter's qps / dnsdist's at each route count (the
    tables' 'ratio to dnsdist', side by side), and dnsrouter's qps at the most
    routes / its qps at 1 route, which no table gives."""
    routers = [r for r in rows if r.scenario == "dnsrouter" and r.kind in SATURATING]
    dnsdist = {(r.kind, r.transport, r.routes): r for r in rows if r.scenario == "dnsdist"}
    counts = sorted({r.routes for r in routers if r.routes is not None})
    top = counts[-1] if len(counts) > 1 and counts[0] == 1 else None
    cols = ["scenario", "transport", "workers", *(f"x dnsdist, {n} route{'s' * (n > 1)}" for n in counts)]
    cols += [f"{top} routes / 1 route"] if top else []
    out = ["### Targets (dnsrouter, client address none; ratios of qps, higher is better)", "",
           line(cols), line(["---"] * len(cols))]
    keys = sorted({(r.kind, r.transport, r.workers) for r in routers}, key=lambda k: (KIND_ORDER.index(k[0]), k[1:]))
    for kind, transport, workers in keys:
        by_routes = {r.routes: r for r in routers if (r.kind, r.transport, r.workers) == (kind, transport, workers)}
        cells = [SATURATING[kind], transport, str(workers)]
        for n in counts:
            r, d = by_routes.get(n), dnsdist.get((kind, transport, n))
            cells.append("-" if r is None or d is None else ratio(r.perf.qps, d.perf.qps))
        if top:
            r, one = by_routes.get(top), by_routes.get(1)
            cells.append("-" if r is None or one is None else ratio(r.perf.qps, one.perf.qps))
        out.append(line(cells))
    return "\n".join(out) + "\n"


def client_address_table(rows: list[Row]) -> str:
    """dnsrouter rows of every mode, each with its ratios to the none row of
    the same kind, transport, routes and workers (mode / none)."""
    none = {(r.kind, r.transport, r.routes, r.workers): r for r in rows if r.client_address == "none"}
    cols = ["client address", "kind", "transport", "routes", "workers", "qps", "avg latency ms", "p99 ms",
            "CPU us/q", "qps / none", "avg latency / none", "p99 / none", "CPU / none", "lost", "rcodes"]
    out = ["### Client address and packet path (dnsrouter --client-address, python: --fast-path off; "
           "each mode its own router, runs interleaved; "
           "qps / none: higher is better, latency and CPU / none: lower is better)", "",
           line(cols), line(["---"] * len(cols))]
    for r in sorted(rows, key=lambda r: (KIND_ORDER.index(r.kind), r.transport, r.routes, r.workers)):
        n = none.get((r.kind, r.transport, r.routes, r.workers))
        out.append(line([
            r.client_address, r.kind, r.transport, str(r.routes), str(r.workers),
            f"{r.perf.qps:.0f}" + spread(r.perf, "qps" if r.kind in SATURATING else "avg_ms"),
            fmt(r.perf.avg_ms), fmt(r.perf.p99_ms), cpu_str(r.perf),
            "-" if n is None or r.kind not in SATURATING else ratio(r.perf.qps, n.perf.qps),
            "-" if n is None else ratio(r.perf.avg_ms, n.perf.avg_ms),
            "-" if n is None else ratio(r.perf.p99_ms, n.perf.p99_ms),
            "-" if n is None else ratio(r.perf.cpu_us, n.perf.cpu_us),
            str(r.perf.lost), rcode_str(r.perf),
        ]))
    return "\n".join(out) + "\n"


COLUMNS = ["scenario", "transport", "routes", "workers", "qps", "avg latency ms", "p99 ms", "CPU us/q",
           "worker RSS MB", "ratio to dnsdist", "ratio to backend", "CPU / dnsdist", "lost", "rcodes"]
TITLES = {
    "throughput": "Throughput (dnsperf saturating, names h0001.. over and over; ratios are of qps, higher is better",
    "flood": "Random-subdomain flood (dnsperf saturating, every name new in the run, NXDOMAIN from the backend; "
             "ratios are of qps, higher is better",
    "fixed-rate": "Fixed rate (dnsperf -Q; ratios are of average latency, lower is better;"
                  " added = avg latency minus the backend's",
}
# Said once per table, after its own ratios: the CPU columns mean the same in every table.
CPU_NOTE = "; CPU us/q: the server's CPU per query answered (router: supervisor and workers), lower is better)"


def _cells(r: Row, d: Row | None, b: Row | None, of: str) -> list[str]:
    """A row's COLUMNS, with d the dnsdist row and b the backend row it is
    compared with; the ratios are of r.perf.<of> (qps or avg_ms)."""
    v = getattr(r.perf, of)
    return [
        r.scenario, r.transport, "-" if r.routes is None else str(r.routes),
        "-" if r.workers is None else str(r.workers),
        f"{r.perf.qps:.0f}" + spread(r.perf, of), fmt(r.perf.avg_ms), fmt(r.perf.p99_ms), cpu_str(r.perf),
        " / ".join(f"{x:.1f}" for x in r.rss_mb) or "-",
        "-" if r.scenario != "dnsrouter" or d is None else ratio(v, getattr(d.perf, of)),
        "-" if r.scenario == "backend" or b is None else ratio(v, getattr(b.perf, of)),
        "-" if r.scenario != "dnsrouter" or d is None else ratio(r.perf.cpu_us, d.perf.cpu_us),
        str(r.perf.lost), rcode_str(r.perf),
    ]


def _kind_table(rows: list[Row], kind: str) -> list[str]:
    """The lines of one kind's table: each row against the backend and the
    dnsdist (same routes) of its kind and transport."""
    of_kind = [r for r in rows if r.kind == kind]
    backend = {r.transport: r for r in of_kind if r.scenario == "backend"}
    dnsdist = {(r.transport, r.routes): r for r in of_kind if r.scenario == "dnsdist"}
    fixed = kind == "fixed-rate"
    cols = COLUMNS + ["added avg ms"] if fixed else COLUMNS
    out = ["", f"### {TITLES[kind]}{CPU_NOTE}", "", line(cols), line(["---"] * len(cols))]
    for r in of_kind:
        b = backend.get(r.transport)
        cells = _cells(r, dnsdist.get((r.transport, r.routes)), b, "avg_ms" if fixed else "qps")
        if fixed:
            cells.append("-" if r.scenario == "backend" or b is None else fmt(r.perf.avg_ms - b.perf.avg_ms))
        out.append(line(cells))
    return out


def _main_tables(rows: list[Row], header: str) -> str:
    """The throughput table (even when empty: an interrupted run shows so), then flood and fixed rate if they ran."""
    out = [header]
    for kind in KIND_ORDER:
        if kind == "throughput" or any(r.kind == kind for r in rows):
            out += _kind_table(rows, kind)
    return "\n".join(out) + "\n"
