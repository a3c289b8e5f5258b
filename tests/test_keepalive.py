"""Keep-alive: release(), parked connections, the watch, expiry, per-peer limits (I1, I2, I4-I6, I9)."""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_recycle

from . import checks
from .checks import (
    assert_capacity,
    assert_idle_disconnected,
    assert_parked_clean,
    fd_inodes,
    parked_sockets,
    socket_inode,
)
from .conftest import (
    TCP_CLOSE,
    KeepAlive,
    ResolveNames,
    Server,
    StartServer,
    drained,
    exchange,
    keep_alive,
    tcp_state,
    time_wait_count,
    wait_for_time_wait,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_recycle import RecyclingStream, SocketPool

#: A valid-looking second answer: what response-queue poisoning would
#: make the next owner read as the answer to its own request.
POISON = b"666.1:not your answer\n"


async def until(predicate: Callable[[], bool], limit: float = 2.0) -> float:
    """Wait (bounded) until ``predicate()`` holds; return the seconds it took.

    For what the kernel does on its own (a FIN arriving from another
    task's close): trio has no event for it, so poll briefly.
    """
    start = trio.current_time()
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - what the kernel does has no trio Event
            await trio.sleep(0.001)
    return trio.current_time() - start


def check(pool: SocketPool) -> None:
    assert_capacity(pool)
    assert_idle_disconnected(pool)
    assert_parked_clean(pool)


# ----------------------------------------------------------------------
# Release and take


async def test_release_parks_and_the_next_open_continues_the_connection(
    start_server: StartServer, loopback: str, recycle: bool
) -> None:
    """I1 across live reuse: each exchange gets its own answer, numbered in order on one connection."""
    config = KeepAlive()
    server = await start_server(keep_alive(config), loopback)
    async with trio_recycle.open_socket_pool(capacity=2, recycle=recycle) as pool:
        for n in range(1, 6):
            stream = await pool.open_tcp_stream(loopback, server.port)
            assert stream.kept_alive is (n > 1)
            assert await exchange(stream, b"request %d" % n) == (1, n, b"request %d" % n)
            await stream.release()
            check(pool)
            stats = pool.statistics()
            assert (stats.parked, stats.in_use, stats.idle) == (1, 0, 0)
        stats = pool.statistics()
        assert (stats.created, stats.kept_alive, stats.not_parked) == (1, 4, 0)
    assert server.accepted == 1


async def test_concurrent_exchanges_never_see_each_others_answers(start_server: StartServer) -> None:
    """I1 with many tasks sharing parked connections: every answer carries the task's own request."""
    config = KeepAlive(requests=7)  # and the server closes now and then
    server = await start_server(keep_alive(config))
    exchanges: dict[int, list[int]] = {}
    async with trio_recycle.open_socket_pool(capacity=4) as pool:

        async def worker(n: int) -> None:
            for i in range(30):
                request = b"task %d exchange %d" % (n, i)
                stream = await pool.open_tcp_stream(server.host, server.port)
                try:
                    conn, number, echoed = await exchange(stream, request)
                except EOFError:
                    assert stream.kept_alive  # the server's close raced this request
                    await stream.aclose()
                    continue
                assert echoed == request
                exchanges.setdefault(conn, []).append(number)
                await stream.release()
                check(pool)

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(worker, n)
        stats = pool.statistics()
        assert stats.kept_alive > 0
        assert stats.recycled > 0  # connections the server closed, disconnected and reused
    for numbers in exchanges.values():
        assert numbers == list(range(1, len(numbers) + 1))


async def test_released_handle_is_dead_and_cannot_reach_the_next_owner(start_server: StartServer) -> None:
    """I2: after release() every call raises ClosedResourceError, while the connection serves another stream."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        old = await pool.open_tcp_stream(server.host, server.port)
        await exchange(old, b"one")
        await old.release()
        new = await pool.open_tcp_stream(server.host, server.port)
        assert new.kept_alive
        with pytest.raises(trio.ClosedResourceError):
            await old.send_all(b"stale\n")
        with pytest.raises(trio.ClosedResourceError):
            await old.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await old.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await old.wait_send_all_might_not_block()
        with pytest.raises(trio.ClosedResourceError):
            old.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with pytest.raises(trio.ClosedResourceError):
            old.getpeername()
        await old.release()  # again: nothing happens
        await old.aclose()
        assert await exchange(new, b"two") == (1, 2, b"two")
        assert server.received == [b"one", b"two"]
        await new.release()
        assert pool.statistics().parked == 1


async def test_release_wakes_a_task_blocked_in_the_stream_and_does_not_park(start_server: StartServer) -> None:
    """A task blocked in receive_some gets ClosedResourceError; a stream in use by another task is not parked."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.release()
        stats = pool.statistics()
        assert (stats.parked, stats.not_parked) == (0, 1)
        await drained(pool)
        check(pool)


async def test_release_and_take_are_checkpoints_and_cancellation_leaks_nothing(start_server: StartServer) -> None:
    """I6: a cancelled release() still parks; a cancelled open takes nothing; both are checkpoints."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await exchange(stream, b"one")
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.release()
        assert scope.cancelled_caught
        assert pool.statistics().parked == 1
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.open_tcp_stream(server.host, server.port)
        assert scope.cancelled_caught
        assert pool.statistics().parked == 1
        with trio.testing.assert_checkpoints():
            stream = await pool.open_tcp_stream(server.host, server.port)
        assert stream.kept_alive
        await exchange(stream, b"two")
        with trio.testing.assert_checkpoints():
            await stream.release()
        check(pool)
        assert server.received == [b"one", b"two"]
        assert server.accepted == 1


async def test_conformance_of_a_kept_alive_stream(start_server: StartServer) -> None:
    """trio's HalfCloseableStream checks pass on a stream that continues a released connection."""
    with checks.listener() as sock:
        port = sock.getsockname()[1]
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio_recycle.open_socket_pool(capacity=4) as pool:

            async def make_pair() -> tuple[RecyclingStream, trio.SocketStream]:
                first = await pool.open_tcp_stream("127.0.0.1", port)
                server_side = await listener.accept()
                await first.release()
                stream = await pool.open_tcp_stream("127.0.0.1", port)
                assert stream.kept_alive
                return stream, server_side

            async def client_first() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
                return await make_pair()

            async def server_first() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
                client, server_side = await make_pair()
                return server_side, client

            await trio.testing.check_half_closeable_stream(client_first, None)
            await trio.testing.check_half_closeable_stream(server_first, None)
        await listener.aclose()


# ----------------------------------------------------------------------
# What release() refuses to park


async def test_release_with_bytes_past_the_answer_closes_instead(start_server: StartServer) -> None:
    """Response-queue poisoning at release(): a second answer queued behind the first is never handed on."""
    config = KeepAlive(trailer=POISON)
    server = await start_server(keep_alive(config))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert await exchange(stream, b"one") == (1, 1, b"one")
        await until(lambda: _queued(stream) > 0)
        await stream.release()
        stats = pool.statistics()
        assert (stats.parked, stats.not_parked) == (0, 1)
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert not stream.kept_alive
        assert await exchange(stream, b"two") == (2, 1, b"two")
        await stream.aclose()
        check(pool)


def _queued(stream: RecyclingStream) -> int:
    import fcntl
    import termios

    buf = fcntl.ioctl(stream._sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


@pytest.mark.parametrize("when", ["waiting", "on_entry"])
async def test_release_after_a_cancelled_receive_does_not_park(start_server: StartServer, when: str) -> None:
    """I1: a receive cut short by a timeout leaves an answer on its way; the next owner must never read it."""
    answer = trio.Event()

    async def late_answers(stream: trio.SocketStream, server: Server) -> None:
        conn = server.new_id()
        exchange = 0
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stream.receive_some()
                if not data:
                    return
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            exchange += 1
            await answer.wait()
            await stream.send_all(b"%d.%d:%s\n" % (conn, exchange, line))

    server = await start_server(late_answers)
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await stream.send_all(b"slow\n")
        with trio.move_on_after(0.05) as timeout:
            if when == "on_entry":
                timeout.cancel()
            await stream.receive_some()
        assert timeout.cancelled_caught
        await stream.release()
        stats = pool.statistics()
        assert (stats.parked, stats.not_parked) == (0, 1)
        answer.set()
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert not stream.kept_alive
        assert await exchange(stream, b"mine") == (2, 1, b"mine")
        await stream.aclose()
        await drained(pool)
        check(pool)


@pytest.mark.parametrize("how", ["eof_seen", "eof_sent", "send_cut", "broken"])
async def test_release_of_an_unclean_stream_runs_the_close_protocol(start_server: StartServer, how: str) -> None:
    """An EOF seen or sent, a send cut short, or an error: release() closes like aclose() and counts it."""
    # The server stops reading after its first answer until `stalled` is
    # set, so that a big send_all blocks and can be cut short.
    stalled = trio.Event()
    config = KeepAlive(requests=1 if how == "eof_seen" else None, late=(stalled, b"") if how == "send_cut" else None)
    server = await start_server(keep_alive(config))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await exchange(stream, b"one")
        if how == "eof_seen":
            assert await stream.receive_some() == b""
        elif how == "eof_sent":
            await stream.send_eof()
        elif how == "send_cut":
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream.send_all, b"x" * 20_000_000)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            assert stream._send_cut
        else:
            stream._healthy = False  # what a failed system call leaves behind
        await stream.release()
        stats = pool.statistics()
        assert (stats.parked, stats.not_parked) == (0, 1)
        stalled.set()
        await drained(pool)
        check(pool)
        if how == "broken":
            assert pool.statistics().discarded == 1
        else:
            assert pool.statistics().idle == 1


async def test_user_options_are_restored_before_parking(start_server: StartServer) -> None:
    """A restorable option set through one stream is back to the pool's value for the next one."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        await exchange(stream, b"one")
        await stream.release()
        assert pool.statistics().parked == 1
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert stream.kept_alive
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        await stream.release()


@pytest.mark.parametrize(
    ("level", "option", "value"),
    [
        (socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000),  # undone only by a disconnect
        (socket.SOL_SOCKET, socket.SO_RCVBUF, 65536),  # not restorable at all
    ],
)
async def test_options_that_cannot_be_undone_keep_the_connection_from_parking(
    start_server: StartServer, level: int, option: int, value: int
) -> None:
    """TCP_MAXSEG on a live connection, or an unrestorable option: not parked."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        stream.setsockopt(level, option, value)
        await exchange(stream, b"one")
        await stream.release()
        assert (pool.statistics().parked, pool.statistics().not_parked) == (0, 1)
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert not stream.kept_alive
        await stream.aclose()


@pytest.mark.parametrize("same_open", [True, False], ids=["same open", "other open"])
async def test_release_while_a_task_waits(start_server: StartServer, same_open: bool) -> None:
    """A waiter of the same open is handed the live connection; for any other, nothing is parked."""
    server = await start_server(keep_alive(KeepAlive()))
    host = server.host if same_open else "127.000.000.001"  # the same address, another open
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await exchange(stream, b"one")
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                other = await pool.open_tcp_stream(host, server.port)
                assert other.kept_alive is same_open
                expected = (1, 2, b"two") if same_open else (2, 1, b"two")
                assert await exchange(other, b"two") == expected
                await other.release()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 1
            await stream.release()
        stats = pool.statistics()
        assert (stats.not_parked, stats.parked, stats.kept_alive) == (0, 1, 1) if same_open else (1, 1, 0)
        check(pool)


async def test_release_of_a_reset_connection_is_not_handed_to_a_waiter() -> None:
    """A waiter of the same open never gets a connection the peer has reset: it gets a fresh one."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: an RST, no FIN
            (psock,) = checks.sockets_in(pool, checks.State.IN_USE)
            # TCP_INFO, not SO_ERROR or a peek: those would consume the pending error.
            await until_kernel(lambda: tcp_state(psock.sock) == TCP_CLOSE)
            got: list[RecyclingStream] = []
            async with trio.open_nursery() as nursery:

                async def waiter() -> None:
                    got.append(await pool.open_tcp_stream("127.0.0.1", port))

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().tasks_waiting == 1
                await stream.release()
            (other,) = got
            assert not other.kept_alive
            fresh, _ = listener.accept()
            with fresh:
                await other.send_all(b"fresh")
                assert fresh.recv(5) == b"fresh"
                stats = pool.statistics()
                # The peek took the reset's error; the close protocol then reads
                # EOF from the CLOSE state and recycles the socket for the waiter.
                assert (stats.kept_alive, stats.not_parked, stats.recycled, stats.created) == (0, 1, 1, 1)
                await other.aclose()
            check(pool)


# ----------------------------------------------------------------------
# Taking: the liveness check


async def _park_one(pool: SocketPool, listener: socket.socket) -> socket.socket:
    port = listener.getsockname()[1]
    stream = await pool.open_tcp_stream("127.0.0.1", port)
    conn, _ = listener.accept()
    await stream.release()
    assert pool.statistics().parked == 1
    return conn


async def test_take_finds_the_peer_gone_and_connects_afresh() -> None:
    """A FIN that arrived since the watch last ran: disconnected, connected again in the same open."""
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            conn = await _park_one(pool, listener)
            # Closed and taken in one task step: the watch cannot run in between.
            conn.close()
            (psock,) = checks.sockets_in(pool, checks.State.PARKED)
            await until_kernel(lambda: _peek(psock.sock) == b"")
            stream = await pool.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
            assert not stream.kept_alive
            fresh, _ = listener.accept()
            await stream.send_all(b"hello")
            assert fresh.recv(5) == b"hello"
            stats = pool.statistics()
            assert (stats.created, stats.recycled, stats.reused, stats.kept_alive) == (1, 1, 1, 0)
            await stream.aclose()
            fresh.close()


async def test_take_finds_the_peer_gone_with_recycle_off_and_opens_a_fresh_socket() -> None:
    """recycle=False: a parked connection whose peer closed is closed at take and the open gets a new socket."""
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(capacity=1, recycle=False) as pool:
            conn = await _park_one(pool, listener)
            conn.close()
            (psock,) = checks.sockets_in(pool, checks.State.PARKED)
            await until_kernel(lambda: _peek(psock.sock) == b"")
            stream = await pool.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
            assert not stream.kept_alive
            fresh, _ = listener.accept()
            await stream.send_all(b"hello")
            assert fresh.recv(5) == b"hello"
            stats = pool.statistics()
            assert (stats.created, stats.recycled, stats.discarded, stats.in_use) == (2, 0, 1, 1)
            await stream.aclose()
            fresh.close()


async def test_take_finds_the_peer_gone_and_the_reconnect_fails() -> None:
    """A reconnect at take that is refused raises OSError to that open and frees its place (I4, I10)."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            conn = await _park_one(pool, listener)
            conn.close()
            listener.close()
            (psock,) = checks.sockets_in(pool, checks.State.PARKED)
            await until_kernel(lambda: _peek(psock.sock) == b"")
            with pytest.raises(OSError, match="all attempts to connect") as info:
                await pool.open_tcp_stream("127.0.0.1", port)
            assert info.value.errno == errno.ECONNREFUSED
            stats = pool.statistics()
            assert (stats.in_use, stats.parked, stats.idle, stats.discarded) == (0, 0, 0, 1)
            check(pool)


async def test_take_finds_unsolicited_bytes_and_never_hands_them_on() -> None:
    """Response-queue poisoning at take: bytes queued on a parked connection close it; the open gets a fresh one."""
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            conn = await _park_one(pool, listener)
            conn.sendall(POISON)
            (psock,) = checks.sockets_in(pool, checks.State.PARKED)
            await until_kernel(lambda: _peek(psock.sock) == POISON[:1])
            stream = await pool.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
            assert not stream.kept_alive
            fresh, _ = listener.accept()
            fresh.sendall(b"yours\n")
            assert await stream.receive_some() == b"yours\n"
            assert pool.statistics().not_parked == 0
            await stream.aclose()
            fresh.close()
            conn.close()


async def until_kernel(predicate: Callable[[], bool]) -> None:
    """Wait, without a checkpoint of the pool's watcher in between, until the kernel has delivered."""
    for _ in range(1000):
        if predicate():
            return
        os.sched_yield()
    pytest.fail("the kernel did not deliver in time")  # pragma: no cover


def _peek(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return None


# ----------------------------------------------------------------------
# The watch


async def test_peer_close_while_parked_is_idle_within_50_ms(
    start_server: StartServer, loopback: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The server's idle timeout: the parked connection is disconnected at once; no TIME_WAIT anywhere.

    "At once" without a stopwatch: on the mock clock, the watch has acted
    as soon as every task waits, with no time passing (no timer of its own
    is involved, so a busy machine cannot make it late).
    """
    server = await start_server(keep_alive(KeepAlive(idle=0.05)), loopback)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(loopback, server.port)
        client_port = stream.getsockname()[1]
        await exchange(stream, b"one")
        await stream.release()
        finished = server.finished
        await until(lambda: server.finished > finished)
        closed_at = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().idle == 1
        assert trio.current_time() == closed_at
        stats = pool.statistics()
        assert (stats.parked, stats.recycled, stats.discarded) == (0, 1, 0)
        check(pool)
        # Only this connection's entry: bind(0) may hand the server a port
        # on which an earlier test's connections left TIME_WAIT entries.
        assert time_wait_count(server.port, remote_ports={client_port}) == 0
        stream = await pool.open_tcp_stream(loopback, server.port)
        assert not stream.kept_alive
        assert pool.statistics().reused == 1
        await stream.aclose()


async def test_watch_closes_a_connection_that_gets_unsolicited_bytes(
    start_server: StartServer, autojump_clock: trio.testing.MockClock
) -> None:
    """Response-queue poisoning while parked: the watch closes the connection; nobody reads the bytes.

    On the mock clock: the watch has closed it once every task waits, with no time passing.
    """
    late = trio.Event()
    server = await start_server(keep_alive(KeepAlive(late=(late, POISON))))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await exchange(stream, b"one")
        await stream.release()
        late.set()
        sent_at = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().parked == 0
        assert trio.current_time() == sent_at
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert not stream.kept_alive
        assert await exchange(stream, b"two") == (2, 1, b"two")
        await stream.aclose()
        await drained(pool)
        check(pool)


async def test_watch_closes_a_connection_that_is_reset(start_server: StartServer) -> None:
    """An error on a parked connection (the peer's RST): closed, the slot free again."""
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            conn = await _park_one(pool, listener)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            await until(lambda: pool.statistics().parked == 0)
            stats = pool.statistics()
            assert (stats.discarded, stats.idle) == (1, 0)
            check(pool)


async def test_expiry_closes_politely(start_server: StartServer, autojump_clock: trio.testing.MockClock) -> None:
    """After keepalive_expiry: our FIN, the server's FIN, and the socket recycled; not a moment before."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=2, keepalive_expiry=10) as pool:
        for _ in range(2):
            stream = await pool.open_tcp_stream(server.host, server.port)
            await exchange(stream, b"x")
            await stream.release()
            await trio.sleep(6)
        # The first expired at 10 s, the second, parked at 6 s, not yet.
        assert pool.statistics().parked == 1
        await trio.sleep(3.9)
        assert pool.statistics().parked == 1
        await trio.sleep(0.2)
        assert pool.statistics().parked == 0
        await drained(pool)
        stats = pool.statistics()
        assert (stats.idle, stats.recycled, stats.discarded) == (1, 1, 0)
        assert server.accepted == 1
        check(pool)


async def test_take_never_hands_out_a_connection_past_its_expiry(
    start_server: StartServer, autojump_clock: trio.testing.MockClock
) -> None:
    """A run busy past keepalive_expiry (no checkpoint, the watch could not run): the take expires, not hands out."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=2, keepalive_expiry=5) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await exchange(stream, b"one")
        await stream.release()
        autojump_clock.jump(6)  # CPU-bound work between two checkpoints
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert not stream.kept_alive
        assert await exchange(stream, b"two") == (2, 1, b"two")
        await stream.release()
        await drained(pool)
        stats = pool.statistics()
        assert (stats.kept_alive, stats.parked, stats.recycled) == (0, 1, 1)
        check(pool)


async def test_recycle_off_parks_and_closes_what_the_peer_closes(start_server: StartServer) -> None:
    """recycle=False still keeps connections alive; a peer's close then closes the socket."""
    server = await start_server(keep_alive(KeepAlive(requests=2)))
    async with trio_recycle.open_socket_pool(capacity=1, recycle=False) as pool:
        for n in (1, 2):
            stream = await pool.open_tcp_stream(server.host, server.port)
            assert await exchange(stream, b"r") == (1, n, b"r")
            await stream.release()
        await until(lambda: pool.statistics().parked == 0)
        stats = pool.statistics()
        assert (stats.kept_alive, stats.recycled, stats.discarded, stats.idle) == (1, 0, 1, 0)


# ----------------------------------------------------------------------
# Accounting


async def test_full_pool_evicts_the_least_recently_used_idle_or_parked(start_server: StartServer) -> None:
    """I4 with parked connections: at a full pool the oldest of idle and parked sockets makes room."""
    keep = await start_server(keep_alive(KeepAlive()))
    keep2 = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        a = await pool.open_tcp_stream(keep.host, keep.port)
        await exchange(a, b"a")
        b = await pool.open_tcp_stream(keep2.host, keep2.port)
        await exchange(b, b"b")
        await a.release()  # oldest
        await b.release()
        (oldest, _) = checks.stored_sockets(pool)
        c = await pool.open_tcp_stream(keep2.host, keep2.port)  # takes b's
        assert c.kept_alive
        d = await pool.open_tcp_stream("127.0.0.1", keep2.port)  # other open key: evicts a's
        assert not d.kept_alive
        # a's was idle and clean: the disconnect ended it (no TIME_WAIT). Where
        # an idle socket may serve any peer (fresh ISNs) it then serves d;
        # with affinity (another peer) it is closed.
        if pool.fresh_isns:
            assert checks.sockets_in(pool, checks.State.IN_USE)[-1] is oldest
            discarded = 0
        else:
            assert oldest.sock.fileno() == -1
            discarded = 1
        stats = pool.statistics()
        assert (stats.parked, stats.in_use, stats.discarded, stats.evicted) == (0, 2, discarded, 1)
        check(pool)
        await c.aclose()
        await d.aclose()


async def test_capacity_per_peer_bounds_one_peer_without_blocking_others(start_server: StartServer) -> None:
    """capacity_per_peer: the second open to a peer waits; an open to another peer behind it does not."""
    slow = await start_server(keep_alive(KeepAlive()))
    other = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=4, capacity_per_peer=1) as pool:
        held = await pool.open_tcp_stream(slow.host, slow.port)
        await exchange(held, b"held")
        got: list[str] = []
        async with trio.open_nursery() as nursery:

            async def second() -> None:
                stream = await pool.open_tcp_stream(slow.host, slow.port)
                got.append("slow")
                await exchange(stream, b"second")
                await stream.release()

            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 1
            stream = await pool.open_tcp_stream(other.host, other.port)  # not held up
            got.append("other")
            await exchange(stream, b"o")
            await stream.release()
            assert got == ["other"]
            assert_capacity(pool)
            await held.release()  # a task waits: closed politely, then the waiter's turn
        assert got == ["other", "slow"]
        stats = pool.statistics()
        assert stats.tasks_waiting == 0
        assert stats.parked == 2, stats
        check(pool)


async def test_capacity_per_peer_holds_when_an_attempt_takes_over_a_hanging_sibling(
    start_server: StartServer, resolve_names: ResolveNames, autojump_clock: trio.testing.MockClock
) -> None:
    """Happy eyeballs at a full pool: an attempt never takes over a SYN_SENT sibling past its own peer's limit."""
    server = await start_server(keep_alive(KeepAlive()), "127.0.0.1")
    peer = ("127.0.0.1", server.port)
    with checks.silent_address("127.0.0.2", server.port):
        resolve_names({"slow.test": [("127.0.0.2", socket.AF_INET), ("127.0.0.1", socket.AF_INET)]})
        async with trio_recycle.open_socket_pool(capacity=2, capacity_per_peer=1) as pool:
            held = await pool.open_tcp_stream(*peer)
            opened: list[RecyclingStream] = []
            async with trio.open_nursery() as nursery:

                async def open_slow() -> None:
                    opened.append(await pool.open_tcp_stream("slow.test", server.port, happy_eyeballs_delay=0.5))

                nursery.start_soon(open_slow)
                # The second attempt, toward the held peer, is past its delay
                # and waits (a pool state, polled: bounded, not a fixed sleep).
                with trio.fail_after(5):
                    while pool.statistics().tasks_waiting < 1:  # noqa: ASYNC110 - the waiter is inside the pool
                        await trio.sleep(0.01)
                assert checks.peer_count(pool, peer) == 1
                assert not opened
                assert pool.statistics().tasks_waiting == 1
                await exchange(held, b"one")
                await held.aclose()  # the slot of that peer goes to the waiting attempt
            (stream,) = opened
            assert stream.getpeername() == peer
            assert await exchange(stream, b"two") == (2, 1, b"two")
            assert checks.peer_count(pool, peer) == 1
            await stream.aclose()
            check(pool)


async def test_a_waiter_of_a_limited_peer_does_not_make_happy_eyeballs_abandon_an_attempt(
    start_server: StartServer, resolve_names: ResolveNames
) -> None:
    """A task waiting for its full peer holds nobody else up: with room in the pool, no attempt is abandoned."""
    other = await start_server(keep_alive(KeepAlive()), "127.0.0.1")
    with checks.silent_listener("127.0.0.2") as slow:  # SYNs go unanswered for now
        port = slow.getsockname()[1]
        # 127.0.0.1 refuses at once; 127.0.0.2 answers the SYN retry once the queue has room.
        resolve_names({"slow.test": [("127.0.0.2", socket.AF_INET), ("127.0.0.1", socket.AF_INET)]})
        async with trio_recycle.open_socket_pool(capacity=4, capacity_per_peer=1) as pool:
            held = await pool.open_tcp_stream(other.host, other.port)
            opened: list[RecyclingStream] = []
            async with trio.open_nursery() as nursery:

                async def open_other() -> None:
                    opened.append(await pool.open_tcp_stream(other.host, other.port))

                nursery.start_soon(open_other)  # waits: its peer is at its limit
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().tasks_waiting == 1
                with trio.fail_after(10):
                    async with trio.open_nursery() as attempts:

                        async def open_slow() -> None:
                            opened.append(await pool.open_tcp_stream("slow.test", port, happy_eyeballs_delay=0.1))

                        attempts.start_soon(open_slow)
                        await trio.sleep(0.3)  # the second attempt was refused by now
                        slow.accept()[0].close()  # room in the queue: the first attempt's SYN retry gets in
                (stream,) = opened
                assert stream.getpeername() == ("127.0.0.2", port)
                await stream.aclose()
                await held.aclose()
            await opened[1].aclose()
            check(pool)


async def test_capacity_per_peer_evicts_a_parked_connection_of_the_same_peer(start_server: StartServer) -> None:
    """At the per-peer limit, a parked connection to that peer under another open key makes room."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=4, capacity_per_peer=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port, local_address="127.0.0.1")
        await exchange(stream, b"x")
        await stream.release()
        with trio.fail_after(1):
            stream = await pool.open_tcp_stream(server.host, server.port)
        assert not stream.kept_alive
        stats = pool.statistics()
        assert (stats.parked, stats.discarded) == (0, 1)
        await stream.aclose()


async def test_exit_closes_parked_connections_and_the_watch(start_server: StartServer, fd_baseline: set[str]) -> None:
    """I5: the pool's exit closes every parked connection, the epoll and the watcher task."""
    server = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=3) as pool:
        for _ in range(3):
            streams = [await pool.open_tcp_stream(server.host, server.port) for _ in range(3)]
            for stream in streams:
                await exchange(stream, b"x")
                await stream.release()
        assert pool.statistics().parked == 3
        inodes = {socket_inode(s) for s in parked_sockets(pool)}
        epoll = checks.watch_epoll(pool)
        assert epoll is not None
        epoll_fd = epoll.fileno()
        assert "anon_inode:[eventpoll]" in fd_inodes()[epoll_fd]
    assert epoll.closed
    assert not inodes & set(fd_inodes().values())
    # The watcher task ran in the pool's nursery, which the exit waited for.
    assert checks.watch_closed(pool)


# ----------------------------------------------------------------------
# Servers that close: after K requests, after T ms idle, at random


@pytest.mark.parametrize("config", [KeepAlive(requests=3), KeepAlive(idle=0.02)], ids=["K=3", "idle=20ms"])
async def test_servers_that_close_cost_no_failed_exchange_when_idle(
    start_server: StartServer, config: KeepAlive, autojump_clock: trio.testing.MockClock
) -> None:
    """Closes seen while parked are absorbed by the watch; a close after the K-th answer costs one retry at most.

    On the mock clock, so that the server's idle timer fires only while
    everything waits (in the sleeps below), never in the middle of an
    exchange because the machine is busy; and the parked connections are
    checked only once the server and the watch have run (a FIN that has
    just arrived is the watch's to handle, within its 50 ms).
    """
    server = await start_server(keep_alive(config))
    failures = 0
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        for n in range(40):
            stream = await pool.open_tcp_stream(server.host, server.port)
            try:
                _, _, echoed = await exchange(stream, b"%d" % n)
            except (EOFError, trio.BrokenResourceError):
                assert stream.kept_alive
                failures += 1
                await stream.aclose()
                continue
            assert echoed == b"%d" % n
            await stream.release()
            if n % 5 == 4:
                await trio.sleep(0.03)
            await trio.testing.wait_all_tasks_blocked()
            check(pool)
        stats = pool.statistics()
    assert stats.created <= 2
    assert stats.recycled > 0
    assert failures <= 40 // 3 + 1
    if config.idle is not None:
        # Idle closes happen only while the connection is parked: the watch absorbs every one.
        assert failures == 0


async def test_server_closing_at_random(start_server: StartServer) -> None:
    """A server that closes at random after an answer: I1, I3, I4, I9 hold after every exchange."""
    rng = random.Random(10)

    async def random_close(stream: trio.SocketStream, server: object) -> None:
        number = rng.randrange(1_000_000)
        count = 0
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stream.receive_some()
                if not data:
                    return
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            count += 1
            await stream.send_all(b"%d.%d:%s\n" % (number, count, line))
            if rng.random() < 0.3:
                return

    server = await start_server(random_close)
    seen: dict[int, int] = {}
    async with trio_recycle.open_socket_pool(capacity=3) as pool:

        async def worker(n: int) -> None:
            for i in range(25):
                stream = await pool.open_tcp_stream(server.host, server.port)
                request = b"%d/%d" % (n, i)
                try:
                    conn, count, echoed = await exchange(stream, request)
                except (EOFError, trio.BrokenResourceError):
                    assert stream.kept_alive
                    await stream.aclose()
                    continue
                assert echoed == request
                assert seen.get(conn, 0) == count - 1
                seen[conn] = count
                if rng.random() < 0.8:
                    await stream.release()
                else:
                    await stream.aclose()
                check(pool)

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(worker, n)
        assert pool.statistics().kept_alive > 0
        await drained(pool)
        check(pool)


async def test_evicting_a_parked_connection_with_unread_bytes_does_not_reset_the_peer(
    start_server: StartServer,
) -> None:
    """I7 at eviction: bytes that arrived since the watch last ran are read first: the peer gets our FIN, no RST."""
    other = await start_server(keep_alive(KeepAlive()))
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            conn = await _park_one(pool, listener)
            conn.sendall(b"the end of an answer, late")
            (psock,) = checks.sockets_in(pool, checks.State.PARKED)
            await until_kernel(lambda: _peek(psock.sock) is not None)
            # Evicted in this task step: the watch has not run.
            stream = await pool.open_tcp_stream(other.host, other.port)
            assert pool.statistics().parked == 0
            conn.settimeout(5)
            assert conn.recv(100) == b""  # our FIN; a reset would raise ConnectionResetError
            conn.close()
            await stream.aclose()


# ----------------------------------------------------------------------
# I9 at scale and for urgent data (regressions)


async def test_the_take_check_sees_the_connection_taken_with_more_than_1023_ready() -> None:
    """1,100 parked connections receive bytes at once, the last parked last: none is handed out (I9)."""
    count = 1100
    with checks.listener(backlog=count) as listener:
        port = listener.getsockname()[1]
        peers: list[socket.socket] = []
        try:
            async with trio_recycle.open_socket_pool(capacity=count + 1) as pool:
                streams = [await pool.open_tcp_stream("127.0.0.1", port) for _ in range(count)]
                peers = [listener.accept()[0] for _ in range(count)]
                for stream in streams:
                    assert await stream.release()
                assert pool.statistics().parked == count
                # In park order, with no checkpoint in between: the most
                # recently parked (the one an open takes) is the last of the
                # kernel's ready list, past the first epoll_wait's 1023.
                for peer in peers:
                    peer.send(b"unasked")
                stream = await pool.open_tcp_stream("127.0.0.1", port)
                assert not stream.kept_alive
                assert pool.statistics().parked == 0
                fresh, _ = listener.accept()
                with fresh:
                    fresh.send(b"answer")
                    assert await stream.receive_some(100) == b"answer"
                await stream.aclose()
                checks.check_pool(pool)
        finally:
            for peer in peers:
                peer.close()


async def test_release_with_more_than_1023_ready_parks_nothing_dirty() -> None:
    """release()'s check covers the connection it parks, however many others are ready."""
    count = 1100
    with checks.listener(backlog=count + 1) as listener:
        port = listener.getsockname()[1]
        peers: list[socket.socket] = []
        try:
            async with trio_recycle.open_socket_pool(capacity=count + 1) as pool:
                streams = [await pool.open_tcp_stream("127.0.0.1", port) for _ in range(count + 1)]
                peers = [listener.accept()[0] for _ in range(count + 1)]
                for stream in streams[:count]:
                    assert await stream.release()
                for peer in peers:
                    peer.send(b"unasked")  # the last one to the stream still open
                assert not await streams[count].release()
                # The others are the watch's: its task ends all of them.
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().parked == 0
                checks.check_pool(pool)
        finally:
            for peer in peers:
                peer.close()


@pytest.mark.parametrize("when", ["while parked", "just before the take"])
async def test_an_urgent_byte_sent_to_a_parked_connection_is_never_handed_out(when: str) -> None:
    """A lone MSG_OOB byte (seen by no peek, only by EPOLLPRI) ends the parked connection (I9)."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=2) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            peer, _ = listener.accept()
            with peer:
                assert await stream.release()
                peer.send(b"!", socket.MSG_OOB)
                if when == "while parked":
                    await trio.testing.wait_all_tasks_blocked()
                    assert pool.statistics().parked == 0
                taken = await pool.open_tcp_stream("127.0.0.1", port)
                assert not taken.kept_alive
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
                fresh, _ = listener.accept()
                with fresh:
                    fresh.send(b"answer")
                    assert await taken.receive_some(100) == b"answer"
                await taken.aclose()
                checks.check_pool(pool)


def _wait_for_fin(sock: socket.socket) -> None:
    """Block (bounded, no await) until the peer's FIN is in ``sock``'s receive queue: a kernel event, not a sleep."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    assert poller.poll(5000), "the peer's FIN did not arrive"


async def test_release_with_the_peers_fin_queued_recycles_and_does_not_park() -> None:
    """The answer read, the FIN not: release() finds the FIN, parks nothing; the socket goes back idle, no TIME_WAIT."""
    with checks.listener() as server, checks.listener("127.0.0.2") as other:
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", server.getsockname()[1])
            conn, _ = server.accept()
            conn.sendall(b"answer")
            conn.close()  # the server closes after its answer
            _wait_for_fin(checks.pooled_socket_of(stream).sock)
            assert await stream.receive_some(6) == b"answer"
            assert not await stream.release()
            stats = pool.statistics()
            assert (stats.parked, stats.idle, stats.not_parked, stats.recycled) == (0, 1, 1, 1)
            checks.check_pool(pool)
            # The place is free at once: an open elsewhere takes the idle socket where the ISNs
            # are fresh (affinity otherwise: a new socket for the new peer).
            stream = await pool.open_tcp_stream("127.0.0.2", other.getsockname()[1])
            assert pool.statistics().discarded == (0 if pool.fresh_isns else 1)
            await stream.aclose()
            checks.check_pool(pool)
        assert time_wait_count(server.getsockname()[1]) == 0


async def test_evicting_a_parked_connection_whose_peer_closed_before_the_watch_ran_leaves_no_time_wait() -> None:
    """The FIN came after the park; an open takes the place before the watch ran: the disconnect ends it, not a FIN."""
    with checks.listener() as server, checks.listener("127.0.0.2") as other:
        port = server.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            conn, _ = server.accept()
            assert await stream.release()
            conn.close()
            _wait_for_fin(checks.parked_sockets(pool)[0])
            # No checkpoint since the FIN arrived: the watch has not run; the open evicts.
            stream = await pool.open_tcp_stream("127.0.0.2", other.getsockname()[1])
            stats = pool.statistics()
            assert (stats.evicted, stats.recycled) == (1, 1)
            assert stats.created == (1 if pool.fresh_isns else 2)  # reused for the new peer where ISNs are fresh
            await stream.aclose()
            checks.check_pool(pool)
        # Our FIN after theirs would have left the server a TIME_WAIT (bounded wait, then the count).
        assert wait_for_time_wait(port, 1, timeout=0.5) == 0
