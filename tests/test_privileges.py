"""--user USER when USER cannot run the interpreter: exit 2 with the reason, before binding."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support.net import HOST, free_port

pytestmark = pytest.mark.system


@pytest.fixture
def workdir():
    """A directory everyone may enter (pytest's own tmp_path is root's alone)."""
    if os.geteuid() != 0:
        pytest.fail("this test runs as root, as CI does")
    path = Path(tempfile.mkdtemp(prefix="dnsrouter-user-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def locked_python(workdir):
    """This virtual environment's interpreter, reached through a directory
    only root may enter: a venv made of links to ours, under a 0700 folder."""
    tmp_path = workdir
    venv = Path(sys.prefix)
    locked = tmp_path / "locked"
    (locked / "venv" / "bin").mkdir(parents=True)
    shutil.copy(venv / "pyvenv.cfg", locked / "venv" / "pyvenv.cfg")
    (locked / "venv" / "lib").symlink_to(venv / "lib")
    (locked / "venv" / "bin" / "python").symlink_to(Path(sys.executable))
    os.chmod(locked, 0o700)
    return locked, locked / "venv" / "bin" / "python"


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "dnsrouter", "--user", "nobody", "--listen", f"{HOST}:{free_port()}",
                           "--workers", "1", "--routes-dir", str(cwd), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_an_interpreter_the_user_cannot_read_stops_the_start(locked_python, workdir):
    locked, python = locked_python
    out = run(python, cwd=workdir)
    assert out.returncode == 2, out
    assert f"user nobody cannot run {python} with dnsrouter: {locked} is not readable by nobody" in out.stderr
    assert "Traceback" not in out.stderr
    assert "listening" not in out.stderr  # said before a socket was bound


def test_check_config_reports_the_same(locked_python, workdir):
    locked, python = locked_python
    out = run(python, "--check-config", cwd=workdir)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"dnsrouter: [server] user nobody cannot run {python} with dnsrouter: " \
                         f"{locked} is not readable by nobody\n"


def test_a_readable_interpreter_passes_the_check(workdir):
    out = run(Path(sys.executable), "--check-config", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "user = nobody" in out.stdout


def test_a_routes_directory_the_user_cannot_read_stops_the_start(workdir):
    routes = workdir / "routes"
    routes.mkdir(mode=0o700)
    out = run(Path(sys.executable), cwd=routes)
    assert out.returncode == 2, out
    assert f"[server] user nobody cannot read {routes}\n" in out.stderr and "Traceback" not in out.stderr
