"""dnsrouterctl's failures: one line that says what failed and where, no library internals."""
from __future__ import annotations

import subprocess

import pytest

from support.net import HOST, free_port
from support.processes import program

pytestmark = pytest.mark.system


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program("dnsrouterctl")), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_etcd_on_a_closed_port_is_one_line_and_exit_1(api):
    port = free_port("tcp")  # nothing listens there
    for command in (["list"], ["which", "www.example.com"], ["register", f"{HOST}:53", r"\.test\.$"],
                    ["deregister", "some-key"]):
        out = ctl("--etcd", f"http://{HOST}:{port}", "--etcd-api", api, *command)
        assert out.returncode == 1, (command, out)
        assert out.stderr == f"dnsrouterctl: etcd at http://{HOST}:{port}: connection refused\n", command
        assert out.stdout == ""


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_every_endpoint_is_tried_and_named(api):
    ports = free_port("tcp"), free_port("tcp")
    urls = ",".join(f"http://{HOST}:{p}" for p in ports)
    out = ctl("--etcd", urls, "--etcd-api", api, "list")
    assert out.returncode == 1
    assert out.stderr == f"dnsrouterctl: etcd at {urls.replace(',', ', ')}: connection refused\n"


def test_a_router_that_does_not_answer_is_one_line_and_exit_1():
    port = free_port("tcp")
    for command in ("routes", "status"):
        out = ctl("--metrics", f"{HOST}:{port}", command)
        assert (out.returncode, out.stderr) == (1, f"dnsrouterctl: router at http://{HOST}:{port}: "
                                                   "connection refused\n"), command


def test_register_with_a_routes_directory_says_where_it_writes(tmp_path):
    out = ctl("--routes-dir", str(tmp_path), "register", f"{HOST}:53", r"\.test\.$")
    assert out.returncode == 2
    assert out.stderr.startswith("dnsrouterctl: register and deregister write to etcd") and "Traceback" not in out.stderr
