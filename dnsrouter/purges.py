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
moved, so that what they read is whole. The memory and its lock are a
``shared.SharedMap``, which the workers inherit.
"""
from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass
from typing import Any

from .shared import SharedMap

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
        self._shared = SharedMap("dnsrouter-purges", _SIZE, fd)
        self._memory = self._shared.memory
        self._seq = ctypes.c_uint64.from_buffer(self._memory)
        self._locked = self._shared.locked

    def __reduce__(self) -> tuple[Any, ...]:
        return _attach, (self._shared.inherited(),)

    @property
    def seq(self) -> int:
        """How many purges were ever written."""
        return self._seq.value

    def address(self) -> int:
        """Where the sequence number is, for the compiled cache's load."""
        return self._shared.address()

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
