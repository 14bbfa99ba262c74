"""The seam between the compiled UDP path and the Python classes: the
compiled module uses their public interface only. Here every read of an
underscore attribute of a Forwarder, Upstream or Pool from anywhere but the
class's own methods fails (and is recorded), and queries still go through
the compiled loop, replies come back, retries and timeouts still happen."""
from __future__ import annotations

import inspect
import socket
import sys
import types

import dns.message
import dns.rcode
import pytest

from dnsrouter import routes
from dnsrouter.address import parse_address
from dnsrouter.routes import Matcher, Pool, Route
from dnsrouter.workers import fastpath, forwarder as forwarder_module
from dnsrouter.config import defaults
from dnsrouter.workers.forwarder import Forwarder
from dnsrouter.workers.stats import Stats
from dnsrouter.workers.upstream import Upstream
from support.compiled_loop import serving
from support.fake_backend import FakeBackend

pytestmark = pytest.mark.system  # a fake backend answers the forwarded queries


def _own_code(cls: type) -> set[types.CodeType]:
    """The code of every method (and property, and what they nest) of ``cls``."""
    codes: set[types.CodeType] = set()

    def walk(code: types.CodeType) -> None:
        codes.add(code)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    for value in vars(cls).values():
        function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if inspect.isfunction(function):
            walk(function.__code__)
    return codes


def public_only(cls: type, refused: list[str]) -> type:
    """``cls`` whose private attributes only its own methods may read."""
    own = _own_code(cls)

    def __getattribute__(self, name: str):
        # Frame 1 is the Python code that asked; compiled code has no frame
        # of its own, so for it this is whichever Python function called it.
        if name[0] == "_" and name[:2] != "__" and sys._getframe(1).f_code not in own:
            refused.append(f"{cls.__name__}.{name}")
            raise AttributeError(f"{cls.__name__}.{name} is private")
        return object.__getattribute__(self, name)

    return type(cls.__name__, (cls,), {"__slots__": (), "__getattribute__": __getattribute__})


@pytest.fixture
def compiled():
    module, why = fastpath.load()
    assert module is not None, f"the compiled path is not built: {why}"
    return module


def test_the_compiled_path_runs_on_the_public_interface_only(compiled, monkeypatch):
    refused: list[str] = []
    monkeypatch.setattr(routes, "Pool", public_only(Pool, refused))  # what Matcher makes its pools of
    monkeypatch.setattr(forwarder_module, "Upstream", public_only(Upstream, refused))
    forwarder = public_only(Forwarder, refused)(defaults(forward_timeout=1.0), Stats(), fast=compiled)
    with pytest.raises(AttributeError):
        forwarder._adopted  # the guard itself: a read from outside the class fails
    assert refused == ["Forwarder._adopted"]
    refused.clear()

    with FakeBackend("ok") as good, FakeBackend("drop") as silent, serving(forwarder) as listening, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        good_address, silent_address = parse_address(good.addr), parse_address(silent.addr)
        forwarder.matcher = Matcher([Route(r"\.good\.$", (good_address,)),
                                     Route(r"\.retried\.$", (silent_address, good_address)),
                                     Route(r"\.lost\.$", (silent_address,))])
        assert all(type(p).__getattribute__ is not object.__getattribute__ for p in forwarder.matcher.pools)
        client.settimeout(3)
        names = [f"q{i}.good." for i in range(10)] + [f"r{i}.retried." for i in range(4)] + ["x.lost."]
        asked = {}
        for name in names:
            query = dns.message.make_query(name, "A")
            asked[query.id] = name
            client.sendto(query.to_wire(), listening.getsockname())
        replies = [dns.message.from_wire(client.recv(512)) for _ in names]  # the lost one after the timeout
        assert sorted(asked[r.id] for r in replies) == sorted(names)
        assert {asked[r.id]: r.rcode() for r in replies if r.rcode() != dns.rcode.NOERROR} == \
            {"x.lost.": dns.rcode.SERVFAIL}
        delta = forwarder.stats.delta()
        assert delta["backend_retries", silent_address] >= 2  # the .retried. queries asked it first, half of them
        assert delta["backend_timeouts", silent_address] >= 1
        assert ("dropped", "error") not in delta
        assert not [k for k in delta if k[0] == "fast_path_handoffs"]  # the compiled loop forwarded them all
    assert refused == []
