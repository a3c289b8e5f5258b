"""The close-instead fallback, and sockets whose disconnect fails."""

# On Linux the fallback is reached two ways, both tested here: the pool
# option recycle=False, and TRIO_RECYCLE_DISABLE=1, which makes
# can_recycle() answer False exactly as it does on macOS, the BSDs and
# Windows. A disconnect that fails (EOPNOTSUPP on a kTLS socket, EBUSY on
# kernels ~6.4 to 6.6-rc5 while another thread blocks on the socket) cannot
# be provoked on demand, so it is injected where the pool calls it:
# trio_recycle._pooled_socket.disconnect.

from __future__ import annotations

import errno
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_recycle
from trio_recycle import SocketPool, _disconnect, _pooled_socket
from trio_recycle._disconnect import DISABLE_ENV_VAR

from .checks import assert_capacity, assert_idle_disconnected, fd_inodes
from .conftest import Server, StartServer, UDPPeer, answer_then_close, cycle, drained, read_until_eof

if TYPE_CHECKING:
    import socket

OpenPool = Callable[..., AbstractAsyncContextManager[SocketPool]]


def socket_inodes() -> set[str]:
    return {target for target in fd_inodes().values() if target.startswith("socket:")}


async def server_finished(server: Server, connections: int) -> None:
    """Wait until the server has closed its side of that many connections."""
    while server.finished < connections:
        await server.finished_event.wait()


@pytest.fixture(params=["recycle_false", "env_var"])
def open_fallback_pool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> OpenPool:
    """open_socket_pool forced into the fallback by the pool option or by the environment."""
    if request.param == "env_var":
        monkeypatch.setenv(DISABLE_ENV_VAR, "1")
        return trio_recycle.open_socket_pool
    return partial(trio_recycle.open_socket_pool, recycle=False)


async def udp_echo(peer: trio.socket.SocketType) -> None:
    """Answer every datagram with ``re:<datagram>``, then junk its sender never reads."""
    while True:
        data, source = await peer.recvfrom(65536)
        await peer.sendto(b"re:" + data, source)
        await peer.sendto(b"junk", source)


async def udp_exchange(pool: SocketPool, peer: trio.socket.SocketType, payload: bytes) -> bytes:
    port: int = peer.getsockname()[1]
    async with await pool.open_udp_socket(peer.getsockname()[0], port) as udp:
        await udp.send(payload)
        return await udp.receive()


# ----------------------------------------------------------------------
# Switching recycling off


def test_env_var_switches_can_recycle_off_even_after_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRIO_RECYCLE_DISABLE is read on every call, before the cached probe; "" and "0" mean not set."""
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    assert trio_recycle.can_recycle()  # probes (this suite runs on Linux) and caches
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    assert not trio_recycle.can_recycle()
    for value in ("", "0"):
        monkeypatch.setenv(DISABLE_ENV_VAR, value)
        assert trio_recycle.can_recycle()
    monkeypatch.setenv(DISABLE_ENV_VAR, "yes")
    assert not trio_recycle.can_recycle()


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "on", " On "])
def test_env_var_true_spellings_disable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """The usual spellings of true, in any case, disable recycling without a warning."""
    monkeypatch.setenv(DISABLE_ENV_VAR, value)
    assert not trio_recycle.can_recycle()  # filterwarnings = error: a warning would fail


@pytest.mark.parametrize("value", ["", "0", "false", "FALSE", "no", "No", "off", "OFF "])
def test_env_var_false_spellings_keep_recycling(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """0, false, no, off (any case) and the empty string mean not set."""
    monkeypatch.setenv(DISABLE_ENV_VAR, value)
    assert trio_recycle.can_recycle()


def test_env_var_unknown_value_warns_once_and_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that is neither true nor false disables, with one RuntimeWarning naming the variable."""
    monkeypatch.setattr(_disconnect, "_warned_values", set())
    monkeypatch.setenv(DISABLE_ENV_VAR, "maybe")
    with pytest.warns(RuntimeWarning, match=r"TRIO_RECYCLE_DISABLE='maybe' is not one of") as record:
        assert not trio_recycle.can_recycle()
    assert record[0].filename == __file__  # points at the caller of can_recycle()
    # Once per value: filterwarnings = error turns a second warning into a failure.
    assert not trio_recycle.can_recycle()
    monkeypatch.setenv(DISABLE_ENV_VAR, "2")
    with pytest.warns(RuntimeWarning, match="'2'"):
        assert not trio_recycle.can_recycle()


