"""SIGHUP's live settings: every setting marked ``live`` is applied, by the
workers (workers/live.py) or by the supervisor itself (SUPERVISOR_LIVE), and
each reports the value it then uses."""
from __future__ import annotations

import re
import signal
import time
from typing import Any

import dns.rcode
import pytest

from dnsrouter import config as configuration
from dnsrouter.settings import SETTINGS, Setting
from dnsrouter.supervisor.arbiter import SUPERVISOR_LIVE
from dnsrouter.workers import live
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from dnsrouter.address import Address
from support.fake_backend import FakeBackend
from support.metrics import http_get
from support.net import HOST, ask, free_port, wait_until

LIVE = [s for s in SETTINGS if s.live]


def test_the_live_settings_are_exactly_those_the_workers_and_the_supervisor_apply():
    applied = set(live.APPLIERS) | set(SUPERVISOR_LIVE)
    assert applied == {s.name for s in LIVE}


def test_a_new_retry_min_or_timeout_applies_to_backends_known_already():
    # A backend that never answers again keeps the retry time computed when it
    # last did: the new setting must reach it too, not only later answers.
    forwarder = Forwarder(configuration.defaults(forward_timeout=1.0, forward_retry_min=0.02), Stats())
    backend, counts = Address("127.0.0.1", 5300), Stats().for_thread()
    forwarder.answered(backend, 0.0, 0.001, counts)
    assert forwarder.rto(backend) == 0.02
    effective = live.apply(configuration.defaults(forward_timeout=1.0, forward_retry_min=0.3), forwarder)
    assert effective["forward_retry_min"] == 0.3 and forwarder.rto(backend) == 0.3
    live.apply(configuration.defaults(forward_timeout=0.4, forward_retry_min=0.3), forwarder)
    assert forwarder.rto(backend) == 0.2  # at most half the timeout


def _new_value(setting: Setting, current: Any) -> tuple[str, Any]:
    """A value for ``setting`` other than ``current``, as written in the file and parsed."""
    for raw in ("debug", "no" if current is True else "yes", "0.7", "7", f"{HOST}:{free_port('tcp')}"):
        try:
            value = setting.parse(raw)
        except ValueError:
            continue
        if value != current:
            return raw, value
    raise AssertionError(f"no new value for {setting.name}")


def _ini(values: dict[Setting, str]) -> str:
    sections: dict[str, list[str]] = {}
    for setting, raw in values.items():
        sections.setdefault(setting.section, []).append(f"{setting.key} = {raw}")
    return "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())


def _says(log: str, who: str, setting: Setting, value: Any) -> bool:
    """Whether ``who`` ("worker 0", "supervisor") logged that it uses ``value``."""
    item = re.escape(f"{setting.label} = {value}")
    return re.search(rf"\] INFO {who} uses (.*, )?{item}(,|$)", log, re.MULTILINE) is not None


@pytest.mark.system
def test_every_live_setting_changed_in_the_file_is_used_after_sighup(router, tmp_path, packet_path):
    """Walk the live settings of the table, one SIGHUP each, in a running
    router with two workers, on either packet path: each worker (or the
    supervisor, for its own) reports the new value as the one it uses, and
    where it is cheap to see, the router behaves so."""
    by_name = {s.name: s for s in SETTINGS}
    # Start values that make each change visible: a timeout long enough to
    # tell from the new one, checks rare enough that more of them show.
    values = {by_name["forward_timeout"]: "3", by_name["health_interval"]: "30", by_name["log_level"]: "info"}
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(_ini(values))
    workers = 2
    with FakeBackend("udp_drop") as silent:  # passes its checks (TCP), never answers a query (UDP)
        r = router(workers=workers, args=["--config", str(conf)], log_level=None)
        r.route("a", rf"{silent.addr},\.test\.$")
        wait_until(lambda: f"backend {silent.addr}: new -> up" in r.log(), 5, message=r.log())
        current = configuration.load(configuration.build_parser().parse_args(["--config", str(conf)]))
        for setting in LIVE:
            raw, value = _new_value(setting, getattr(current, setting.name))
            values[setting] = raw
            conf.write_text(_ini(values))
            start, checks = len(r.log()), silent.count("tcp")
            r.signal(signal.SIGHUP)
            who = [f"worker {k}" for k in range(workers) if setting.name in live.APPLIERS]
            who += ["supervisor"] if setting.name in SUPERVISOR_LIVE else []
            assert who, f"nothing applies {setting.name}"
            wait_until(lambda: all(_says(r.log()[start:], w, setting, value) for w in who), 5,
                       message=f"{setting.name} = {value} not used by {who}:\n{r.log()[start:]}")
            after = r.log()[start:]
            assert "did not apply" not in after and "needs a restart" not in after, after
            # What the router does with the new value, where a test sees it cheaply.
            if setting.name == "forward_timeout":  # SERVFAIL once the new timeout (0.7 s) passes, not 3 s
                began = time.monotonic()
                reply = ask(r, "timeout.test.", timeout=5)
                assert reply is not None and reply.rcode() == dns.rcode.SERVFAIL
                assert 0.6 < time.monotonic() - began < 2.0
            elif setting.name == "health_interval":  # checks every 0.7 s rather than every 30
                wait_until(lambda: silent.count("tcp") >= checks + 3, 5, message="new interval not used")
            elif setting.name == "metrics_listen":
                wait_until(lambda: http_get(f"http://{value}/metrics")[0] == 200, 5, message="no metrics")
            elif setting.name == "log_level":  # the workers' own debug lines now appear
                wait_until(lambda: all(f"worker {k}: settings applied" in r.log()[start:] for k in range(workers)),
                           5, message=r.log()[start:])
            elif setting.name == "log_queries":  # each query logged by the worker that took it
                wait_until(lambda: ask(r, "logged.test.", timeout=0.1) is None
                           and f"udp {HOST} logged.test. 1 ->" in r.log()[start:], 5, message=r.log()[start:])
            current = configuration.load(configuration.build_parser().parse_args(["--config", str(conf)]))
            assert getattr(current, setting.name) == value
        assert r.proc.poll() is None


@pytest.mark.system
def test_a_live_setting_that_cannot_be_applied_is_logged_as_not_applied(router, tmp_path):
    """The supervisor reads back what it serves: a metrics address it cannot
    bind is an error in the log, not "applied"; the next SIGHUP tries again."""
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text("")
    r = router(args=["--config", str(conf)])
    metrics_listen = next(s for s in LIVE if s.name == "metrics_listen")
    for address, applied in (("192.0.2.1:9153", False), (f"{HOST}:{free_port('tcp')}", True)):
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: no bind.
        conf.write_text(f"[metrics]\nlisten = {address}\n")
        start = len(r.log())
        r.signal(signal.SIGHUP)
        failed = f"supervisor did not apply [metrics] listen = {address}: uses None"
        wait_until(lambda: _says(r.log()[start:], "supervisor", metrics_listen, address) if applied
                   else failed in r.log()[start:], 5, message=f"{address}, applied {applied}: not in the log")
    assert http_get(f"http://{address}/metrics")[0] == 200
