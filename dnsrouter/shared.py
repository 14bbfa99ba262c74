"""Memory every process of the router maps: the purge log (purges.py) and
the rate limits' accounts (ratelimit.py).

The supervisor makes a memfd before it spawns the workers; it rides to them
in WorkerSpec, pickled as a descriptor multiprocessing hands over at spawn
(``DupFd``), as the sockets do. The lock is a record lock on the memfd
(``lockf``): a named semaphore (multiprocessing's Lock) is the supervisor's,
and a worker that runs as ``[server] user`` may not open it.

Record locks belong to a process, not a thread, and the kernel's deadlock
check reasons about processes: worker A's thread holding table X while
another thread of A waits for table Y, held by worker B, whose thread
waits for X, is reported as a deadlock (EDEADLK), though A's holder will
let go. So one thread lock per process is taken around every record lock:
a process holds or waits for one record lock at a time, and none of this
can be a cycle.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import threading
import weakref
from multiprocessing import reduction
from typing import Any, Iterator

_PROCESS = threading.Lock()  # this process's turn at any record lock of this module's maps


class SharedMap:
    """A memfd of ``size`` bytes, mapped shared. Its owner pickles it as
    ``inherited()``, which the spawned process gives back to ``SharedMap``
    as ``fd``."""

    def __init__(self, name: str, size: int = 0, fd: int | None = None) -> None:
        """A new map of ``size`` zero bytes, or (``fd``) the one another
        process made, whole."""
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self._fd = fd
        weakref.finalize(self, os.close, fd)  # the mapping keeps a descriptor of its own
        self.size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, self.size)  # MAP_SHARED: every process maps the same pages
        self.memory: Any = (ctypes.c_ubyte * self.size).from_buffer(self.map)

    def inherited(self) -> Any:
        """The descriptor as multiprocessing's spawn hands it over (``.detach()`` there)."""
        return reduction.DupFd(self._fd)

    def address(self) -> int:
        """Where the map is in this process, for compiled code."""
        return ctypes.addressof(self.memory)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This process's threads take turns, then the processes."""
        with _PROCESS:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
