"""The quick loop, ``pytest -m "not system"``: the tests that start nothing.

Tests marked ``system`` start the router, Knot, etcd, Unbound, a helper
program or a fake backend; the others check pure code and run in seconds.
The marker is only worth something if it is right, so an unmarked test that
starts a process or a server anyway fails at the call that would start it,
before anything runs, with a message that names the fix (refused()). The
refusal raises pytest's own failure (a BaseException), which no ``except
OSError`` or ``except Exception`` in the code under test swallows.

Property tests are most of the quick loop's time, so it runs each with at
most QUICK_EXAMPLES examples (fewer_examples()); the full run keeps every
test's own count.
"""
from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
from typing import Any, Callable, Iterable, Iterator

import pytest
from hypothesis import settings

from support.fake_backend import FakeBackend

MARKER = "system"  # registered, with its description, in setup.cfg
QUICK = f"not {MARKER}"  # the -m expression of the quick loop
QUICK_EXAMPLES = 30


@contextlib.contextmanager
def refused(test: str) -> Iterator[None]:
    """While inside, whatever starts a process or a server fails ``test``."""
    def refuse(what: str) -> Callable[..., Any]:
        def refusal(*args: Any, **kwargs: Any) -> Any:
            pytest.fail(f"{test} {what} but is not marked {MARKER}: mark the test "
                        f"@pytest.mark.{MARKER}, or its module with pytestmark = pytest.mark.{MARKER}",
                        pytrace=False)
        return refusal

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess"))
        for name in ("fork", "posix_spawn", "posix_spawnp"):
            patch.setattr(os, name, refuse(f"calls os.{name}"))
        patch.setattr(multiprocessing.process.BaseProcess, "start", refuse("starts a multiprocessing Process"))
        patch.setattr(FakeBackend, "start", refuse("starts a FakeBackend"))
        yield


def fewer_examples(items: Iterable[pytest.Item], most: int = QUICK_EXAMPLES) -> None:
    """Cap every property test among items at ``most`` examples.

    A test's own ``@settings(max_examples=...)`` wins over any hypothesis
    profile, so no profile can do this: the cap replaces the settings that
    decorator (or @given) stored on the test function, which hypothesis
    reads again at each run, with a copy that differs only in the count.
    """
    for item in items:
        test = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(own, settings) and own.max_examples > most:
            test._hypothesis_internal_use_settings = settings(own, max_examples=most)  # type: ignore[union-attr]
