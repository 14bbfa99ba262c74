"""The test harness keeps its promises: the system marker, the packet paths, the router's clean-up."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.fake_backend import FakeBackend
from support.router import Router, packet_paths

TESTS = Path(__file__).parent


# -- the system marker (support/quick_loop.py); this test is not marked, so
# whatever it starts must be refused before it runs.

@pytest.mark.parametrize("start", [
    lambda: subprocess.run(["true"], check=True),
    lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
    lambda: FakeBackend("ok").start(),
], ids=["subprocess", "multiprocessing", "fake backend"])
def test_an_unmarked_test_cannot_start_a_process_or_a_server(start):
    with pytest.raises(pytest.fail.Exception, match="is not marked system: mark the test @pytest.mark.system"):
        start()


# -- DNSROUTER_PACKET_PATHS

@pytest.mark.parametrize("names, paths", [
    ("compiled,python", {"compiled": "auto", "python": "off"}),
    ("python", {"python": "off"}),
    (" compiled ", {"compiled": "auto"}),
])
def test_packet_paths_named(names, paths):
    assert packet_paths(names) == paths


@pytest.mark.parametrize("names", ["compiled,pyhton", "compiled python", "", "compiled,", "auto"])
def test_an_unknown_or_empty_packet_path_is_an_error(names):
    with pytest.raises(ValueError, match="unknown packet path"):
        packet_paths(names)


@pytest.mark.system
def test_a_misspelt_packet_path_stops_the_run_before_any_test():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                          str(TESTS / "test_ipv6.py")],
                         env={**os.environ, "DNSROUTER_PACKET_PATHS": "compiled,pyhton"},
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "DNSROUTER_PACKET_PATHS: unknown packet path(s) ['pyhton']" in run.stderr


# -- the router: the packet path asked for, and its temporary directory

@pytest.mark.system
def test_a_router_whose_workers_run_another_packet_path_does_not_start():
    # The flags after fast_path's own win: workers run compiled, not off.
    r = Router(workers=2, fast_path="off", args=["--fast-path", "auto"])
    with pytest.raises(AssertionError, match=r"asked for --fast-path off .* but workers say \{0: 'on', 1: 'on'\}"):
        r.start()
    assert r.proc.poll() is not None  # stopped, not left running
    assert not r.dir.exists()
    assert "worker 0: fast path on" in r.log()  # kept for the failure message


@pytest.mark.system
@pytest.mark.parametrize("fast_path, says", [("auto", "on"), ("off", "off: [server] fast_path = off")])
def test_a_router_checks_and_reports_the_packet_path_of_each_worker(fast_path, says):
    with Router(workers=2, fast_path=fast_path) as r:
        assert r.fast_paths() == {0: says, 1: says}
        directory = r.dir
        assert directory.is_dir()
    assert not directory.exists()
    assert f"worker 1: fast path {says}" in r.log()
