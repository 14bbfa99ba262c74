"""One declared list of counters (dnsrouter/counters.py): every kind either
packet path (or the supervisor) counts is declared, and every declared kind
is a family of /metrics."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dnsrouter import counters
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.supervisor.metrics import Metrics
from dnsrouter.workers import fastpath

ROOT = Path(__file__).resolve().parent.parent

# How a count is made in the sources: counts["kind", ...] (the Python path),
# _count(counts, ("kind", ...)) and _key("kind", ...) (the compiled path),
# metrics.add({("kind", ...): n}) (the supervisor).
COUNTING = re.compile(r'counts\[\s*"(\w+)"|_count\(\s*[\w.]+,\s*\(\s*"(\w+)"|_key\(\s*"(\w+)"|add\(\{\s*\(\s*"(\w+)"')


def counted_kinds() -> dict[str, set[str]]:
    """kind -> the files that count it, over workers/ and supervisor/."""
    found: dict[str, set[str]] = {}
    for path in sorted([*ROOT.glob("workers/*.py"), ROOT / "workers/_fastpath.pyx", *ROOT.glob("supervisor/*.py")]):
        for match in COUNTING.finditer(path.read_text()):
            kind = next(g for g in match.groups() if g)
            found.setdefault(kind, set()).add(path.name)
    return found


def test_every_kind_a_path_counts_is_declared():
    found = counted_kinds()
    # The scan sees both paths: the fixed keys and hand-offs of the compiled
    # one, the Python path's own kinds, the supervisor's.
    assert {"_fastpath.pyx", "forwarder.py", "upstream.py", "tcp.py"} <= set().union(*found.values())
    assert {"fast_path_handoffs", "ignored_replies", "late_replies", "client_address_failed",
            "worker_messages", "latency_bucket"} <= set(found)
    undeclared = {kind: files for kind, files in found.items()
                  if kind not in counters.BY_KIND and kind not in counters.HISTOGRAM_KINDS}
    assert undeclared == {}


def test_the_compiled_path_s_keys_are_declared_at_import():
    module, why = fastpath.load()
    assert module is not None, why
    assert [key[0] for key in module._HANDOFF_KEYS] == ["fast_path_handoffs"] * len(module.HANDOFF_REASONS)
    assert {key[0] for key in module._FIXED_KEYS} <= set(counters.BY_KIND)
    with pytest.raises(KeyError):
        counters.key("dropped_typo", "x")  # what the module's import would raise for a kind not declared


def test_every_declared_counter_is_a_family_of_the_metrics_page():
    metrics = Metrics(lambda: {"health": {}, "srtt": [], "invalid": 0, "version": 1, "updated": 0.0, "routes": 0,
                               "restarts": 0, "workers": {}, "fast_path": {}, "cache": [],
                               "limits_networks": 0, "rrl_accounts": 0}, LATENCY_BUCKETS)
    metrics.add({(c.kind, "x"): 1 for c in counters.COUNTERS})
    page = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(s.labels.items())) for f in text_string_to_metric_families(page) for s in f.samples}
    for c in counters.COUNTERS:
        assert (c.name, ((c.label, "x"),)) in samples, c
    assert len({c.name for c in counters.COUNTERS}) == len(counters.COUNTERS)
