"""The repository's own shape: the import rule, and the source tree as the package."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dns.rcode
import pytest

from support.fake_backend import FakeBackend
from support.net import HOST, free_port, query, wait_until
from support.processes import spawn, stop

REPO = Path(__file__).resolve().parent.parent

# Source folder -> the package it installs as (setup.cfg's package_dir).
PACKAGES = {"dnsrouter": "dnsrouter", "workers": "dnsrouter.workers", "supervisor": "dnsrouter.supervisor"}
CORE, WORKERS, SUPERVISOR = "dnsrouter", "dnsrouter.workers", "dnsrouter.supervisor"
COMPOSITION_ROOT = "dnsrouter.cli"  # the one module that wires the two sides together


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def imported(source: str, module: str, is_package: bool) -> set[str]:
    """Every module ``module``'s source imports, relative imports made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)  # "from . import workers"
    return out


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(module: str, imports: set[str]) -> list[str]:
    side = SUPERVISOR if within(module, SUPERVISOR) else WORKERS if within(module, WORKERS) else CORE
    forbidden = {CORE: (WORKERS, SUPERVISOR), WORKERS: (SUPERVISOR,), SUPERVISOR: (WORKERS,)}[side]
    if module == COMPOSITION_ROOT:
        forbidden = ()
    return [f"{module} imports {name}" for name in sorted(imports)
            if any(within(name, f) for f in forbidden)]


def sources() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (REPO / folder).rglob("*.py"))


def test_the_core_imports_neither_side_and_the_sides_not_each_other():
    found = []
    for path in sources():
        module = module_name(path)
        found += violations(module, imported(path.read_text(), module, path.name == "__init__.py"))
    assert found == []
    assert len(sources()) > 30  # the walk saw the tree, not an empty folder


def test_the_rule_sees_absolute_relative_and_from_imports():
    # The check above must be able to fail: each of these breaks the rule.
    cases = {
        ("dnsrouter.routes", "from .supervisor.registry import Record"): "dnsrouter.supervisor.registry",
        ("dnsrouter.wire", "import dnsrouter.workers.mmsg"): "dnsrouter.workers.mmsg",
        ("dnsrouter.workers.udp", "from dnsrouter.supervisor import health"): "dnsrouter.supervisor",
        ("dnsrouter.supervisor.tools.ctl", "from ... import workers"): "dnsrouter.workers",
        ("dnsrouter.supervisor.registry.etcd", "from ...workers.upstream import Pending"):
            "dnsrouter.workers.upstream",
    }
    for (module, source), name in cases.items():
        assert f"{module} imports {name}" in violations(module, imported(source, module, False)), source
    assert violations("dnsrouter.cli", imported("from .supervisor.arbiter import Supervisor",
                                                "dnsrouter.cli", False)) == []


@pytest.mark.system
def test_the_source_tree_is_the_package_from_the_checkout_root():
    # An editable install: from the root, the folder dnsrouter/ must not hide
    # dnsrouter.workers and dnsrouter.supervisor, and they are the sources.
    code = "import dnsrouter.workers, dnsrouter.supervisor.tools.ctl as c; print(dnsrouter.workers.__file__, c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(REPO / "workers" / "__init__.py"), str(REPO / "supervisor" / "tools" / "ctl.py")]


@pytest.mark.system
def test_python_m_dnsrouter_from_the_checkout_root_answers(tmp_path):
    routes = tmp_path / "routes"
    routes.mkdir()
    port = free_port()
    log = open(tmp_path / "router.log", "wb")
    with FakeBackend("ok") as fake:
        (routes / "a").write_text(rf"{fake.addr},\.test\.$")
        proc = spawn([sys.executable, "-m", "dnsrouter", "--listen", f"{HOST}:{port}", "--workers", "1",
                      "--routes-dir", str(routes)], cwd=REPO, stdout=log, stderr=log)
        try:
            def answer():
                assert proc.poll() is None, (tmp_path / "router.log").read_text()
                try:
                    return query("www.test.", "A", port=port, timeout=0.3)
                except Exception:
                    return None
            reply = wait_until(answer, 20, message="python -m dnsrouter from the root never answered")
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        finally:
            assert stop(proc) == 0
            log.close()
