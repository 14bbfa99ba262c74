"""Pinned workers get the datagrams their own CPU received (supervisor/sockets.py).

On loopback the kernel delivers a datagram on the CPU that sent it, so a
client thread pinned to one CPU stands for a network card's queue whose
interrupts that CPU takes.
"""
from __future__ import annotations

import os

import dns.exception
import dns.message
import dns.query
import psutil

from dnsrouter.supervisor import sockets
import pytest

from support.fake_backend import FakeBackend
from support.net import HOST, wait_until


def routed(port: int) -> bool:
    try:
        return dns.query.udp(dns.message.make_query("ready.test.", "A"), HOST, port=port, timeout=0.5).rcode() == 0
    except dns.exception.Timeout:
        return False


def asked_from(cpu: int, port: int, count: int) -> None:
    """``count`` queries, each from a new source port, sent by this thread on ``cpu``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # this thread only
    try:
        for i in range(count):
            reply = dns.query.udp(dns.message.make_query(f"q{i}.test.", "A"), HOST, port=port, timeout=2)
            assert reply.rcode() == 0
    finally:
        os.sched_setaffinity(0, before)


def upstream_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="udp4")}


@pytest.mark.system
def test_each_cpu_s_datagrams_go_to_the_worker_pinned_to_it(router, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "this test needs two CPUs"
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text(f"[server]\ncpu_affinity = {cpus[1]},{cpus[0]}\nsocket_affinity = on\n")  # worker 0 on the second CPU
    with FakeBackend("ok") as fake:
        r = router(workers=2, args=["--config", str(conf)])
        r.route("a", rf"{fake.addr},\.test\.$")
        wait_until(lambda: routed(r.port), 5, message="not routed")
        workers = {tuple(p.cpu_affinity()): p.pid for p in r.workers_procs()}
        assert set(workers) == {(cpus[0],), (cpus[1],)}
        seen = {}
        for cpu in cpus:
            fake.clear()
            asked_from(cpu, r.port, 40)  # 40 source ports: hashed, both workers would get some
            seen[cpu] = {q.peer[1] for q in fake.received if q.transport == "udp" and q.qname.endswith("test.")}
        for cpu in cpus:
            assert seen[cpu] and seen[cpu] <= upstream_ports(workers[(cpu,)]), (cpu, seen, workers)


def test_no_program_unless_each_worker_has_a_cpu_of_its_own():
    assert sockets.cpu_program([]) == []
    assert sockets.cpu_program([0, None]) == []  # a worker the scheduler places
    assert sockets.cpu_program([1, 1]) == []  # two workers on one CPU: steering would starve one
    assert sockets.cpu_program([3, 2]) == [
        (0x20, 0, 0, 0xFFFFF024),  # A = the CPU
        (0x15, 0, 1, 3), (0x06, 0, 0, 0),  # CPU 3: socket 0
        (0x15, 0, 1, 2), (0x06, 0, 0, 1),  # CPU 2: socket 1
        (0x06, 0, 0, 0xFFFFFFFF)]  # any other: past the group, so by hash


@pytest.mark.system
def test_socket_affinity_without_pinned_workers_says_so_and_hashes(router, tmp_path):
    conf = tmp_path / "dnsrouter.ini"
    conf.write_text("[server]\ncpu_affinity = off\nsocket_affinity = on\n")
    r = router(workers=2, args=["--config", str(conf)])
    assert "socket_affinity needs every worker pinned to a CPU of its own" in r.log()
    assert r.answers()
