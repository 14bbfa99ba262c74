"""Whether a worker's UDP path runs compiled (``_fastpath``, built from
``_fastpath.pyx`` when the install had a C compiler) or in Python."""
from __future__ import annotations

import importlib
from types import ModuleType


def load(setting: str = "auto") -> tuple[ModuleType | None, str]:
    """(the compiled module, or None; why, in a few words) for ``[server] fast_path``."""
    if setting == "off":
        return None, "off: [server] fast_path = off"
    try:
        # By name, not `from . import`: the module is a build output that
        # static checks cannot see, and may rightly be absent.
        module = importlib.import_module(f"{__package__}._fastpath")
    except ImportError as e:  # built without a compiler, or for another Python
        return None, f"off: not built ({e})"
    return module, "on"
