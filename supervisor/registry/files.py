"""The file registry: a directory where each regular file is one key.

The file name is the key, the content the value; names order the routes.
The directory is polled so that edits, renames and removals are seen on
any filesystem: the directory itself every poll (renames and removals at
once), each file once a second, or less often when looking at every file
costs more than FULL_SCAN_SHARE of the time (thousands of files).
"""
from __future__ import annotations

import logging
import os
import threading
import time

from . import Publish, Record

log = logging.getLogger("dnsrouter.registry")

POLL_INTERVAL = 0.2
FULL_SCAN_INTERVAL = 1.0  # seconds between looks at every file, for edits in place, at least
FULL_SCAN_SHARE = 0.01  # of the time, at most: 10,000 files take 77 ms, 7.7 s apart
MAX_READ = 1 << 16  # a larger file is not a value; read no more than this


class FileRegistry:
    def __init__(self, directory: str, interval: float = POLL_INTERVAL) -> None:
        self.directory = directory
        self.interval = interval
        self._seen: dict[str, tuple] = {}  # name -> (stat signature, value)
        self._ignored: set[str] = set()
        self._missing_logged = False

    def read(self) -> tuple[Record, ...]:
        """The records in the directory now (what ``dnsrouterctl list`` shows)."""
        self._seen = {}
        return tuple(self.scan() or ())

    def scan(self) -> list[Record] | None:
        """The current records, or None when nothing changed."""
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError as e:
            if not self._missing_logged:
                log.warning("routes directory %s: %s", self.directory, e.strerror or e)
                self._missing_logged = True
            entries = []
        else:
            self._missing_logged = False
        changed = False
        now = time.time()
        current: dict[str, tuple] = {}
        for entry in entries:
            if entry.name.startswith("."):
                continue  # editors' and atomic writers' temporary files
            try:
                if not entry.is_file():
                    if entry.name not in self._ignored:
                        log.info("routes directory: %s is not a regular file, ignored", entry.name)
                        self._ignored.add(entry.name)
                    continue
                st = entry.stat()
            except OSError:
                continue
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            old = self._seen.get(entry.name)
            # A file changed within the timestamp granularity of some
            # filesystems (up to 2 s) may change again without a new mtime:
            # read those again until they are older.
            settled = now - st.st_mtime_ns / 1e9 > 2.0
            if old is not None and old[0] == signature and settled:
                current[entry.name] = old
                continue
            try:
                with open(entry.path, "rb") as f:
                    raw = f.read(MAX_READ + 1)
            except OSError:
                continue  # removed between the listing and the read
            value = raw.decode("utf-8", "surrogateescape")
            current[entry.name] = (signature, value)
            changed = changed or old is None or old[1] != value
        if changed or current.keys() != self._seen.keys():
            self._seen = current
            return [Record(name, value, order) for order, (name, (_, value)) in enumerate(current.items())]
        self._seen = current
        return None

    def put(self, name: str, value: str) -> None:
        """Write the key ``name``: a temporary dotfile renamed into place, so
        a scan never reads half a value."""
        path = os.path.join(self.directory, name)
        temporary = os.path.join(self.directory, f".{name}.tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(value + "\n")
        os.replace(temporary, path)

    def delete(self, name: str) -> bool:
        """Remove the key ``name``; False when there was none."""
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            return False
        return True

    def _directory(self) -> tuple | None:
        try:
            st = os.stat(self.directory)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def run(self, publish: Publish, stop: threading.Event) -> None:
        first = True
        directory, scanned, every = None, 0.0, FULL_SCAN_INTERVAL
        while not stop.is_set():
            # A file added, removed or renamed into place (an atomic write)
            # changes the directory: scanned at the next poll. An edit in
            # place changes only the file, so every file is stat'ed at most
            # once a second, and with thousands of files only as often as
            # costs FULL_SCAN_SHARE of the time: stat'ing them all at every
            # poll would take a large share of a CPU from the workers, for
            # edits docs/registries.md asks operators not to make.
            now, before = time.monotonic(), directory
            directory = self._directory()
            if first or directory != before or directory is None or now - scanned >= every:
                scanned = now
                try:
                    records = self.scan()
                except Exception:
                    log.exception("routes directory scan failed")
                    records = None
                every = max(FULL_SCAN_INTERVAL, (time.monotonic() - now) / FULL_SCAN_SHARE)
                if records is not None or first:
                    publish(records or [])
                    first = False
            stop.wait(self.interval)
