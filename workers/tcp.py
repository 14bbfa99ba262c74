"""TCP clients (RFC 7766): many queries per connection, answered as they complete.

A thread per connection reads queries and hands them to the forwarder. The
answers are written by whichever thread gets them, under the connection's
lock, and never with a blocking call: that thread serves other clients too
(an upstream socket's receiving thread relays the replies of thousands). What
the kernel does not take at once waits in the connection's own queue, which
the worker's one writer thread empties as the socket drains; a client that
lets its queue pass the output limit is disconnected. Connections are capped
per worker, and a connection must deliver each message within the idle
timeout, so slow clients hold at most one slot each, never the worker.
"""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import struct
import threading
import time

from dnsrouter import proxy
from dnsrouter.settings import Config

from . import mmsg
from .forwarder import Forwarder
from .stats import Stats
from .types import Outbox

log = logging.getLogger("dnsrouter.worker")

# close() then resets the connection and frees what it holds in the kernel,
# instead of leaving it to a FIN that waits behind data the client never reads.
_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 seconds
SEND_BUFFER = 64 << 10  # bytes; the kernel doubles it, and a DNS message is at most 64 KiB


class TcpClient:
    __slots__ = ("conn", "fd", "lock", "outstanding", "out", "limit", "writer", "closed", "watched", "slow",
                 "peer", "local", "_proxy")

    def __init__(self, conn: socket.socket, writer: Writer, limit: int) -> None:
        self.conn = conn
        self.peer: tuple[str, int] = conn.getpeername()[:2]
        self.local: tuple[str, int] = conn.getsockname()[:2]
        self._proxy: dict[bool, bytes] = {}  # one connection, one client: each header made once
        self.fd = conn.fileno()  # kept: the writer's selector must know it after close() set the socket's to -1
        self.lock = threading.Lock()  # one writer at a time; close() only between two writes
        self.outstanding = 0  # queries read and not yet answered (approximate)
        self.out = bytearray()  # framed answers the kernel has not taken yet
        self.limit = limit
        self.writer = writer
        self.closed = False  # nothing is written any more: the client is gone or cut off
        self.watched = False  # the writer has (or is about to have) this connection in its selector
        self.slow = False  # cut off for leaving too much unread: counted by the connection's thread

    def send(self, data: bytes, addr: bytes | None = None, outbox: Outbox | None = None) -> None:
        """Framed and written without waiting (``addr`` and ``outbox`` are for
        datagrams): what the kernel does not take now is queued for the writer
        thread. Lost if the client left."""
        frame = len(data).to_bytes(2, "big") + data
        with self.lock:
            self.outstanding -= 1
            if self.closed:
                return
            out = self.out
            if out:  # behind answers still queued: order is kept, and the writer is on it already
                out += frame
            else:
                try:
                    sent = self.conn.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self.closed = True  # the client went away; its other answers go nowhere too
                    return
                if sent == len(frame):
                    return  # the common case: nothing queued, nothing to wake
                out += memoryview(frame)[sent:]
                self.watched = True
                self.writer.watch(self)
            if len(out) > self.limit:
                self._cut_off()

    def host(self, addr: bytes | None) -> str:
        return self.peer[0]

    def proxy_header(self, addr: bytes | None, stream: bool = False) -> bytes:
        header = self._proxy.get(stream)
        if header is None:
            header = self._proxy[stream] = proxy.header(self.peer, self.local, stream)
        return header

    def _cut_off(self) -> None:
        """Disconnect a client that does not read its answers (lock held)."""
        self.closed = self.slow = True
        self.out.clear()  # its backlog is freed now, not when its thread gets round to it
        try:
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
            # Ends the connection thread's recv, which then closes the socket;
            # closing it here would free the fd for reuse under that thread.
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def flush(self) -> bool:
        """The writer thread's part: write what the kernel takes now; True
        when nothing is left to wait for (all written, or the client gone)."""
        with self.lock:
            out = self.out
            if out and not self.closed:
                try:
                    del out[:self.conn.send(out, socket.MSG_DONTWAIT)]  # from the front: O(1) in a bytearray
                except BlockingIOError:
                    pass  # a spurious wakeup: wait for the next one
                except OSError:
                    self.closed = True
                    out.clear()
                if out and not self.closed:
                    return False
            self.watched = False
            return True

    def close(self) -> None:
        """The connection thread's last act: no other thread writes to this socket after it."""
        with self.lock:
            self.closed = True
            self.out.clear()
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()
            if self.watched:
                self.writer.watch(self)  # so the writer forgets the fd before another connection gets it


