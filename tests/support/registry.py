"""A registry (v2 or v3 etcd) running in a thread, recording what it publishes."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from dnsrouter.supervisor.registry import Record

from support.net import wait_until

Table = dict[str, tuple[str, int]]  # key -> (value, order)


class Running:
    """``registry.run`` in a thread. ``hook`` is called with every published
    set (in the registry's thread): a hook that blocks pauses the registry.
    ``etcd_table(url)`` reads etcd's own state, for ``wait_equal``."""

    def __init__(self, registry: Any, etcd_table: Callable[[str], Table],
                 hook: Optional[Callable[[tuple[Record, ...]], None]] = None) -> None:
        self.registry = registry
        self._etcd_table = etcd_table
        self.stop = threading.Event()
        self.published: list[tuple[float, tuple[Record, ...]]] = []
        self.hook = hook
        self.thread = threading.Thread(target=self.registry.run, args=(self._publish, self.stop),
                                       daemon=True)
        self.thread.start()

    def _publish(self, records) -> None:
        records = tuple(records)
        self.published.append((time.monotonic(), records))
        if self.hook is not None:
            self.hook(records)

    def table(self) -> Optional[Table]:
        """The last published set as {key: (value, order)}, None before any."""
        if not self.published:
            return None
        return {r.key: (r.value, r.order) for r in self.published[-1][1]}

    def wait_for(self, predicate: Callable[[Table], bool], timeout: float = 10.0,
                 message: str = "published table") -> Any:
        def check():
            table = self.table()
            return table is not None and predicate(table)
        try:
            return wait_until(check, timeout=timeout, interval=0.005, message=message)
        except AssertionError:
            raise AssertionError(f"{message}; last published: {self.table()}") from None

    def wait_equal(self, url: str, timeout: float = 10.0) -> None:
        """Wait until the published table is exactly etcd's."""
        self.wait_for(lambda t: t == self._etcd_table(url), timeout, "table equal to etcd's")

    def close(self, timeout: float = 5.0) -> float:
        t = time.monotonic()
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "registry did not stop"
        return time.monotonic() - t
