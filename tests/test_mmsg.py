"""Batched datagram I/O, through ctypes (mmsg) and compiled (_fastpath):
what goes in comes out, byte for byte, either way."""
from __future__ import annotations

import socket

import pytest

from dnsrouter.address import parse_address
from dnsrouter.workers import fastpath, mmsg

FAMILIES = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


@pytest.fixture(params=["python", "compiled"])
def io(request):
    """The module whose Receiver and Outbox a test drives."""
    if request.param == "python":
        return mmsg
    module, why = fastpath.load()
    assert module is not None, f"the compiled path is not built: {why}"  # CI builds it: a failure, never a skip
    return module


def pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind((host, 0))
        s.settimeout(2)
    return a, b


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


@pytest.mark.parametrize("family,host", FAMILIES)
def test_a_batch_holds_every_queued_datagram_with_its_sender(io, family, host):
    receiver, sender = pair(family, host)
    with receiver, sender:
        payloads = [bytes([i]) * (i * 37 % 1400) for i in range(40)] + [b"y" * 65000]
        for p in payloads:
            sender.sendto(p, receiver.getsockname())
        got = []
        rx = io.Receiver(receiver)
        while len(got) < len(payloads):
            batch = rx.receive()
            assert 1 <= len(batch) <= mmsg.BATCH
            got.extend(batch)
        assert [p for p, _ in got] == payloads  # empty and 64 KB ones included, in order
        peer = parse_address(address_of(sender))
        assert {name for _, name in got} == {mmsg.raw_address(peer)}
        assert mmsg.host(got[0][1]) == host


@pytest.mark.parametrize("family,host", FAMILIES)
def test_an_outbox_sends_each_datagram_once_to_its_peer(io, family, host):
    one, two = pair(family, host)
    out = socket.socket(family, socket.SOCK_DGRAM)
    out.bind((host, 0))
    with one, two, out:
        for s in (one, two):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        names = {s: mmsg.raw_address(parse_address(address_of(s))) for s in (one, two)}
        outbox = io.Outbox()
        sent = {one: [], two: []}
        for i in range(mmsg.BATCH + 5):  # more than one vector's worth
            target = one if i % 3 else two
            payload = f"datagram {i}".encode() * (i % 4 + 1)
            outbox.add(out.fileno(), payload, names[target])
            sent[target].append(payload)
        outbox.flush()
        outbox.add(out.fileno(), b"alone", names[one])  # a batch of one
        outbox.flush()
        sent[one].append(b"alone")
        for s, payloads in sent.items():
            received = [s.recvfrom(65535) for _ in payloads]
            assert [p for p, _ in received] == payloads
            assert {addr[:2] for _, addr in received} == {out.getsockname()[:2]}


def test_the_peer_key_matches_what_the_kernel_reports():
    receiver, sender = pair(socket.AF_INET, "127.0.0.1")
    with receiver, sender:
        sender.sendto(b"x", receiver.getsockname())
        (_, name), = mmsg.Receiver(receiver).receive()
        key = mmsg.peer_key(parse_address(address_of(sender)))
        other = mmsg.peer_key(parse_address(f"127.0.0.1:{sender.getsockname()[1] ^ 1}"))
        assert name.startswith(key) and not name.startswith(other)


def test_a_refused_datagram_does_not_stop_the_others(io):
    receiver, sender = pair(socket.AF_INET, "127.0.0.1")
    with receiver, sender:
        good = mmsg.raw_address(parse_address(address_of(receiver)))
        port_zero = good[:2] + b"\0\0" + good[4:]  # the kernel refuses it (EINVAL): nothing is sent
        outbox = io.Outbox()
        for payload, name in [(b"a", good), (b"refused", port_zero), (b"b", good)]:
            outbox.add(sender.fileno(), payload, name)
        outbox.flush()
        assert [receiver.recv(100), receiver.recv(100)] == [b"a", b"b"]
