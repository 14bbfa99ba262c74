"""The router and dnsrouterctl pointed at etcd, for the end-to-end etcd tests.

Shared by the v2 tests (test_etcd_routing.py) and the v3 ones
(test_etcd3_routing.py): ``api`` is the ``--etcd-api`` flag, None for the
router's default (v3).
"""
from __future__ import annotations

import subprocess
import sys
from typing import Any, Callable, Optional, Sequence, Union

from support.net import HOST, free_port

PREFIX = "/dnsrouter/"

# dnsrouterctl of this interpreter (cwd "/": the checkout must not shadow the package)
CTL = [sys.executable, "-m", "dnsrouter.supervisor.tools.ctl"]


def _api_args(api: Optional[str]) -> list[str]:
    return [] if api is None else ["--etcd-api", api]


def etcd_router(router: Callable[..., Any], urls: Sequence[str], *extra: str,
                api: Optional[str] = None, start: bool = True, workers: int = 1) -> Any:
    """A router (from the ``router`` fixture) on the etcd ``urls``, with
    --metrics on a free port: ``.metrics`` is its base URL, ``.mport`` its port."""
    mport = free_port("tcp")
    r = router(workers=workers, start=start,
               args=["--etcd", ",".join(urls), *_api_args(api), "--metrics", f"{HOST}:{mport}", *extra])
    r.metrics = f"http://{HOST}:{mport}"
    r.mport = mport
    return r


def etcd_urls(etcd: Union[str, Sequence[str], Any]) -> str:
    """The --etcd value for a server (anything with .url), a URL or a list of URLs."""
    if isinstance(etcd, str):
        return etcd
    if hasattr(etcd, "url"):
        return etcd.url
    return ",".join(etcd)


def ctl_command(etcd: Union[str, Sequence[str], Any], *args: str, api: Optional[str] = None) -> list[str]:
    """The dnsrouterctl command line on that etcd."""
    return [*CTL, "--etcd", etcd_urls(etcd), *_api_args(api), *args]


def ctl(etcd: Union[str, Sequence[str], Any], *args: str, api: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run dnsrouterctl on that etcd to its end (30 s at most); output captured as text."""
    return subprocess.run(ctl_command(etcd, *args, api=api), capture_output=True, text=True, timeout=30, cwd="/")
