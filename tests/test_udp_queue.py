"""``[server] udp_receive_buffer``: what a worker's UDP socket holds while the worker cannot read.

The worker is stopped (SIGSTOP) while a burst of queries arrives, then
continued: every query the socket held is answered, and what it could not
hold the kernel dropped (/proc/net/udp). The same burst overflows a small
queue and fits a large one, so the setting is what decides.
"""
from __future__ import annotations

import os
import signal
import socket

import dns.message
import dns.rcode
import pytest

from dnsrouter.supervisor.sockets import receive_buffer
from support.flood_watch import udp_drops
from support.net import HOST, routed, wait_until

pytestmark = pytest.mark.system

BURST = 15_000  # about 1 KiB of queue each (the kernel's accounting): ~15 MiB together


def _burst_while_stopped(router, tmp_path, size: int) -> tuple[int, int]:
    """(datagrams the kernel dropped, answers received) for BURST no-route queries sent while the
    router's one worker is stopped, with ``udp_receive_buffer = size``."""
    conf = tmp_path / f"queue-{size}.ini"
    conf.write_text(f"[server]\nudp_receive_buffer = {size}\n")
    r = router(args=["--config", str(conf)])
    wait_until(lambda: routed(r, "probe.nowhere.test.", dns.rcode.SERVFAIL), 10, message="the router never answered")
    assert "udp_receive_buffer: the kernel gave" not in r.log()  # the test runs as root: the size is set
    wire = bytearray(dns.message.make_query("h.nowhere.test.", "A").to_wire())
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receive_buffer(client, 64 << 20)  # room for every answer of the burst
    client.bind((HOST, 0))
    worker = r.worker_pids()[0]
    kernel = udp_drops(r.port)
    answered: set[int] = set()
    try:
        os.kill(worker, signal.SIGSTOP)
        for qid in range(BURST):
            wire[0:2] = qid.to_bytes(2, "big")
            client.sendto(wire, (HOST, r.port))
        dropped = udp_drops(r.port) - kernel  # a send to a stopped reader is queued or dropped at once
    finally:
        os.kill(worker, signal.SIGCONT)
    client.settimeout(0.5)  # the end: nothing more for that long once the worker drained its queue
    try:
        while len(answered) < BURST:
            answered.add(int.from_bytes(client.recv(512)[0:2], "big"))
    except socket.timeout:
        pass
    finally:
        client.close()
    return dropped, len(answered)


@pytest.mark.parametrize("size, holds", [(262144, False), (33554432, True)], ids=["256KiB", "32MiB"])
def test_the_receive_buffer_holds_a_burst_while_the_worker_is_stopped(router, tmp_path, size, holds):
    dropped, answered = _burst_while_stopped(router, tmp_path, size)
    print(f"udp_receive_buffer {size}: {answered} of {BURST} answered, the kernel dropped {dropped}")
    assert answered + dropped == BURST  # each query answered or dropped by the kernel, none by the router
    if holds:
        assert dropped == 0
    else:
        assert dropped > BURST // 2  # 256 KiB holds some 600 small queries
