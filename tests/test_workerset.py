"""The supervisor's side of a worker's pipe: typed messages, snapshots collapsed."""
from __future__ import annotations

import socket

import pytest

from dnsrouter import control
from dnsrouter.config import defaults
from dnsrouter.supervisor import workerset
from support.net import wait_until

pytestmark = pytest.mark.system  # spawns a worker process


def _record(spec: control.WorkerSpec, conn) -> None:
    """A worker that reads nothing until told (a byte on its one "UDP socket"),
    then hands back what it got: three messages, described."""
    spec.udp_sockets[0].recv(1)
    got = [conn.recv() for _ in range(3)]
    conn.send([(type(m).__name__, len(m.wire) if isinstance(m, control.NewSnapshot) else None) for m in got])


def test_queued_snapshots_collapse_to_the_newest_and_other_messages_keep_their_order():
    go, worker_end = socket.socketpair()
    handle = workerset.spawn(control.WorkerSpec(0, None, [worker_end], [], defaults()), _record)
    try:
        # Far more than a pipe holds: the sender is stuck with it until the
        # worker reads, and what is posted meanwhile waits in the outbox.
        handle.post(control.NewSnapshot(bytes(8 << 20)))
        wait_until(lambda: not handle._outbox, 5, message="the sender never took the first snapshot")
        handle.post(control.NewSnapshot(b"2"))
        handle.post(control.NewSnapshot(b"33"))
        handle.post(control.ReopenLogs())
        handle.post(control.NewSnapshot(b"4444"))
        go.send(b"!")
        assert handle.conn.poll(10), "the worker said nothing"
        assert handle.conn.recv() == [("NewSnapshot", 8 << 20), ("ReopenLogs", None), ("NewSnapshot", 4)]
        handle.process.join(5)
        assert handle.process.exitcode == 0
    finally:
        handle.close()
        if handle.process.is_alive():
            handle.process.kill()
            handle.process.join()
        go.close()
        worker_end.close()
