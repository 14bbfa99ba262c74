"""Operating the router: reload, drain, supervision of workers, privileges, init script."""
from __future__ import annotations

import collections
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.opcode
import dns.query
import dns.rcode
import psutil
import pytest

from support.fake_backend import FakeBackend
from support.load import Load
from support.net import HOST, ask, free_port, free_privileged_port, routed, wait_until
from support.processes import gone, program
from support.router import Router

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent


def ok(r, name="x.test.") -> bool:
    return routed(r, name, timeout=1)


def test_sighup_applies_a_new_health_interval_without_failed_queries(router, tmp_path):
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text("[health]\ninterval = 30\n")
    with FakeBackend("ok") as fake:
        r = router(workers=2, args=["--config", str(conf)])
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: ok(r), 3, message="not routed")
        pids = r.worker_pids()
        assert fake.count("tcp") == 1  # one check; the next one is 30 s away
        with Load(r.port, ["x.test.", "y.test."], rate=200) as load:
            wait_until(lambda: load.sent > 50, 5)
            conf.write_text("[health]\ninterval = 0.1\n[server]\ntcp_connections = 10\n")
            r.signal(signal.SIGHUP)
            wait_until(lambda: fake.count("tcp") >= 10, 3, message="new interval not applied")
            sent = load.sent
            wait_until(lambda: load.sent > sent + 50, 5)
        assert not load.failures, load.failures
        assert r.worker_pids() == pids and r.proc.poll() is None  # no restart
        log = r.log()
        assert "applied [health] interval" in log and "needs a restart: [server] tcp_connections" in log


def test_sigterm_under_load_answers_every_query_sent_before_it(router, tmp_path):
    # A forward timeout well above the backend's delay: on a loaded machine the
    # fake backend (a thread of this test) may answer late, and the test is
    # about the drain, not about timeouts.
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text("[forward]\ntimeout = 3\n")
    with FakeBackend("delay", delay=0.3) as fake:
        r = router(workers=2, args=["--config", str(conf)])
        r.route("a", rf"{fake.addr},\.test\.$")
        # Every probe comes from a new port, so ten in a row reach both workers:
        # both have the route and the backend's first passing check.
        wait_until(lambda: all(ok(r) for _ in range(10)), 5, message="not routed by both workers")
        procs = [psutil.Process(r.proc.pid)] + r.workers_procs()
        count = 300
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            for i in range(count):
                query = dns.message.make_query(f"q{i}.test.", "A")
                query.id = i  # distinct: random IDs of 300 queries collide about half the time
                s.sendto(query.to_wire(), (HOST, r.port))
            r.signal(signal.SIGTERM)
            s.settimeout(5)
            rcodes = {}
            while len(rcodes) < count:
                try:
                    reply = dns.message.from_wire(s.recv(65535))
                except socket.timeout:
                    break
                rcodes[reply.id] = dns.rcode.to_text(reply.rcode())
        assert len(rcodes) == count, f"{count - len(rcodes)} of {count} queries unanswered"
        assert set(rcodes.values()) == {"NOERROR"}, collections.Counter(rcodes.values())
        assert r.proc.wait(10) == 0
        wait_until(lambda: gone(procs), 3, message="processes left after SIGTERM")


def test_a_stopped_worker_is_killed_and_replaced(router, tmp_path):
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text("[server]\nheartbeat_timeout = 1.5\n")
    with FakeBackend("ok") as fake:
        r = router(workers=2, args=["--config", str(conf)])
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: ok(r), 3, message="not routed")
        before = r.worker_pids()
        os.kill(before[0], signal.SIGSTOP)
        wait_until(lambda: before[0] not in r.worker_pids() and len(r.worker_pids()) == 2, 6,
                   message="stopped worker not replaced")
        assert "silent for" in r.log()
        assert all(ok(r, f"q{i}.test.") for i in range(30))


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path):
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text("[server]\ncpu_affinity = 4093\n")  # a CPU this machine does not have
    r = Router(args=["--config", str(conf)])
    try:
        r.start(wait=False)
        assert r.proc.wait(20) == 1
        assert "worker 0 failed to start" in r.log()
        assert "respawn" not in r.log()
    finally:
        r.stop()


def test_root_on_a_privileged_port_without_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test runs as root, as CI does")
    r = Router(port=free_privileged_port())
    try:
        r.start(wait=False)
        assert r.proc.wait(20) == 2
        assert "refusing to serve" in r.log() and "--allow-root" in r.log()
    finally:
        r.stop()