class Writer:
    """The one thread of a worker that writes the answers TCP clients did not
    take at once, as their sockets drain.

    Only this thread touches its selector: the others hand it connections
    through a queue and a wakeup byte, so registration needs no lock and
    cannot race the ``select`` in progress.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._requests: collections.deque[TcpClient] = collections.deque()  # append/popleft: atomic

    def start(self) -> None:
        threading.Thread(target=self._run, name="tcp-writer", daemon=True).start()

    def watch(self, client: TcpClient) -> None:
        """Look at ``client`` again: it has queued answers, or it was closed."""
        self._requests.append(client)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the wakeup pipe is full: the writer is woken already

    def _run(self) -> None:
        select = self._selector.select
        while True:
            try:
                for key, _ in select():
                    client = key.data
                    if client is None:
                        self._take_requests()
                    elif client.flush():
                        self._forget(client)
            except Exception:  # a bug must not stop every slow client's answers for good
                log.exception("TCP writer failed")

    def _take_requests(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        selector = self._selector
        requests = self._requests
        while requests:
            client = requests.popleft()
            if client.closed:
                self._forget(client)
                continue
            key = selector.get_map().get(client.fd)
            if key is not None and key.data is client:
                continue  # watched already
            if key is not None:
                # A closed connection's stale entry: the kernel dropped it from
                # epoll at close(), and this fd number is a new connection's.
                selector.unregister(client.fd)
            try:
                selector.register(client.fd, selectors.EVENT_WRITE, client)
            except OSError:
                pass  # closed meanwhile: its close() asks us to forget it

    def _forget(self, client: TcpClient) -> None:
        # Only its own entry: the fd number may already be another connection's.
        key = self._selector.get_map().get(client.fd)
        if key is not None and key.data is client:
            self._selector.unregister(client.fd)


def _read_timeout(conn: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads give up after ``seconds``.

    Python's own socket timeout costs a poll() before every call and an ioctl
    at every change; SO_RCVTIMEO costs nothing per call. Writes need none:
    they never block (MSG_DONTWAIT)."""
    conn.settimeout(None)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))


def _connection(conn: socket.socket, forwarder: Forwarder, stats: Stats, idle: float,
                slots: threading.BoundedSemaphore, writer: Writer, output_limit: int) -> None:
    counts = stats.for_thread()
    client = TcpClient(conn, writer, output_limit)
    handle = forwarder.handle
    recv = conn.recv
    monotonic = time.monotonic
    outbox = mmsg.Outbox()
    buffer = b""
    last = monotonic()  # when the message being read (or the latest one) began: the idle clock
    try:
        _read_timeout(conn, idle)
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
                break  # the client left, or was cut off (shutdown)
            now = monotonic()
            if chunk is None:
                # Idle: close, unless answers are still on their way to a
                # client that waits for them (and is not half way through a message).
                # The grace is read here, not at the start: [forward] timeout changes on SIGHUP.
                grace = 2 * forwarder.timeout + 1
                if buffer or (client.outstanding <= 0 and not client.out) or now - last >= idle + grace:
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
        client.close()
        if client.slow:
            counts["dropped", "tcp_slow_reader"] += 1  # here: these counts are this thread's alone
        slots.release()
        stats.release(counts)


def serve(listener: socket.socket, forwarder: Forwarder, stats: Stats, stopping: threading.Event,
          config: Config, writer: Writer) -> None:
    """Accept connections until the listener is shut down; ``writer`` (started)
    is the worker's one, shared by all its listeners. ``config``: the
    ``[server] tcp_*`` limits."""
    counts = stats.for_thread()
    slots = threading.BoundedSemaphore(config.server_tcp_connections)
    idle, output_limit = config.server_tcp_idle_timeout, config.server_tcp_output_limit
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
        # A fixed kernel buffer, instead of one that grows to megabytes for a
        # client that never reads: what it leaves unread then waits in our
        # queue, where tcp_output_limit sees it. Room for a whole reply.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        threading.Thread(target=_connection,
                         args=(conn, forwarder, stats, idle, slots, writer, output_limit),
                         name="tcp-client", daemon=True).start()
