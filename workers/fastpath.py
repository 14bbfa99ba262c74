"""Whether a worker's UDP path runs compiled (``_fastpath``, built from
``_fastpath.pyx`` when the install had a C compiler) or in Python.

``FastPath`` is the compiled module as the Python code calls it; the module
ships ``_fastpath.pyi``, so mypy checks each call (and the module against
this protocol, at ``load``).
"""
from __future__ import annotations

import importlib
import socket
import threading
from typing import TYPE_CHECKING, Callable, Protocol, cast

if TYPE_CHECKING:
    from . import _fastpath
    from .forwarder import Forwarder
    from .types import Client, Counts, Outbox
    from .upstream import Upstream


class FastPath(Protocol):
    """The names of the compiled module that the Python modules use, typed
    as _fastpath.pyi types them (mypy checks the module against this at
    ``load``, and each call through it)."""

    BUILT: bool
    Counters: type[_fastpath.Counters]
    PacketCache: type[_fastpath.PacketCache]
    Pending: type[_fastpath.Pending]
    QueryLimit: type[_fastpath.QueryLimit]
    ResponseLimit: type[_fastpath.ResponseLimit]
    Replies: type[_fastpath.Replies]

    def serve(self, sock: socket.socket, forwarder: Forwarder, counts: Counts, counters: _fastpath.Counters,
              stopping: threading.Event, client: Client, failed: Callable[[], None],
              replies: list[_fastpath.Replies] = ...) -> list[Upstream]: ...

    def serve_upstreams(self, replies: list[_fastpath.Replies]) -> None: ...

    def due_retries(self, upstream: Upstream, now: float, counts: Counts, outbox: Outbox) -> None: ...


def load(setting: str = "auto") -> tuple[FastPath | None, str]:
    """(the compiled module, or None; why, in a few words) for ``[server] fast_path``."""
    if setting == "off":
        return None, "off: [server] fast_path = off"
    if TYPE_CHECKING:  # the module as its .pyi types it must be a FastPath
        checked: FastPath = _fastpath  # noqa: F841
    try:
        # By name, not `from . import`: that takes the package's attribute,
        # which an import of the module left there, without asking again.
        module = importlib.import_module(f"{__package__}._fastpath")
    except ImportError as e:  # built without a compiler, or for another Python
        return None, f"off: not built ({e})"
    return cast("FastPath", module), "on"
