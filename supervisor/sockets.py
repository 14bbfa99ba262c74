"""The listening sockets, bound once by the supervisor and lent to workers.

One UDP and one TCP socket per worker and address, all with SO_REUSEPORT:
the kernel spreads clients over the workers, and a replacement worker gets
the very sockets (and the packets queued on them) of the one it replaces.
When each worker is pinned to a CPU of its own, a datagram goes to the
worker on the CPU that received it (``steer_by_cpu``).
"""
from __future__ import annotations

import ctypes
import logging
import socket
import struct
from typing import Sequence

from dnsrouter.address import Address
from dnsrouter.errors import ConfigError

log = logging.getLogger("dnsrouter")

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; the socket module lacks it


def receive_buffer(sock: socket.socket, size: int) -> int:
    """Give ``sock`` ``size`` bytes of receive buffer (``[server]
    udp_receive_buffer``), past net.core.rmem_max where the process may
    (CAP_NET_ADMIN, as unbound and NSD do); what the kernel granted, in the
    kernel's accounting (twice what was set)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:  # not root: capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _socket(address: Address, kind: int) -> socket.socket:
    sock = socket.socket(address.family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from None
    return sock


def bind(addresses: Sequence[Address], workers: int, cpus: Sequence[int | None] = (), *,
         udp_buffer: int) -> list[tuple[list[socket.socket], list[socket.socket]]]:
    """(udp sockets, tcp sockets) for each worker; with ``cpus`` (the CPU
    each worker is pinned to, None where not: ``[server] socket_affinity``),
    UDP steered by CPU. Each UDP socket holds ``udp_buffer`` bytes of
    datagrams: what absorbs bursts while a worker is busy or restarting."""
    out = []
    try:
        for _ in range(workers):
            out.append(([_socket(a, socket.SOCK_DGRAM) for a in addresses],
                        [_socket(a, socket.SOCK_STREAM) for a in addresses]))
    except ConfigError:
        for udp, tcp in out:
            for sock in udp + tcp:
                sock.close()
        raise
    granted = min((receive_buffer(sock, udp_buffer) for udp, _ in out for sock in udp), default=2 * udp_buffer)
    if granted < 2 * udp_buffer:
        log.warning("[server] udp_receive_buffer: the kernel gave %d of the %d bytes asked "
                    "(raise net.core.rmem_max, or start as root)", granted // 2, udp_buffer)
    if cpus:
        program = cpu_program(cpus)
        if not program:
            log.warning("socket_affinity needs every worker pinned to a CPU of its own (cpu_affinity): "
                        "datagrams are spread by hash")
        for i in range(len(addresses) if program else 0):
            steer_by_cpu([udp[i] for udp, _ in out], program)
    return out


# <linux/filter.h>: classic BPF, as SO_ATTACH_REUSEPORT_CBPF takes it.
SO_ATTACH_REUSEPORT_CBPF = 51
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_MAX_INSNS = 4096  # BPF_MAXINSNS
_CPU = (-0x1000 + 36) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_CPU: the CPU the packet is processed on
_HASH = 0xFFFFFFFF  # an index past the group: the kernel picks by hash, as without a program


def cpu_program(cpus: Sequence[int | None]) -> list[tuple[int, int, int, int]]:
    """The classic BPF program that sends a datagram received on CPU c to
    the socket of the worker pinned to c (the group holds worker i's socket
    at index i, in the order they were bound); other CPUs' datagrams, by
    hash. Empty unless every worker has a CPU of its own."""
    pinned = [cpu for cpu in cpus if cpu is not None]
    if not pinned or len(set(pinned)) != len(cpus) or 2 * len(pinned) + 2 > _MAX_INSNS:
        return []
    program = [(_LD_W_ABS, 0, 0, _CPU)]
    for index, cpu in enumerate(pinned):
        program += [(_JEQ_K, 0, 1, cpu), (_RET_K, 0, 0, index)]
    return program + [(_RET_K, 0, 0, _HASH)]


def steer_by_cpu(group: Sequence[socket.socket], program: list[tuple[int, int, int, int]]) -> None:
    """Attach a ``cpu_program`` to a SO_REUSEPORT group (one socket of it
    carries it for all): the worker that takes a datagram is the one the
    CPU that received it runs, so no other CPU is woken for it, and the
    datagram's data is still in that CPU's cache. That is the CPU a network
    card's queue interrupts (RSS), or on loopback the sender's. A kernel
    that refuses the program leaves the hash, and the log says so."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    try:
        group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as e:
        log.warning("datagrams are spread by hash, not by CPU: %s", e.strerror or e)
