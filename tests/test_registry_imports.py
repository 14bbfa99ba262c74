"""A routes directory loads no etcd client: ``open_registry`` imports only the
registry the configuration names (python-etcd and urllib3 for v2, gRPC for v3).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.net import HOST, free_port

pytestmark = pytest.mark.system  # every test runs a tool or the router in a process of its own

ETCD_CLIENTS = ("etcd", "pyetcd", "grpc", "urllib3")

# dnsrouterctl's main in this interpreter, then the etcd client modules it loaded.
CTL_THEN_MODULES = """
import json, sys
from dnsrouter.supervisor.tools.ctl import main
main(sys.argv[2:])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))))
"""


def ctl_modules(*args: str) -> list[str]:
    """The etcd client packages ``dnsrouterctl ARGS`` imported."""
    out = subprocess.run([sys.executable, "-c", CTL_THEN_MODULES, ",".join(ETCD_CLIENTS), *args],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def imported(importtime_log: str) -> set[str]:
    """The top-level packages named in ``python -X importtime`` output."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:") and "|" in line}


def test_ctl_list_with_a_routes_directory_loads_no_etcd_client(tmp_path):
    (tmp_path / "a").write_text(rf"{HOST}:53,\.test\.$")
    assert ctl_modules("--routes-dir", str(tmp_path), "list") == []
    assert ctl_modules("--routes-dir", str(tmp_path), "which", "www.test.") == []


@pytest.mark.parametrize("api, loaded", [("v2", ["etcd", "urllib3"]), ("v3", ["grpc", "pyetcd"])])
def test_ctl_list_with_etcd_loads_that_api_client_only(api, loaded):
    # The check above can fail: the same command on etcd loads the client of the API asked for.
    nobody = f"http://{HOST}:{free_port('tcp')}"
    assert ctl_modules("--etcd", nobody, "--etcd-api", api, "list") == loaded


def test_router_with_a_routes_directory_loads_no_etcd_client(router):
    # cli.main opens the registry before the supervisor starts any worker,
    # so a router that answers has imported all its registry needs.
    r = router(executable=[sys.executable, "-X", "importtime", "-m", "dnsrouter"])
    assert r.stop() == 0
    modules = imported(r.log())
    assert {"dnsrouter", "dns"} <= modules  # the log holds the import trace
    assert modules & set(ETCD_CLIENTS) == set()
