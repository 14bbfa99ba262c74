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


class TcpClient:
    __slots__ = ("conn", "lock", "outstanding")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.outstanding = 0  # queries read and not yet answered (approximate)

    def send(self, data: bytes, addr=None) -> None:
        with self.lock:
            self.outstanding -= 1
            try:
                self.conn.sendall(struct.pack("!H", len(data)) + data)
            except OSError:
                pass  # the client went away; its other answers go nowhere too


def _read_exact(conn: socket.socket, n: int, deadline: float) -> bytes | None:
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        conn.settimeout(remaining)
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _connection(conn: socket.socket, forwarder, stats, idle: float, grace: float,
                slots: threading.BoundedSemaphore) -> None:
    counts = stats.for_thread()
    client = TcpClient(conn)
    last = time.monotonic()
    try:
        while True:
            try:
                header = _read_exact(conn, 2, time.monotonic() + idle)
                if header is None:
                    break
                length = header[0] << 8 | header[1]
                message = _read_exact(conn, length, time.monotonic() + idle)
                if message is None:
                    break
            except TimeoutError:
                # Idle: close, unless answers are still on their way.
                if client.outstanding > 0 and time.monotonic() - last < idle + grace:
                    continue
                counts["tcp_closed", "idle"] += 1
                break
            except OSError:
                break
            last = time.monotonic()
            client.outstanding += 1
            forwarder.handle(message, None, client, counts, tcp=True)
    finally:
        with client.lock:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        slots.release()
        stats.release(counts)


def serve(listener: socket.socket, forwarder, stats, stopping: threading.Event,
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
