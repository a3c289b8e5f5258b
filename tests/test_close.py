"""read_available and wait_for_fin on real connected sockets."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

import trio_recycle
from trio_recycle import _close as _drain
from trio_recycle._close import READ_BUDGET, read_available, wait_for_fin

from . import checks
from .checks import bytes_queued
from .conftest import drained, time_wait_count

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

_TCP_ESTABLISHED: Final = 1
_TCP_CLOSE_WAIT: Final = 8  # include/net/tcp_states.h


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with checks.listener() as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    return client, server


def test_nothing_queued() -> None:
    """Nothing there: no FIN, nothing read, no blocking."""
    client, server = tcp_pair()
    with client, server:
        assert read_available(client, 100) == (False, 0)


def test_data_then_fin_queued() -> None:
    """Everything up to a queued FIN is read and the FIN is found."""
    client, server = tcp_pair()
    with client:
        server.sendall(b"x" * 1000)
        server.close()
        assert read_available(client, 10_000) == (True, 1000)


def test_stops_past_the_limit() -> None:
    """More than ``limit`` bytes queued: stop past the limit, FIN not seen."""
    client, server = tcp_pair()
    with client, server:
        server.sendall(b"x" * 200_000)
        fin, count = read_available(client, 1000)
        assert not fin
        assert count > 1000


def test_reset_raises() -> None:
    """A reset from the peer surfaces as OSError(ECONNRESET)."""
    client, server = tcp_pair()
    with client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        with pytest.raises(OSError) as info:
            read_available(client, 100)
        assert info.value.errno == errno.ECONNRESET


async def test_wait_for_fin_waits_for_a_late_fin() -> None:
    """wait_for_fin blocks until the peer's FIN, counting the bytes before it."""
    client, server = tcp_pair()
    with client:
        result: list[bool] = []

        async def waiter() -> None:
            result.append(await wait_for_fin(client, 0, 10_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            server.sendall(b"late")
            await trio.testing.wait_all_tasks_blocked()
            assert result == []
            server.close()
        assert result == [True]


async def test_wait_for_fin_gives_up_past_the_limit() -> None:
    """A peer that sends more than the limit: False, without waiting for a FIN."""
    client, server = tcp_pair()
    with client, server:
        server.sendall(b"x" * 5000)
        assert await wait_for_fin(client, 4000, 4500) is False


def test_one_call_reads_at_most_the_budget() -> None:
    """With megabytes queued and a huge limit, one call stops after READ_BUDGET bytes: the loop is not stalled."""
    client, server = tcp_pair()
    with client, server:
        server.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 8 * READ_BUDGET:
                sent += server.send(b"f" * 65536)
        assert sent > READ_BUDGET
        eof, received = read_available(client, 1 << 40)
        assert not eof
        assert 0 < received < READ_BUDGET + 65536  # the last recv() may pass the budget
        assert bytes_queued(client) > 0


def test_fin_behind_the_budget_counts_as_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of budget with the peer's FIN queued behind the rest (CLOSE_WAIT): True, though bytes remain."""
    monkeypatch.setattr(_drain, "READ_BUDGET", 16384)
    client, server = tcp_pair()
    with client, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        server.settimeout(5)
        server.sendall(b"x" * 90_000)
        server.shutdown(socket.SHUT_WR)
        # The kernel offers no event for the FIN's arrival: bounded poll.
        for _ in range(5000):
            if client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT:
                break
            time.sleep(0.001)
        eof, received = read_available(client, 1 << 30)
        assert eof
        assert 0 < received < 90_000
        assert bytes_queued(client) == 90_000 - received


# ----------------------------------------------------------------------
# The drain's second half and its grace, through the public API


@contextlib.asynccontextmanager
async def stalling_listener() -> AsyncIterator[trio.socket.SocketType]:
    """A listener whose connections have a tiny receive window: a client's bytes, then its FIN, wait unsent."""
    sock = trio.socket.socket()
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        await sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        yield sock


async def trio_read_to_end(sock: trio.socket.SocketType) -> int:
    total = 0
    while chunk := await sock.recv(65536):
        total += len(chunk)
    return total


@pytest.mark.parametrize("order", ["crossing", "after_the_peers"])
async def test_drain_disconnects_only_once_our_fin_is_acknowledged(order: str) -> None:
    """EOF seen in CLOSING or LAST_ACK: the socket is recycled only after the peer has all our bytes and our FIN."""
    payload = b"d" * 16000
    options = ((socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20),)
    async with stalling_listener() as lsock, trio_recycle.open_socket_pool(capacity=2, socket_options=options) as pool:
        host, port = lsock.getsockname()
        stream = await pool.open_tcp_stream(host, port)
        server, _ = await lsock.accept()
        with server:
            await stream.send_all(payload)
            if order == "crossing":
                await stream.send_eof()
                server.shutdown(socket.SHUT_WR)
                assert await stream.receive_some() == b""
            else:
                server.shutdown(socket.SHUT_WR)
                assert await stream.receive_some() == b""
                await stream.send_eof()
            await stream.aclose()
            assert pool.statistics().draining == 1
            with trio.fail_after(5):
                assert await trio_read_to_end(server) == len(payload)
        await drained(pool)
        stats = pool.statistics()
        assert (stats.recycled, stats.discarded, stats.idle) == (1, 0, 1)


async def test_grace_lets_a_fin_on_its_way_win() -> None:
    """Closed on the last byte of an answer: our FIN waits, the server's comes first, nobody keeps TIME_WAIT."""
    async with stalling_listener() as lsock, trio_recycle.open_socket_pool(capacity=2) as pool:
        host, port = lsock.getsockname()
        stream = await pool.open_tcp_stream(host, port)
        server, _ = await lsock.accept()
        client_port = server.getpeername()[1]
        with server:
            await server.send(b"answer")
            assert await stream.receive_some() == b"answer"
            await stream.aclose()  # returns at once, before the peer's FIN
            # No FIN from us yet: the server is still ESTABLISHED.
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED
        await drained(pool)
        stats = pool.statistics()
        assert (stats.recycled, stats.discarded) == (1, 0)
        assert time_wait_count(client_port, [port]) == 0
        assert time_wait_count(port, [client_port]) == 0


async def test_our_fin_goes_out_after_the_grace() -> None:
    """A peer that does not close: it gets our FIN after the grace, and its FIN then recycles the socket."""
    async with stalling_listener() as lsock, trio_recycle.open_socket_pool(capacity=2) as pool:
        host, port = lsock.getsockname()
        stream = await pool.open_tcp_stream(host, port)
        server, _ = await lsock.accept()
        with server:
            await stream.aclose()
            started = trio.current_time()
            with trio.fail_after(5):
                assert await server.recv(1) == b""
            assert trio.current_time() - started >= _drain.FIN_GRACE_MIN
        await drained(pool)
        assert pool.statistics().recycled == 1


def test_fin_grace_is_bounded() -> None:
    """The grace follows the round trip within its bounds (on loopback, the lower one unless the machine stalls)."""
    client, server = tcp_pair()
    with client, server:
        assert _drain.FIN_GRACE_MIN <= _drain.fin_grace(client) <= _drain.FIN_GRACE_MAX
        assert not _drain.fin_unacknowledged(client)


async def test_fin_unacknowledged_past_eof_timeout_is_closed_and_still_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Our FIN still unacknowledged at eof_timeout: closed, not recycled, and the kernel still delivers it."""
    payload = b"d" * 16000
    options = ((socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20),)
    async with stalling_listener() as lsock:
        pool_cm = trio_recycle.open_socket_pool(capacity=2, eof_timeout=1, socket_options=options)
        async with pool_cm as pool:
            host, port = lsock.getsockname()
            stream = await pool.open_tcp_stream(host, port)
            server, _ = await lsock.accept()
            with server:
                await stream.send_all(payload)
                server.shutdown(socket.SHUT_WR)
                assert await stream.receive_some() == b""
                await stream.send_eof()  # LAST_ACK, our FIN behind the unsent bytes
                await stream.aclose()
                await drained(pool)  # the server reads nothing for eof_timeout
                stats = pool.statistics()
                assert (stats.recycled, stats.discarded, stats.idle) == (0, 1, 0)
                with trio.fail_after(5):
                    assert await trio_read_to_end(server) == len(payload)
