"""Fresh ISNs (_isn): the kernel facts on both capability paths, and what the pool does with them.

The kernel facts are read off the wire: an AF_PACKET capture on loopback
sees each SYN the client sends. Without the reset, a reconnected socket's
ISN is exactly the old ``write_seq + max_window + 2`` (both read from the
capture); after it, the ISN is fresh. The capture and the reset need root
(CI runs as root); the unprivileged path runs in a subprocess whose
bounding set lacks ``CAP_NET_ADMIN``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest

import trio_recycle
from trio_recycle._isn import TCP_REPAIR, fresh_isns, peer_affinity_for, renew_isn

from .checks import listener
from .conftest import TCP_CLOSE, answer_then_close, cycle, tcp_state

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .conftest import StartServer

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="CAP_NET_ADMIN and an AF_PACKET capture need root")

SRC = Path(trio_recycle.__file__).resolve().parent.parent
#: linux/capability.h and linux/prctl.h.
CAP_NET_ADMIN = 12
PR_CAPBSET_DROP = 24
#: asm-generic/socket.h (the socket module lacks it): SO_RCVBUF past rmem_max, for root.
SO_RCVBUFFORCE = 33


@attrs.frozen
class Segment:
    """One TCP segment the capture saw leave a socket on loopback."""

    sport: int
    dport: int
    seq: int
    flags: int
    window: int
    wscale: int | None
    length: int

    @property
    def is_syn(self) -> bool:
        return bool(self.flags & 0x02) and not self.flags & 0x10

    @property
    def end(self) -> int:
        """The sequence number after this segment (SYN and FIN take one each)."""
        return (self.seq + self.length + (self.flags & 0x01) + ((self.flags >> 1) & 0x01)) % 2**32


def _parse(frame: bytes) -> Segment | None:
    ip = frame[14:]  # loopback frames carry a (zeroed) Ethernet header
    if len(ip) >= 40 and ip[0] >> 4 == 4 and ip[9] == socket.IPPROTO_TCP:
        tcp = ip[(ip[0] & 15) * 4 : struct.unpack("!H", ip[2:4])[0]]
    elif len(ip) >= 60 and ip[0] >> 4 == 6 and ip[6] == socket.IPPROTO_TCP:  # no extension headers on loopback
        tcp = ip[40 : 40 + struct.unpack("!H", ip[4:6])[0]]
    else:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    offset = (tcp[12] >> 4) * 4
    window = struct.unpack("!H", tcp[14:16])[0]
    options, wscale, i = tcp[20:offset], None, 0
    while i < len(options) and options[i] != 0:  # kind 0: end of options
        if options[i] == 1:  # NOP
            i += 1
            continue
        if options[i] == 3:  # window scale
            wscale = options[i + 2]
        i += max(options[i + 1], 2)
    return Segment(sport, dport, seq, tcp[13], window, wscale, len(tcp) - offset)


@contextlib.contextmanager
def capture() -> Iterator[socket.socket]:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"no packet capture here: {exc}")
    with sock:
        # Other loopback traffic on the machine shares this buffer.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 24)
        sock.bind(("lo", 0))
        yield sock


def segments(sock: socket.socket, ports: set[int], syns: int) -> list[Segment]:
    """The segments to or from ``ports`` captured so far, up to the ``syns``-th SYN to one of them, in order."""
    sock.settimeout(0.2)
    found: list[Segment] = []
    deadline = time.monotonic() + 5  # bounded: other traffic must not keep us here
    with contextlib.suppress(TimeoutError):
        while time.monotonic() < deadline and sum(s.is_syn and s.dport in ports for s in found) < syns:
            frame, address = sock.recvfrom(65535)
            if address[2] != socket.PACKET_OUTGOING:  # each loopback packet is seen twice
                continue
            segment = _parse(frame)
            if segment is not None and (segment.sport in ports or segment.dport in ports):
                found.append(segment)
    return found


def predicted_isns(found: list[Segment], ports: set[int]) -> list[tuple[int, int]]:
    """For each SYN after the first: (its ISN, the old ``write_seq + max_window + 2``) of the connection before.

    write_seq is where the client's last segment ended; max_window is the
    largest window the server advertised (the SYN-ACK's unscaled, the
    others scaled by the server's window scale).
    """
    pairs: list[tuple[int, int]] = []
    end = max_window = wscale = None
    for s in found:
        if s.dport in ports:  # client -> server
            if s.is_syn and end is not None and max_window is not None:
                pairs.append((s.seq, (end + max_window + 2) % 2**32))
            if s.is_syn:
                max_window = None
            end = s.end
        elif s.flags & 0x02:  # the server's SYN-ACK
            max_window, wscale = s.window, s.wscale or 0
        elif max_window is not None and wscale is not None:
            max_window = max(max_window, s.window << wscale)
    return pairs


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def exchange_and_disconnect(client: socket.socket, server: socket.socket) -> None:
    """Request, answer, the server closes first, EOF read, disconnect: what the pool does."""
    client.connect(server.getsockname())
    peer, _ = server.accept()
    with peer:
        client.sendall(b"q" * 100)
        assert peer.recv(100) == b"q" * 100
        peer.sendall(b"a" * 5000)
    while client.recv(65536):
        pass
    trio_recycle.disconnect(client)
    assert tcp_state(client) == TCP_CLOSE
    client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


@needs_root
def test_fresh_isns_as_root() -> None:
    """With CAP_NET_ADMIN (root on CI) the probe finds the reset works."""
    assert fresh_isns() is True


@needs_root
@pytest.mark.parametrize("reset", [False, True], ids=["without-reset", "after-reset"])
def test_next_isn_after_disconnect(reset: bool, loopback: str) -> None:
    """Without the reset the next SYN's ISN is exactly old write_seq + max_window + 2; after it, it is not."""
    with capture() as sniffer, listener(loopback) as server, socket.socket(family_of(loopback)) as client:
        ports = {server.getsockname()[1]}
        for _ in range(3):
            exchange_and_disconnect(client, server)
            if reset:
                assert renew_isn(client)
        client.connect(server.getsockname())
        server.accept()[0].close()
        pairs = predicted_isns(segments(sniffer, ports, syns=4), ports)
    assert len(pairs) == 3, pairs
    if reset:
        assert all(isn != predicted for isn, predicted in pairs), pairs
    else:
        assert all(isn == predicted for isn, predicted in pairs), pairs


@needs_root
def test_reset_keeps_so_reuseaddr() -> None:
    """Leaving repair mode clears sk_reuse in the kernel: the reset puts SO_REUSEADDR back."""
    with listener() as server, socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        exchange_and_disconnect(client, server)
        assert renew_isn(client)
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        exchange_and_disconnect(client, server)  # and the socket still connects, with a real SYN


@needs_root
def test_reset_of_a_connected_socket_fails_and_leaves_repair_mode() -> None:
    """Outside CLOSE the kernel refuses TCP_QUEUE_SEQ: renew_isn says so, and the connection still works."""
    with listener() as server, socket.socket() as client:
        client.connect(server.getsockname())
        peer, _ = server.accept()
        with peer:
            assert not renew_isn(client)
            # Still in repair mode, send() would queue bytes without sending them.
            client.sendall(b"still here")
            assert peer.recv(100) == b"still here"


@needs_root
def test_reset_of_a_closed_descriptor_fails() -> None:
    """A descriptor that is gone cannot be reset: renew_isn says so (the pool then closes, never reuses)."""
    sock = socket.socket()
    sock.close()
    assert not renew_isn(sock)


async def cycles_on_the_wire(
    start_server: StartServer, order: str, capacity: int
) -> tuple[trio_recycle.PoolStatistics, list[tuple[int, int]]]:
    """Cycle one pool through 127.0.0.1 ("a") and 127.0.0.2 ("b") in ``order``: its statistics and `predicted_isns`."""
    servers = {name: await start_server(answer_then_close, f"127.0.0.{i}") for i, name in enumerate("ab", 1)}
    ports = {server.port for server in servers.values()}
    with capture() as sniffer:
        async with trio_recycle.open_socket_pool(capacity=capacity) as pool:
            assert pool.fresh_isns
            for name in order:
                assert await cycle(pool, servers[name]) == b"ok:ping"
            stats = pool.statistics()
        found = segments(sniffer, ports, syns=len(order))
    return stats, predicted_isns(found, ports)


@needs_root
async def test_pool_with_fresh_isns_reuses_sockets_across_peers(start_server: StartServer) -> None:
    """By default ("auto") a pool with fresh ISNs lets an idle socket serve another peer, at a fresh ISN."""
    stats, pairs = await cycles_on_the_wire(start_server, "abab", capacity=4)
    assert (stats.created, stats.reused) == (1, 3)
    assert len(pairs) == 3, pairs
    assert all(isn != predicted for isn, predicted in pairs), pairs


@needs_root
async def test_the_isn_is_reset_only_before_a_connect_to_another_peer(start_server: StartServer) -> None:
    """The reset is owed at the disconnect and paid at the next connect to another peer: the same peer needs none."""
    stats, pairs = await cycles_on_the_wire(start_server, "aab", capacity=1)
    assert (stats.created, stats.reused) == (1, 2)
    (again, same), (other, predicted) = pairs
    assert again == same  # a to a: the old sequence continues, as with affinity
    assert other != predicted  # a to b: fresh


@needs_root
async def test_peer_affinity_true_forces_affinity(start_server: StartServer) -> None:
    """peer_affinity=True keeps idle sockets to their peer even where ISNs are fresh."""
    a = await start_server(answer_then_close, "127.0.0.1")
    b = await start_server(answer_then_close, "127.0.0.2")
    async with trio_recycle.open_socket_pool(capacity=4, peer_affinity=True) as pool:
        assert pool.fresh_isns
        for server in (a, b, a, b):
            await cycle(pool, server)
        stats = pool.statistics()
    assert (stats.created, stats.reused) == (2, 2)


async def test_pool_without_recycling_has_fresh_isns() -> None:
    """recycle=False never reconnects a socket: every connection has a fresh ISN."""
    async with trio_recycle.open_socket_pool(recycle=False) as pool:
        assert pool.fresh_isns


@pytest.mark.parametrize("value", ["auto", True, False])
def test_peer_affinity_values(value: bool | str) -> None:
    """True and False are taken as given; "auto" means affinity exactly where ISNs are not fresh."""
    expected = (not fresh_isns()) if value == "auto" else value
    assert peer_affinity_for(value) is expected


@pytest.mark.parametrize("value", [1, "yes", None, "Auto"])
def test_peer_affinity_rejects_other_values(value: object) -> None:
    """Anything but a bool or "auto" is a TypeError that names the argument."""
    with pytest.raises(TypeError, match='peer_affinity must be a bool or "auto"'):
        peer_affinity_for(value)


# The unprivileged path: a child process started with CAP_NET_ADMIN out of
# its bounding set (so out of its permitted set after exec, even as root).
_DROP_AND_EXEC = textwrap.dedent(
    f"""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl({PR_CAPBSET_DROP}, {CAP_NET_ADMIN}, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_CAPBSET_DROP): {{os.strerror(ctypes.get_errno())}}")
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
    """
)
_CHILD = textwrap.dedent(
    f"""
    import functools, json, socket, trio, trio_recycle
    from trio_recycle._isn import TCP_REPAIR, fresh_isns, renew_isn

    async def answer(stream):
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"ok")

    async def main():
        result = {{"fresh_isns": fresh_isns()}}
        with socket.socket() as sock:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, {TCP_REPAIR}, 1)
            except PermissionError:
                result["repair"] = "EPERM"
            result["renew_isn"] = renew_isn(sock)
        async with trio.open_nursery() as nursery:
            ports = []
            for host in ("127.0.0.1", "127.0.0.2"):
                listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host=host))
                ports.append((host, listeners[0].socket.getsockname()[1]))
            async with trio_recycle.open_socket_pool(capacity=4) as pool:
                result["pool.fresh_isns"] = pool.fresh_isns
                for host, port in ports * 2:
                    async with await pool.open_tcp_stream(host, port) as stream:
                        await stream.send_all(b"ping")
                        while await stream.receive_some():
                            pass
                stats = pool.statistics()
                result["created"], result["reused"] = stats.created, stats.reused
            nursery.cancel_scope.cancel()
        print(json.dumps(result))

    trio.run(main)
    """
)


@needs_root
def test_without_cap_net_admin_the_pool_keeps_affinity() -> None:
    """Without CAP_NET_ADMIN the probe says False, nothing is tried, and idle sockets keep to their peer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _DROP_AND_EXEC, _CHILD], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "fresh_isns": False,
        "repair": "EPERM",
        "renew_isn": True,
        "pool.fresh_isns": False,
        "created": 2,
        "reused": 2,
    }