async def test_pool_reports_the_fallback(open_fallback_pool: OpenPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool opened in the fallback says so; one opened without it recycles."""
    async with open_fallback_pool() as pool:
        assert not pool.recycling
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    async with trio_recycle.open_socket_pool() as pool:
        assert pool.recycling


# ----------------------------------------------------------------------
# The same behaviours in the fallback, with nothing recycled


async def test_fallback_tcp_cycles(open_fallback_pool: OpenPool, start_server: StartServer, loopback: str) -> None:
    """Sequential and concurrent TCP cycles work; every socket is new and closed after use."""
    server = await start_server(answer_then_close, loopback)
    before = socket_inodes()
    async with open_fallback_pool(capacity=3) as pool:
        for i in range(5):
            assert await cycle(pool, server, b"seq%d" % i) == b"ok:seq%d" % i
            assert pool.statistics().idle == 0

        async def worker(n: int) -> None:
            for i in range(10):
                payload = b"%d.%d" % (n, i)
                assert await cycle(pool, server, payload) == b"ok:" + payload
                assert_capacity(pool)

        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(worker, n)
        stats = pool.statistics()
        assert (stats.recycled, stats.reused, stats.idle, stats.in_use, stats.draining) == (0, 0, 0, 0, 0)
        assert stats.created == stats.discarded == 65
    assert socket_inodes() <= before


async def test_fallback_udp(open_fallback_pool: OpenPool, udp_peer: UDPPeer, loopback: str) -> None:
    """UDP sockets work in the fallback: each open makes a socket, each close closes it."""
    peer = await udp_peer(loopback)
    before = socket_inodes()
    async with trio.open_nursery() as nursery, open_fallback_pool(capacity=2) as pool:
        nursery.start_soon(udp_echo, peer)
        for i in range(5):
            assert await udp_exchange(pool, peer, b"u%d" % i) == b"re:u%d" % i
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.recycled, stats.reused, stats.idle) == (5, 5, 0, 0, 0)
        nursery.cancel_scope.cancel()
    assert socket_inodes() <= before


async def test_fallback_tcp_and_udp_share_capacity_and_wait(
    open_fallback_pool: OpenPool, start_server: StartServer, udp_peer: UDPPeer
) -> None:
    """Capacity counts TCP and UDP together, and a waiter gets the slot a closed socket frees."""
    server = await start_server(answer_then_close)
    peer = await udp_peer()
    before = socket_inodes()
    async with open_fallback_pool(capacity=2) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        udp = await pool.open_udp_socket("127.0.0.1", peer.getsockname()[1])
        served: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                served.append(await cycle(pool, server, b"waited"))

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 1
            await udp.aclose()
        assert served == [b"ok:waited"]
        await stream.send_all(b"held")
        assert await read_until_eof(stream) == b"ok:held"
        await stream.aclose()
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.recycled, stats.reused) == (3, 3, 0, 0)
    assert socket_inodes() <= before


async def test_fallback_close_before_eof_does_not_drain(
    open_fallback_pool: OpenPool, start_server: StartServer
) -> None:
    """A stream closed before the peer's FIN is closed at once: nothing waits in the background."""
    server = await start_server(answer_then_close)
    before = socket_inodes()
    async with open_fallback_pool() as pool:
        async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(b"x")
        stats = pool.statistics()
        assert (stats.draining, stats.discarded, stats.recycled) == (0, 1, 0)
    await server_finished(server, 1)
    assert socket_inodes() <= before


async def test_fallback_pool_exit_closes_open_sockets(
    open_fallback_pool: OpenPool, start_server: StartServer, udp_peer: UDPPeer
) -> None:
    """Leaving the block closes the TCP streams and UDP sockets still open, in the fallback too."""
    server = await start_server(answer_then_close)
    peer = await udp_peer()
    before = socket_inodes()
    async with open_fallback_pool() as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        udp = await pool.open_udp_socket("127.0.0.1", peer.getsockname()[1])
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"late")
    with pytest.raises(trio.ClosedResourceError):
        await udp.send(b"late")
    assert pool.statistics().discarded == 2
    await server_finished(server, 1)
    assert socket_inodes() <= before


# ----------------------------------------------------------------------
# Disconnect failures, injected at the boundary


def failing_disconnect(code: int, victims: set[int] | None = None) -> Callable[[socket.socket], None]:
    """A disconnect() that fails with ``code`` (only for these fds when ``victims`` is given)."""
    real = trio_recycle.disconnect

    def disconnect(sock: socket.socket) -> None:
        if victims is None or sock.fileno() in victims:
            raise OSError(code, f"injected: {errno.errorcode[code]}")
        real(sock)

    return disconnect


