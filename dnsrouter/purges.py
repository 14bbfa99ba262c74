"""Cache purges that every worker sees at its next batch (issue 27).

A NOTIFY reaches one worker (the kernel hashes its source onto one socket),
and ``dnsrouterctl purge`` reaches the supervisor; yet every worker's cache
must forget the zone before it answers again, or a client asking a moment
after the NOTIFY was answered gets the old zone from another worker. So a
purge is not a message passed on: it is written into this log, in memory
the supervisor maps before it spawns the workers, and each cache reads the
log's sequence number (one 8-byte load) before each batch or lookup and
applies what is new. The writer returns once the entry is in: a query that
arrives after that, at any worker, finds the purge applied.

Layout: the sequence number (uint64) at offset 0, then ``CAPACITY`` entries
in a ring: when the purge was written (a double, CLOCK_MONOTONIC, which
every process of the host shares), whether it takes the subtree, the
cause's index in ``CAUSES``, the name's length, the name (wire format,
lower-cased). A reader more than ``CAPACITY`` entries behind cannot know
what it missed, and purges everything.

Writers (any process) take the lock; readers take it only when the number
moved, so that what they read is whole. The memory is a memfd that the
workers inherit (multiprocessing hands its descriptor over at spawn, as it
does the sockets) and the lock a record lock on it (``lockf``), beside a
thread lock for the threads of one process: a named semaphore (what
multiprocessing's Lock is) is the supervisor's, and a worker that runs as
``[server] user`` may not open it.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any, Iterator

CAPACITY = 256
CAUSES = ("notify", "ctl", "routes", "behind")  # why entries were purged; "behind": a reader missed entries
_ENTRY = struct.Struct("=d?BB255s")
_HEAD = 8
_SIZE = _HEAD + CAPACITY * _ENTRY.size


@dataclass(frozen=True)
class Purge:
    at: float  # time.monotonic() when it was written
    name: bytes  # wire format, lower-cased
    subtree: bool
    cause: str


class PurgeLog:
    """Picklable for multiprocessing's spawn (it rides in WorkerSpec)."""

    def __init__(self, fd: int | None = None) -> None:
        """A new log, or (``fd``) the log another process made."""
        if fd is None:
            fd = os.memfd_create("dnsrouter-purges", os.MFD_CLOEXEC)
            os.ftruncate(fd, _SIZE)
        self._fd = fd
        weakref.finalize(self, os.close, fd)  # the mapping keeps a descriptor of its own
        self._map = mmap.mmap(fd, _SIZE)  # MAP_SHARED: every process maps the same pages
        self._memory: Any = (ctypes.c_ubyte * _SIZE).from_buffer(self._map)
        self._seq = ctypes.c_uint64.from_buffer(self._memory)
        self._threads = threading.Lock()  # lockf locks per process: the threads of one take turns here

    def __reduce__(self) -> tuple[Any, ...]:
        return _attach, (reduction.DupFd(self._fd),)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads take turns, then the processes."""
        with self._threads:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    @property
    def seq(self) -> int:
        """How many purges were ever written."""
        return self._seq.value

    def address(self) -> int:
        """Where the sequence number is, for the compiled cache's load."""
        return ctypes.addressof(self._memory)

    def append(self, name: bytes, subtree: bool, cause: str) -> int:
        """Write a purge of ``name`` (wire format, lower-cased); the new sequence number."""
        if not 1 <= len(name) <= 255:
            raise ValueError("not a wire-format name")
        entry = _ENTRY.pack(time.monotonic(), subtree, CAUSES.index(cause), len(name), name)
        with self._locked():
            seq = self.seq
            at = _HEAD + (seq % CAPACITY) * _ENTRY.size
            self._memory[at:at + _ENTRY.size] = entry
            self._seq.value = seq + 1  # after the entry: readers go by it
            return seq + 1

    def since(self, seen: int) -> tuple[int, list[Purge] | None]:
        """The sequence number now and the purges after ``seen``; None for
        the purges when more than CAPACITY were written meanwhile."""
        with self._locked():
            seq = self.seq
            if seq - seen > CAPACITY:
                return seq, None
            out = []
            for n in range(seen, seq):
                at = _HEAD + (n % CAPACITY) * _ENTRY.size
                when, subtree, cause, length, name = _ENTRY.unpack(bytes(self._memory[at:at + _ENTRY.size]))
                out.append(Purge(when, name[:length], subtree, CAUSES[cause]))
            return seq, out


def _attach(fd: Any) -> PurgeLog:
    """The log in a spawned process, from the descriptor it inherited."""
    return PurgeLog(fd.detach())
