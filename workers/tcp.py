"""TCP clients (RFC 7766): many queries per connection, answered as they complete.

A thread per connection reads queries and hands them to the forwarder; the
answers are written back by whichever thread gets them, under the
connection's lock. Connections are capped per worker, and a connection must
deliver each message within the idle timeout, so slow clients hold at most
one slot each, never the worker.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

from . import mmsg
from .forwarder import Forwarder
from .stats import Stats
from .types import Outbox


class TcpClient:
    __slots__ = ("conn", "lock", "outstanding")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.outstanding = 0  # queries read and not yet answered (approximate)

    def send(self, data: bytes, addr: bytes | None = None, outbox: Outbox | None = None) -> None:
        """Framed and written now (``addr`` and ``outbox`` are for datagrams); lost if the client left."""
        with self.lock:
            self.outstanding -= 1
            try:
                self.conn.sendall(struct.pack("!H", len(data)) + data)
            except OSError:
                pass  # the client went away; its other answers go nowhere too


def _kernel_timeouts(conn: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads and writes give up after ``seconds``.

    Python's own socket timeout costs a poll() before every call and an ioctl
    at every change; SO_RCVTIMEO/SO_SNDTIMEO cost nothing per call."""
    conn.settimeout(None)
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _connection(conn: socket.socket, forwarder: Forwarder, stats: Stats, idle: float, grace: float,
                slots: threading.BoundedSemaphore) -> None:
    counts = stats.for_thread()
    client = TcpClient(conn)
    handle = forwarder.handle
    recv = conn.recv
    monotonic = time.monotonic
    outbox = mmsg.Outbox()
    buffer = b""
    last = monotonic()  # when the message being read (or the latest one) began: the idle clock
    try:
        _kernel_timeouts(conn, idle)
        while True:
            # Read what is there: a pipelining client's queries come many to a
            # read, and each is handled as soon as it is whole. 4 KiB holds
            # dozens; 64 KiB reads cost megabytes of RSS in the heaps of the
            # connection threads (each read is allocated at full size first).
            try:
                chunk = recv(4096)
            except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO: nothing for `idle` seconds
                chunk = None
            except OSError:
                break
            if chunk == b"":
                break
            now = monotonic()
            if chunk is None:
                # Idle: close, unless answers are still on their way to a
                # client that waits for them (and is not half way through a message).
                if buffer or client.outstanding <= 0 or now - last >= idle + grace:
                    counts["tcp_closed", "idle"] += 1
                    break
                continue
            if not buffer:
                last = now  # a message begins: it has `idle` seconds to arrive whole
            elif now - last > idle:
                counts["tcp_closed", "idle"] += 1  # trickling in, a byte at a time
                break
            buffer += chunk
            pos, size = 0, len(buffer)
            while size - pos >= 2:
                end = pos + 2 + (buffer[pos] << 8 | buffer[pos + 1])
                if end > size:
                    break
                client.outstanding += 1
                handle(buffer[pos + 2:end], None, client, counts, tcp=True, outbox=outbox)
                pos = end
            outbox.flush()  # the queries of this read go to the backends together
            if pos:
                buffer = buffer[pos:]
                last = now
    finally:
        with client.lock:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        slots.release()
        stats.release(counts)


def serve(listener: socket.socket, forwarder: Forwarder, stats: Stats, stopping: threading.Event,
          max_connections: int, idle: float) -> None:
    """Accept connections until the listener is shut down."""
    counts = stats.for_thread()
    slots = threading.BoundedSemaphore(max_connections)
    grace = 2 * forwarder.timeout + 1
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            if stopping.is_set():
                return
            continue
        if forwarder.allowed is not None and not forwarder.allowed(peer[0]):
            counts["tcp_closed", "acl"] += 1
            conn.close()
            continue
        if not slots.acquire(blocking=False):
            counts["tcp_closed", "limit"] += 1
            conn.close()
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_connection, args=(conn, forwarder, stats, idle, grace, slots),
                         name="tcp-client", daemon=True).start()