def test_user_nobody_on_a_privileged_port(router):
    if os.geteuid() != 0:
        pytest.fail("this test runs as root, as CI does")
    nobody = pwd.getpwnam("nobody").pw_uid
    with FakeBackend("ok") as fake:
        r = router(workers=2, port=free_privileged_port(), start=False)
        # The packet cache's purge log (shared memory and its lock) is the
        # supervisor's, made as root: workers running as nobody use it too.
        (r.dir / "dnsrouter.ini").write_text("[cache]\nsize = 100\nnotify_allow = 127.0.0.1\n")
        r.args += ["--user", "nobody", "--config", str(r.dir / "dnsrouter.ini")]
        os.chmod(r.dir, 0o755)
        os.chmod(r.routes_dir, 0o755)
        r.route("a", rf"{fake.addr},\.test\.$")
        r.start()
        wait_until(lambda: ok(r), 5, message="not serving as nobody")
        assert r.port < 1024
        assert psutil.Process(r.proc.pid).uids().effective == nobody
        assert [p.uids().real for p in r.workers_procs()] == [nobody, nobody]
        notify = dns.message.make_query("example.test.", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        for _ in range(8):  # from new source ports: both workers take one
            assert dns.query.udp(notify, HOST, port=r.port, timeout=2).rcode() == dns.rcode.NOERROR
        wait_until(lambda: ok(r), 5, message="not serving after the NOTIFYs")
        assert "Traceback" not in r.log()


def test_init_script_starts_reports_reloads_and_stops(tmp_path):
    daemon = str(program("dnsrouter"))
    assert os.access(daemon, os.X_OK), f"the dnsrouter console script is not installed beside {sys.executable}"
    port = free_port()
    routes = tmp_path / "routes"
    routes.mkdir()
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(f"[server]\nlisten = {HOST}:{port}\nworkers = 1\n[registry]\nroutes_dir = {routes}\n")
    env = dict(os.environ, DAEMON=daemon, CONFIG=str(conf), PIDFILE=str(tmp_path / "dnsrouter.pid"),
               LOGFILE=str(tmp_path / "dnsrouter.log"))
    script = str(REPO / "conf" / "init.d" / "dnsrouter")

    def run(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, action], env=env, capture_output=True, text=True, timeout=60)

    try:
        assert run("start").returncode == 0
        status = run("status")
        assert status.returncode == 0 and "is running" in status.stdout
        pid = int((tmp_path / "dnsrouter.pid").read_text())
        wait_until(lambda: _answers(port), 10, message="router started by the init script never answered")
        assert run("reload").returncode == 0
        wait_until(lambda: "reloaded" in (tmp_path / "dnsrouter.log").read_text(), 5, message="no reload")
        assert run("stop").returncode == 0
        wait_until(lambda: not psutil.pid_exists(pid), 10, message="still running after stop")
        assert run("status").returncode == 3
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60)


def _answers(port: int) -> bool:
    return ask(port, "x.invalid.", timeout=0.3) is not None


def test_query_log_and_log_file_reopened_on_sigusr1(router, tmp_path):
    logfile = tmp_path / "dnsrouter.log"
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(f"[log]\ntarget = {logfile}\nqueries = yes\n")
    with FakeBackend("ok") as fake:
        r = router(args=["--config", str(conf)])
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: ok(r, "first.test."), 3, message="not routed")
        wait_until(lambda: "udp 127.0.0.1 first.test. 1 -> \\.test\\.$" in logfile.read_text(), 3,
                   message="query not logged")
        logfile.rename(tmp_path / "dnsrouter.log.1")  # what a rotation tool does
        r.signal(signal.SIGUSR1)
        wait_until(lambda: logfile.exists() and "log files reopened" in logfile.read_text(), 3,
                   message="log file not reopened")
        assert ok(r, "second.test.")
        wait_until(lambda: "second.test." in logfile.read_text(), 3, message="worker did not reopen")
        assert "second.test." not in (tmp_path / "dnsrouter.log.1").read_text()


def test_query_log_is_off_by_default(router):
    with FakeBackend("ok") as fake:
        r = router()
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: ok(r, "quiet.test."), 3, message="not routed")
        assert "quiet.test." not in r.log()
