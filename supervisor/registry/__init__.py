"""Registries: where route records come from (a directory or etcd).

A registry runs in a supervisor thread and calls ``publish`` with the whole
current set of records every time it changes. Publishing the whole set keeps
the contract trivial (no lost deltas, replacement on resync is the same call)
and the supervisor parses only the values it has not seen before.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence


@dataclass(frozen=True)
class Record:
    """One registry key: its raw value and its registration order.

    ``order`` decides precedence between overlapping regexps: the smallest
    wins (etcd ``createdIndex``; the file registry's name order).
    """

    key: str
    value: str
    order: int


Publish = Callable[[Sequence[Record]], None]


class Registry(Protocol):
    def run(self, publish: Publish, stop: threading.Event) -> None:
        """Publish the records until ``stop`` is set; never raise."""