FAILURES = [pytest.param(errno.EOPNOTSUPP, id="EOPNOTSUPP-ktls"), pytest.param(errno.EBUSY, id="EBUSY-6.4-6.6")]


@pytest.mark.parametrize("code", FAILURES)
async def test_failed_tcp_disconnect_discards_the_socket(
    code: int, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TCP socket whose disconnect fails is closed and counted; the pool carries on."""
    server = await start_server(answer_then_close)
    before = socket_inodes()
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        monkeypatch.setattr(_pooled_socket, "disconnect", failing_disconnect(code))
        for i in range(3):
            assert await cycle(pool, server, b"%d" % i) == b"ok:%d" % i
            stats = pool.statistics()
            assert (stats.created, stats.discarded, stats.recycled, stats.idle) == (i + 1, i + 1, 0, 0)
            assert_capacity(pool)
        monkeypatch.undo()
        assert await cycle(pool, server) == b"ok:ping"
        assert await cycle(pool, server) == b"ok:ping"
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.recycled, stats.reused) == (4, 3, 2, 1)
        assert_idle_disconnected(pool)
    assert socket_inodes() <= before


@pytest.mark.parametrize("code", FAILURES)
async def test_failed_udp_disconnect_discards_the_socket(
    code: int, udp_peer: UDPPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UDP socket whose disconnect fails is closed and counted; the pool carries on."""
    peer = await udp_peer()
    before = socket_inodes()
    async with trio.open_nursery() as nursery, trio_recycle.open_socket_pool(capacity=1) as pool:
        nursery.start_soon(udp_echo, peer)
        monkeypatch.setattr(_pooled_socket, "disconnect", failing_disconnect(code))
        for i in range(3):
            assert await udp_exchange(pool, peer, b"%d" % i) == b"re:%d" % i
            stats = pool.statistics()
            assert (stats.created, stats.discarded, stats.recycled, stats.idle) == (i + 1, i + 1, 0, 0)
        monkeypatch.undo()
        assert await udp_exchange(pool, peer, b"a") == b"re:a"
        assert await udp_exchange(pool, peer, b"b") == b"re:b"
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.recycled, stats.reused) == (4, 3, 2, 1)
        assert_idle_disconnected(pool)
        nursery.cancel_scope.cancel()
    assert socket_inodes() <= before


async def test_failed_disconnect_after_a_drain_discards_the_socket(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disconnect failing in the background drain (closed before EOF) closes the socket too."""
    server = await start_server(answer_then_close)
    before = socket_inodes()
    monkeypatch.setattr(_pooled_socket, "disconnect", failing_disconnect(errno.EBUSY))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(b"x")
            assert await stream.receive_some() == b"ok:x"
        await drained(pool)
        stats = pool.statistics()
        assert (stats.discarded, stats.recycled, stats.idle, stats.draining) == (1, 0, 0, 0)
        assert await cycle(pool, server) == b"ok:ping"
    assert socket_inodes() <= before


async def test_one_failing_socket_does_not_stop_the_others(
    start_server: StartServer, udp_peer: UDPPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the socket whose disconnect fails is discarded; the pool keeps recycling the rest."""
    server = await start_server(answer_then_close)
    peer = await udp_peer()
    victims: set[int] = set()
    monkeypatch.setattr(_pooled_socket, "disconnect", failing_disconnect(errno.EBUSY, victims))
    async with trio.open_nursery() as nursery, trio_recycle.open_socket_pool(capacity=4) as pool:
        nursery.start_soon(udp_echo, peer)
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        victims.add(stream._sock.fileno())
        udp_port: int = peer.getsockname()[1]
        udp = await pool.open_udp_socket("127.0.0.1", udp_port)
        victims.add(udp._sock.fileno())
        for _ in range(3):  # a healthy TCP and a healthy UDP socket, recycled
            assert await cycle(pool, server) == b"ok:ping"
            assert await udp_exchange(pool, peer, b"ok") == b"re:ok"
        await stream.send_all(b"victim")
        assert await read_until_eof(stream) == b"ok:victim"
        await stream.aclose()
        await udp.aclose()
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.recycled, stats.reused) == (4, 2, 6, 4)
        assert_capacity(pool)
        assert_idle_disconnected(pool)
        victims.clear()  # the numbers may be reused by new sockets
        assert await cycle(pool, server) == b"ok:ping"
        nursery.cancel_scope.cancel()
