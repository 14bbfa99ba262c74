"""Datagrams in batches: recvmmsg(2) and sendmmsg(2), called through ctypes.

The socket module has neither. Under load most of a worker's time is the
kernel's: a system call per datagram, and above all the receiver woken (and
this thread preempted) for every datagram sent. One ``recvmmsg`` takes every
datagram already queued (up to ``BATCH``); the answers and forwarded queries
they produce leave in one ``sendmmsg`` per socket, waking each receiver once
per batch. When traffic is light a batch holds one datagram, as before.

Peers are kept as the kernel's raw ``struct sockaddr`` bytes: they come from
one call and go back into the next without a Python tuple in between.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import random
import socket
import struct

from dnsrouter.address import Address

BATCH = 32  # datagrams per call, either way
MAX_DATAGRAM = 65536  # room per datagram (the largest UDP payload is 65,527): a page-aligned slot
_MSG_WAITFORONE = 0x10000  # block for the first datagram only

_libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendto = _libc.sendto
_sendto.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
# With IP_RECVERR an ICMP error also sets the socket's pending error, and the
# next send on the socket, from any thread, takes it and fails, whatever its
# own destination: the datagram was never sent. It goes again once (the
# error is gone by then; the ICMP message itself stays on the error queue).
STALE_ERRORS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})


class Iovec(ctypes.Structure):  # the C structs, public: tests/support/floods.py sends with them too
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


_HDR = ctypes.sizeof(Mmsghdr)
_LEN = Mmsghdr.len.offset
_IOV = ctypes.sizeof(Iovec)
_IOV_LEN = Iovec.len.offset
_U32 = struct.Struct("I")
_FAMILY = struct.Struct("=H")  # sa_family_t, in the machine's byte order
_SIZE = struct.Struct("N")  # size_t


def _sockaddr_size(family: int) -> int:
    return 28 if family == socket.AF_INET6 else 16  # sizeof(struct sockaddr_in6 / sockaddr_in)


class _Vector:
    """``n`` message headers, each with one iovec (over its own 64 KiB slot
    of the buffer, until an Outbox points it elsewhere) and room for a peer
    address of one family (whose size is fixed, so the kernel's answer
    leaves the room as it was)."""

    def __init__(self, n: int, family: int) -> None:
        self.n = n
        self.name_size = _sockaddr_size(family)
        # Anonymous memory: pages are only backed once touched, so room for n
        # datagrams of 64 KiB costs a page per slot while they stay small.
        self.buffer = mmap.mmap(-1, n * MAX_DATAGRAM)
        self.names = mmap.mmap(-1, n * self.name_size)
        self._iov = (Iovec * n)()
        self._hdrs = (Mmsghdr * n)()
        self.base = base = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        names = ctypes.addressof(ctypes.c_char.from_buffer(self.names))
        for i in range(n):
            self._iov[i].base = base + i * MAX_DATAGRAM
            self._iov[i].len = MAX_DATAGRAM
            hdr = self._hdrs[i].hdr
            hdr.name = names + i * self.name_size
            hdr.namelen = self.name_size
            hdr.iov = ctypes.addressof(self._iov[i])
            hdr.iovlen = 1
        self.hdrs = memoryview(self._hdrs).cast("B")
        self.iov = memoryview(self._iov).cast("B")
        self.address = ctypes.addressof(self._hdrs)


class Receiver:
    """Blocking reads of up to ``BATCH`` datagrams from one socket."""

    def __init__(self, sock: socket.socket, n: int = BATCH) -> None:
        self._sock = sock  # keeps the descriptor open while we use its number
        self._fd = sock.fileno()
        self._v = _Vector(n, sock.family)

    def receive(self) -> list[tuple[bytes, bytes]]:
        """Wait for a datagram; return it and every one queued behind it, as
        (payload, raw peer address) pairs. Raises OSError (EINTR included)."""
        v = self._v
        got = _recvmmsg(self._fd, v.address, v.n, _MSG_WAITFORONE, None)
        if got < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        buffer, names, hdrs, unpack, size = v.buffer, v.names, v.hdrs, _U32.unpack_from, v.name_size
        return [(buffer[i * MAX_DATAGRAM:i * MAX_DATAGRAM + unpack(hdrs, i * _HDR + _LEN)[0]],
                 names[i * size:i * size + size]) for i in range(got)]


class Outbox:
    """What one thread sends during one batch, sent together by ``flush``.

    Not shared between threads: each thread that reads a batch has its own
    and flushes it when the batch is done.
    """

    def __init__(self) -> None:
        self._queued: list[tuple[int, bytes, bytes]] = []
        self._vectors: dict[int, _Vector] = {}  # by address family
        self.pick = 0  # which upstream socket this batch's queries leave from

    def add(self, fd: int, payload: bytes, name: bytes) -> None:
        self._queued.append((fd, payload, name))

    def flush(self) -> None:
        queued = self._queued
        if not queued:
            return
        if len(queued) == 1:  # light traffic: no vector to fill
            send(*queued[0])
        else:
            by_socket: dict[int, list[tuple[int, bytes, bytes]]] = {}
            for item in queued:
                by_socket.setdefault(item[0], []).append(item)
            for fd, items in by_socket.items():
                if len(items) == 1:
                    send(*items[0])
                else:
                    for start in range(0, len(items), BATCH):
                        self._send_all(fd, items[start:start + BATCH])
        queued.clear()
        self.pick = random.getrandbits(16)

    def _send_all(self, fd: int, items: list[tuple[int, bytes, bytes]]) -> None:
        family = socket.AF_INET6 if len(items[0][2]) == 28 else socket.AF_INET
        v = self._vectors.get(family)
        if v is None:
            v = self._vectors[family] = _Vector(BATCH, family)
        # The payloads one after the other (not a 64 KiB slot each): a batch
        # of small datagrams touches a page or two of the buffer.
        buffer, names, iov, size, pack = v.buffer, v.names, v.iov, v.name_size, _SIZE.pack_into
        at = 0
        for i, (_, payload, name) in enumerate(items):
            length = len(payload)
            buffer[at:at + length] = payload
            pack(iov, i * _IOV, v.base + at)
            pack(iov, i * _IOV + _IOV_LEN, length)
            names[i * size:i * size + size] = name
            at += length
        done, again = 0, -1
        while done < len(items):
            sent = _sendmmsg(fd, v.address + done * _HDR, len(items) - done, 0)
            if sent > 0:
                done += sent
            elif again != done and ctypes.get_errno() in STALE_ERRORS:
                again = done  # an earlier datagram's error: this one once more
            else:
                # A datagram the kernel refuses (buffer full) is lost, as a
                # datagram may be; the others still go.
                done += 1


def send(fd: int, payload: bytes, name: bytes) -> None:
    """One datagram now, to a raw peer address; a refused one is lost."""
    if _sendto(fd, payload, len(payload), 0, name, len(name)) < 0 and ctypes.get_errno() in STALE_ERRORS:
        _sendto(fd, payload, len(payload), 0, name, len(name))


# Cached: raw_address runs for every query sent and peer_key for every reply,
# and a hit costs a dict look-up where packing costs several calls. Bounded:
# backends come and go with their registrations, and an unbounded cache keeps
# every one the worker ever saw. 4096 is far above any live backend count, so
# the live ones stay cached; a hit still costs O(1) (a look-up and a move to
# the front of the LRU list).
_BACKENDS_CACHED = 4096


@functools.lru_cache(maxsize=_BACKENDS_CACHED)
def raw_address(address: Address) -> bytes:
    """``address`` as a ``struct sockaddr``, the form the kernel reports peers in."""
    if address.family == socket.AF_INET6:
        return _FAMILY.pack(socket.AF_INET6) + struct.pack("!HI", address.port, 0) + \
            socket.inet_pton(socket.AF_INET6, address.host) + bytes(4)
    return _FAMILY.pack(socket.AF_INET) + struct.pack("!H", address.port) + \
        socket.inet_pton(socket.AF_INET, address.host) + bytes(8)


@functools.lru_cache(maxsize=_BACKENDS_CACHED)
def peer_key(address: Address) -> bytes:
    """The part of a raw peer address that names the backend: family, port
    and IP (an IPv6 scope or flow label aside)."""
    raw = raw_address(address)
    return raw[:24] if address.family == socket.AF_INET6 else raw[:8]


def host(name: bytes) -> str:
    """The IP of a raw peer address, as text (for the ACL and the query log)."""
    if len(name) >= 24 and _FAMILY.unpack_from(name)[0] == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, name[8:24])
    return socket.inet_ntop(socket.AF_INET, name[4:8])
