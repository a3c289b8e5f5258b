"""SocketPool: the invariants I1-I8 of DESIGN.md, capacity, peers, bad input."""

from __future__ import annotations

import errno
import math
import re
import socket
import sys

import pytest
import trio
import trio.testing

import trio_recycle
from trio_recycle import SocketPool

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from . import checks
from .checks import assert_capacity, assert_idle_disconnected, fd_inodes, socket_inode
from .conftest import (
    ResolveNames,
    StartServer,
    answer_then_close,
    answer_then_reset,
    cycle,
    drained,
    echo_tagged,
    flood,
    half_close,
    never_close,
    read_until_eof,
    time_wait_count,
    wait_for_time_wait,
)

# ----------------------------------------------------------------------
# I1-I8, one test each (more of each below)


async def test_i1_no_cross_talk(start_server: StartServer, loopback: str, recycle: bool) -> None:
    """I1: every byte a stream receives was sent to it by its own connection."""
    server = await start_server(echo_tagged, loopback)
    seen_tags: set[bytes] = set()
    async with trio_recycle.open_socket_pool(capacity=4, recycle=recycle) as pool:

        async def worker(n: int) -> None:
            for i in range(25):
                payload = b"[%d.%d]" % (n, i) * (1 + i % 5)
                async with await pool.open_tcp_stream(loopback, server.port) as stream:
                    await stream.send_all(payload)
                    await stream.send_eof()
                    data = await read_until_eof(stream)
                tag, _, echoed = data.partition(b">")
                assert tag.startswith(b"<")
                assert tag not in seen_tags
                seen_tags.add(tag)
                assert echoed == payload
                assert_capacity(pool)

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(worker, n)
        if recycle:
            assert pool.statistics().reused > 0
    assert len(seen_tags) == 200


async def test_i2_stale_handle_cannot_reach_the_next_owner(start_server: StartServer, loopback: str) -> None:
    """I2: a closed stream raises ClosedResourceError while its socket serves another."""
    server = await start_server(echo_tagged, loopback)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        old = await pool.open_tcp_stream(loopback, server.port)
        await old.send_eof()
        assert await read_until_eof(old) == b"<1>"
        old_inode = socket_inode(old._sock)
        await old.aclose()
        new = await pool.open_tcp_stream(loopback, server.port)
        assert socket_inode(new._sock) == old_inode  # the same kernel socket
        with pytest.raises(trio.ClosedResourceError):
            await old.send_all(b"stale")
        with pytest.raises(trio.ClosedResourceError):
            await old.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await old.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await old.wait_send_all_might_not_block()
        with pytest.raises(trio.ClosedResourceError):
            old.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        await old.aclose()  # closing again touches nothing
        await new.send_all(b"fresh")
        await new.send_eof()
        assert await read_until_eof(new) == b"<2>fresh"
        await new.aclose()


async def test_i2_blocked_reader_is_woken_and_never_reads_the_next_connection(
    start_server: StartServer,
) -> None:
    """I2: a task blocked in receive_some wakes with ClosedResourceError when the stream closes."""
    server = await start_server(echo_tagged)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        assert await stream.receive_some() == b"<1>"
        results: list[BaseException] = []

        async def blocked_reader() -> None:
            try:
                await stream.receive_some()
            except trio.ClosedResourceError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
        assert len(results) == 1


async def test_i3_idle_sockets_are_disconnected(start_server: StartServer, loopback: str) -> None:
    """I3: idle means ENOTCONN, state CLOSE, SO_ERROR 0, nothing queued."""
    server = await start_server(answer_then_close, loopback)
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(cycle, pool, server)
        stats = pool.statistics()
        assert stats.idle >= 1
        assert stats.recycled == 4
        assert_idle_disconnected(pool)


async def test_i4_capacity_bounds_owned_descriptors(start_server: StartServer, recycle: bool) -> None:
    """I4: with 16 tasks on capacity 3, never more than 3 sockets, each a real fd."""
    server = await start_server(answer_then_close)
    peak = 0
    async with trio_recycle.open_socket_pool(capacity=3, recycle=recycle) as pool:

        async def worker() -> None:
            nonlocal peak
            for _ in range(10):
                stream = await pool.open_tcp_stream("127.0.0.1", server.port)
                assert_capacity(pool)
                stats = pool.statistics()
                peak = max(peak, checks.owned_count(stats))
                async with stream:
                    await stream.send_all(b"x")
                    assert await read_until_eof(stream) == b"ok:x"
                assert_capacity(pool)

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(worker)
        stats = pool.statistics()
        assert stats.tasks_waiting == 0
        assert peak == 3
        if recycle:
            assert stats.created == 3
            assert stats.reused == 160 - 3


async def test_i5_exit_closes_everything(
    start_server: StartServer, autojump_clock: trio.testing.MockClock, fd_baseline: set[str]
) -> None:
    """I5: on exit every socket is closed (idle, in use, draining) without waiting for drains."""
    closer = await start_server(answer_then_close)
    other = await start_server(answer_then_close)
    holder = await start_server(never_close)
    inodes = []
    async with trio_recycle.open_socket_pool(capacity=4, eof_timeout=1000, peer_affinity=True) as pool:
        still_open = await pool.open_tcp_stream("127.0.0.1", closer.port)  # -> in use
        await cycle(pool, other)  # -> idle
        draining = await pool.open_tcp_stream("127.0.0.1", holder.port)
        await draining.send_all(b"x")
        assert await draining.receive_some() == b"ok:x"
        await draining.aclose()  # -> draining (the holder never closes)
        stats = pool.statistics()
        assert (stats.idle, stats.in_use, stats.draining) == (1, 1, 1)
        inodes = [socket_inode(sock) for sock in checks.owned_sockets(pool)]
        entered = trio.current_time()
    assert trio.current_time() - entered < 1000  # did not wait for the drain
    left = set(fd_inodes().values())
    assert not left & set(inodes)
    with pytest.raises(trio.ClosedResourceError):
        await still_open.send_all(b"late")
    await still_open.aclose()
    final = pool.statistics()
    assert (final.idle, final.in_use, final.draining) == (0, 0, 0)
    assert final.created == final.discarded


async def test_i6_cancel_while_waiting_for_capacity(start_server: StartServer) -> None:
    """I6: a cancelled waiter leaves no trace; capacity stays whole."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        held = await pool.open_tcp_stream("127.0.0.1", server.port)
        with trio.CancelScope() as scope:

            async def cancel_when_waiting() -> None:
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().tasks_waiting == 1
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_waiting)
                await pool.open_tcp_stream("127.0.0.1", server.port)
        assert scope.cancelled_caught
        assert pool.statistics().tasks_waiting == 0
        async with held:
            await held.send_all(b"a")
            assert await read_until_eof(held) == b"ok:a"
        assert await cycle(pool, server, b"b") == b"ok:b"
        assert_capacity(pool)


async def test_i6_cancel_at_every_checkpoint_of_a_cycle(start_server: StartServer, recycle: bool) -> None:
    """I6: cancelling a cycle at its 1st, 2nd, ... checkpoint keeps I2-I4 and leaks nothing."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=2, recycle=recycle) as pool:
        n = 0
        while True:
            n += 1
            completed = await _cycle_cancelled_after(pool, server, n)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().in_use == 0
            assert_capacity(pool)
            assert_idle_disconnected(pool)
            if completed:
                break
        assert n >= 4
        assert await cycle(pool, server, b"after") == b"ok:after"


async def _cycle_cancelled_after(pool: SocketPool, server: object, checkpoints: int) -> bool:
    """Run a cycle, cancelling it at its ``checkpoints``-th checkpoint; True if it finished."""
    from .conftest import Server

    assert isinstance(server, Server)
    done = False
    with trio.CancelScope() as scope:
        counter = _CheckpointCounter(scope, checkpoints)
        trio.lowlevel.add_instrument(counter)
        try:
            stream = await pool.open_tcp_stream(server.host, server.port)
            try:
                await stream.send_all(b"c")
                await read_until_eof(stream)
            finally:
                await stream.aclose()
            done = True
        finally:
            trio.lowlevel.remove_instrument(counter)
    return done


class _CheckpointCounter(trio.abc.Instrument):
    """Cancel a scope once the current task has passed N schedule points."""

    def __init__(self, scope: trio.CancelScope, n: int) -> None:
        self.scope = scope
        self.n = n
        self.task = trio.lowlevel.current_task()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.n -= 1
            if self.n == 0:
                self.scope.cancel()


async def test_i6_cancelled_aclose_still_closes(start_server: StartServer) -> None:
    """I6: aclose in a cancelled scope closes, recycles, and raises Cancelled."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"x")
        await read_until_eof(stream)
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.aclose()
        assert scope.cancelled_caught
        stats = pool.statistics()
        assert (stats.idle, stats.in_use, stats.recycled) == (1, 0, 1)
        assert_idle_disconnected(pool)


async def test_i7_peer_without_fin_gets_no_reset(
    start_server: StartServer, autojump_clock: trio.testing.MockClock
) -> None:
    """I7: a peer that never closes gets our FIN, then a plain close, never an RST."""
    server = await start_server(never_close)
    async with trio_recycle.open_socket_pool(capacity=1, eof_timeout=5) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"x")
        assert await stream.receive_some() == b"ok:x"
        await stream.aclose()
        assert pool.statistics().draining == 1
        await trio.sleep(6)
        stats = pool.statistics()
        assert (stats.draining, stats.idle, stats.recycled, stats.discarded) == (0, 0, 0, 1)
    await trio.testing.wait_all_tasks_blocked()
    assert server.received == [b""]  # the server saw a clean EOF
    assert server.errors == []


async def test_i7_half_closed_peer_sees_the_reset_unless_recycle_is_off(start_server: StartServer) -> None:
    """I7 (documented): a half-closing peer gets an RST; recycle=False spares it."""
    for recycle, expect_reset in ((True, True), (False, False)):
        server = await start_server(half_close)
        async with trio_recycle.open_socket_pool(capacity=1, recycle=recycle) as pool:
            assert await cycle(pool, server) == b"ok:ping"
            await server.finished_event.wait()
        got_reset = any(isinstance(e, trio.BrokenResourceError) for e in server.errors)
        assert got_reset is expect_reset, server.errors


async def test_i8_affinity_keeps_idle_sockets_to_their_peer(start_server: StartServer) -> None:
    """I8: with affinity (peer_affinity=True) an idle socket serves only its last peer; without, any peer."""
    a = await start_server(answer_then_close)
    b = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=4, peer_affinity=True) as pool:
        await cycle(pool, a)
        await cycle(pool, b)
        stats = pool.statistics()
        assert (stats.created, stats.reused, stats.idle) == (2, 0, 2)
        await cycle(pool, a)
        assert pool.statistics().reused == 1
    async with trio_recycle.open_socket_pool(capacity=4, peer_affinity=False) as pool:
        await cycle(pool, a)
        await cycle(pool, b)
        stats = pool.statistics()
        assert (stats.created, stats.reused, stats.idle) == (1, 1, 1)


async def test_i8_full_pool_evicts_idle_socket_of_another_peer(start_server: StartServer) -> None:
    """A full pool whose idle sockets belong to other peers evicts one instead of waiting."""
    a = await start_server(answer_then_close)
    b = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1, peer_affinity=True) as pool:
        await cycle(pool, a)
        with trio.fail_after(5):
            await cycle(pool, b)
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.idle) == (2, 1, 1)
        assert_capacity(pool)


# ----------------------------------------------------------------------
# Kernel-visible effects


async def test_no_socket_call_in_steady_state(start_server: StartServer, loopback: str) -> None:
    """After warm-up, 200 cycles run on the same kernel socket: no socket() at all."""
    server = await start_server(answer_then_close, loopback)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        await cycle(pool, server)
        (psock,) = checks.stored_sockets(pool)
        inode = socket_inode(psock.sock)
        for i in range(200):
            assert await cycle(pool, server, b"%d" % i) == b"ok:%d" % i
        (same,) = checks.stored_sockets(pool)
        assert socket_inode(same.sock) == inode
        stats = pool.statistics()
        assert (stats.created, stats.reused, stats.recycled) == (1, 200, 201)


async def test_server_keeps_no_time_wait(start_server: StartServer, loopback: str) -> None:
    """Server closes first: the pool leaves no TIME_WAIT; trio.open_tcp_stream leaves one per cycle."""
    server = await start_server(answer_then_close, loopback)
    # An entry an earlier test's client left on the port bind(0) gave us
    # is not ours: count from what is there now.
    before = time_wait_count(server.port)
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        for _ in range(20):
            await cycle(pool, server)
        assert time_wait_count(server.port) <= before  # the pool adds none (an old one may expire)
    baseline = await start_server(answer_then_close, loopback)
    clients = set()
    for _ in range(5):
        async with await trio.open_tcp_stream(loopback, baseline.port) as stream:
            clients.add(stream.socket.getsockname()[1])
            await stream.send_all(b"x")
            await read_until_eof(stream)
    assert wait_for_time_wait(baseline.port, 5, remote_ports=clients) == 5


# ----------------------------------------------------------------------
# Peers that misbehave


async def test_peer_reset_discards_the_socket(start_server: StartServer) -> None:
    """A peer that answers then resets: BrokenResourceError, socket closed, capacity back."""
    server = await start_server(answer_then_reset)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await read_until_eof(stream)
        await stream.aclose()
        stats = pool.statistics()
        assert (stats.in_use, stats.idle, stats.recycled, stats.discarded) == (0, 0, 0, 1)
        assert_capacity(pool)


async def test_flood_past_drain_limit_is_closed_not_recycled(start_server: StartServer) -> None:
    """A peer that keeps sending past drain_limit: the drain gives up and closes."""
    server = await start_server(flood)
    async with trio_recycle.open_socket_pool(capacity=1, drain_limit=100_000, eof_timeout=30) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"f" * 10
        await stream.aclose()
        await drained(pool)
        stats = pool.statistics()
        assert (stats.idle, stats.recycled, stats.discarded) == (0, 0, 1)


async def test_peer_that_closes_after_our_fin_is_recycled(start_server: StartServer) -> None:
    """Closing before reading the EOF: the drain sends FIN, reads the peer's, recycles."""
    server = await start_server(echo_tagged)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"hello")
        await stream.aclose()  # no EOF seen, nothing read
        await server.finished_event.wait()
        await drained(pool)
        stats = pool.statistics()
        assert (stats.idle, stats.recycled, stats.discarded) == (1, 1, 0)
        assert_idle_disconnected(pool)
        assert server.errors == []


async def test_refused_connection_gives_capacity_back(recycle: bool) -> None:
    """Connecting where nothing listens: OSError naming the address; capacity back."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: refuses
        async with trio_recycle.open_socket_pool(capacity=1, recycle=recycle) as pool:
            for _ in range(3):
                with pytest.raises(OSError, match=re.escape(f"127.0.0.1:{port}")) as info:
                    await pool.open_tcp_stream("127.0.0.1", port)
                assert info.value.errno == errno.ECONNREFUSED
            stats = pool.statistics()
            assert (stats.in_use, stats.idle, stats.tasks_waiting) == (0, 0, 0)
            assert stats.created == stats.discarded == 3


async def test_happy_eyeballs_over_names(start_server: StartServer, resolve_names: ResolveNames) -> None:
    """A name resolving to ::1 and 127.0.0.1 connects to whichever listens."""
    server = await start_server(answer_then_close, "127.0.0.1")
    resolve_names({"dual.test": [("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)]})
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        for _ in range(2):
            async with await pool.open_tcp_stream("dual.test", server.port) as stream:
                await stream.send_all(b"x")
                assert await read_until_eof(stream) == b"ok:x"
        stats = pool.statistics()
        assert stats.in_use == 0
        assert stats.reused >= 1
        assert_capacity(pool)


async def test_happy_eyeballs_staggers_past_a_hanging_attempt(
    resolve_names: ResolveNames, start_server: StartServer, autojump_clock: trio.testing.MockClock
) -> None:
    """An attempt whose SYN is never answered is overtaken after the delay, then discarded."""
    server = await start_server(answer_then_close, "127.0.0.1")
    with checks.silent_address("127.0.0.2", server.port):
        resolve_names({"slow.test": [("127.0.0.2", socket.AF_INET), ("127.0.0.1", socket.AF_INET)]})
        async with trio_recycle.open_socket_pool(capacity=4) as pool:
            start = trio.current_time()
            async with await pool.open_tcp_stream("slow.test", server.port, happy_eyeballs_delay=0.5) as stream:
                assert trio.current_time() - start == pytest.approx(0.5)
                await stream.send_all(b"x")
                assert await read_until_eof(stream) == b"ok:x"
            stats = pool.statistics()
            assert (stats.created, stats.discarded, stats.in_use) == (2, 1, 0)
            assert_capacity(pool)


async def test_all_attempts_failing_names_each_address(resolve_names: ResolveNames) -> None:
    """Every failed attempt is named in the one OSError raised."""
    with socket.socket() as v4:
        v4.bind(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        resolve_names({"dead.test": [("127.0.0.1", socket.AF_INET), ("127.0.0.3", socket.AF_INET)]})
        async with trio_recycle.open_socket_pool(capacity=2) as pool:
            with pytest.raises(OSError, match=r"dead\.test") as info:
                await pool.open_tcp_stream("dead.test", port)
            text = str(info.value)
            assert f"('127.0.0.1', {port})" in text
            assert f"('127.0.0.3', {port})" in text
            assert info.value.errno == errno.ECONNREFUSED
            assert isinstance(info.value.__cause__, BaseExceptionGroup)
            stats = pool.statistics()
            assert (stats.in_use, stats.created, stats.discarded) == (0, 2, 2)


async def test_waiters_are_served_first_come_first_served(start_server: StartServer) -> None:
    """Tasks waiting for capacity get sockets in arrival order."""
    server = await start_server(answer_then_close)
    order: list[int] = []
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        held = await pool.open_tcp_stream("127.0.0.1", server.port)

        async def waiter(n: int) -> None:
            async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
                order.append(n)
                await stream.send_all(b"w")
                await read_until_eof(stream)

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(waiter, n)
                await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 5
            await held.send_all(b"h")
            await read_until_eof(held)
            await held.aclose()
        assert order == [0, 1, 2, 3, 4]


async def test_pool_exit_fails_waiters(start_server: StartServer) -> None:
    """Tasks still waiting when the pool's block exits get ClosedResourceError."""
    server = await start_server(answer_then_close)
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery, trio_recycle.open_socket_pool(capacity=1) as pool:
        held = await pool.open_tcp_stream("127.0.0.1", server.port)

        async def waiter() -> None:
            try:
                await pool.open_tcp_stream("127.0.0.1", server.port)
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1
    assert "closed" in str(errors[0])
    with pytest.raises(trio.ClosedResourceError):
        held.getpeername()  # closed by the exit


# ----------------------------------------------------------------------
# Socket options


async def test_pool_option_reset_by_disconnect_is_reapplied(start_server: StartServer) -> None:
    """TCP_MAXSEG, which tcp_disconnect() clears, is set again after each recycle."""
    server = await start_server(answer_then_close)
    options = [(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)]
    async with trio_recycle.open_socket_pool(capacity=1, socket_options=options) as pool:
        for _ in range(3):
            async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1000
                await stream.send_all(b"x")
                await read_until_eof(stream)
        assert pool.statistics().reused == 2


async def test_user_option_does_not_leak_into_the_next_use(start_server: StartServer) -> None:
    """An option set through one stream is restored before the socket's next use."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            await stream.send_all(b"x")
            await read_until_eof(stream)
        async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            await stream.send_all(b"x")
            await read_until_eof(stream)
        assert pool.statistics().reused == 1


async def test_unrestorable_user_option_means_no_recycle(start_server: StartServer) -> None:
    """After SO_RCVBUF (which reads back doubled) the socket is closed, not recycled."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await stream.send_all(b"x")
            await read_until_eof(stream)
        stats = pool.statistics()
        assert (stats.recycled, stats.discarded, stats.idle) == (0, 1, 0)
        async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
            assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) != 8192


async def test_coupled_options_do_not_leak(start_server: StartServer) -> None:
    """IP_TOS also sets SO_PRIORITY: both come back to what they were, in any order of setting."""
    server = await start_server(answer_then_close)
    for pool_priority in (None, 3):
        options = [] if pool_priority is None else [(socket.SOL_SOCKET, socket.SO_PRIORITY, pool_priority)]
        async with trio_recycle.open_socket_pool(capacity=1, socket_options=options) as pool:
            for order in ("tos", "tos then priority", "priority then tos"):
                async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
                    before = stream.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)
                    assert before == (pool_priority or 0)
                    if order.startswith("priority"):
                        stream.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 2)
                    stream.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
                    if order == "tos then priority":
                        stream.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 2)
                    await stream.send_all(b"x")
                    await read_until_eof(stream)
                async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
                    assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == before, order
                    assert stream.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0, order
                    await stream.send_all(b"x")
                    await read_until_eof(stream)
            assert pool.statistics().created == 1


# ----------------------------------------------------------------------
# Bad input: a clear error naming the argument; the pool stays intact


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": -3}, ValueError, "capacity"),
        ({"capacity": 2.5}, TypeError, "capacity"),
        ({"capacity": True}, TypeError, "capacity"),
        ({"eof_timeout": -1}, ValueError, "eof_timeout"),
        ({"eof_timeout": math.nan}, ValueError, "eof_timeout"),
        ({"eof_timeout": "5"}, TypeError, "eof_timeout"),
        ({"drain_limit": -1}, ValueError, "drain_limit"),
        ({"drain_limit": 1.5}, TypeError, "drain_limit"),
        ({"peer_affinity": 1}, TypeError, "peer_affinity"),
        ({"recycle": None}, TypeError, "recycle"),
        ({"socket_options": [(1, 2)]}, TypeError, "socket_options"),
        ({"socket_options": 5}, TypeError, "socket_options"),
        ({"keepalive_expiry": -1}, ValueError, "keepalive_expiry"),
        ({"keepalive_expiry": math.nan}, ValueError, "keepalive_expiry"),
        ({"keepalive_expiry": "5"}, TypeError, "keepalive_expiry"),
        ({"keepalive_expiry": None}, TypeError, "keepalive_expiry"),
        ({"capacity_per_peer": 0}, ValueError, "capacity_per_peer"),
        ({"capacity_per_peer": 1.5}, TypeError, "capacity_per_peer"),
        ({"capacity_per_peer": True}, TypeError, "capacity_per_peer"),
    ],
)
async def test_bad_pool_arguments(kwargs: dict[str, object], error: type[Exception], name: str) -> None:
    """Each bad argument of open_socket_pool raises an error that names it."""
    with pytest.raises(error, match=name):
        async with trio_recycle.open_socket_pool(**kwargs):  # type: ignore[arg-type]
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("host", "port", "error", "name"),
    [
        ("127.0.0.1", "80", TypeError, "port"),
        ("127.0.0.1", 80.0, TypeError, "port"),
        ("127.0.0.1", True, TypeError, "port"),
        ("127.0.0.1", 0, ValueError, "port"),
        ("127.0.0.1", 65536, ValueError, "port"),
        ("127.0.0.1", -1, ValueError, "port"),
        (None, 80, TypeError, "host"),
        (("127.0.0.1",), 80, TypeError, "host"),
    ],
)
async def test_bad_open_arguments_leave_the_pool_intact(
    start_server: StartServer, host: object, port: object, error: type[Exception], name: str
) -> None:
    """Bad host/port raise naming the argument; the pool then works as before."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        await cycle(pool, server)
        with pytest.raises(error, match=name):
            await pool.open_tcp_stream(host, port)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="happy_eyeballs_delay"):
            await pool.open_tcp_stream("127.0.0.1", server.port, happy_eyeballs_delay=-1)
        assert await cycle(pool, server) == b"ok:ping"
        stats = pool.statistics()
        assert (stats.created, stats.reused, stats.in_use) == (1, 1, 0)


async def test_unknown_host_raises_gaierror() -> None:
    """A host name that cannot resolve raises socket.gaierror; nothing is taken."""
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        # "!" is not allowed in a host name: glibc rejects it without asking DNS.
        with pytest.raises(socket.gaierror):
            await pool.open_tcp_stream("no-such-host!", 80)
        stats = pool.statistics()
        assert (stats.created, stats.in_use) == (0, 0)


async def test_use_after_exit_says_the_pool_is_closed() -> None:
    """Opening through a pool whose block has exited raises ClosedResourceError."""
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        pass
    with pytest.raises(trio.ClosedResourceError, match="closed"):
        await pool.open_tcp_stream("127.0.0.1", 80)


async def test_body_exception_propagates_unwrapped() -> None:
    """An exception from the pool's block comes out as itself, not an ExceptionGroup."""
    with pytest.raises(KeyError):
        async with trio_recycle.open_socket_pool(capacity=1):
            raise KeyError("mine")


async def test_drain_finishing_as_the_pool_exits_leaks_nothing() -> None:
    """Regression: a drain that sees the FIN in the pool's last scheduler round closes, not parks.

    The peer's FIN arrives during the block's last checkpoint, so the drain
    task and the pool's exit run in one batch; before the fix the socket was
    put idle after _close() and stayed open.
    """
    leaked = 0
    for _ in range(20):
        with checks.listener() as listener:
            async with trio_recycle.open_socket_pool(capacity=1) as pool:
                stream = await pool.open_tcp_stream(*listener.getsockname())
                peer, _ = listener.accept()
                await stream.aclose()  # no EOF yet: a drain task waits for it
                # Our FIN, sent by the drain after its grace for the peer's.
                assert await trio.socket.from_stdlib_socket(peer).recv(100) == b""
                peer.close()  # the peer's FIN arrives now
                await trio.lowlevel.checkpoint()
            leaked += sum(p.sock.fileno() != -1 for p in checks.stored_sockets(pool))
            stats = pool.statistics()
            assert (stats.idle, stats.in_use, stats.draining) == (0, 0, 0)
            assert stats.created == stats.discarded
    assert leaked == 0


async def test_close_without_reading_the_fin_that_is_already_there(start_server: StartServer, loopback: str) -> None:
    """Regression: a FIN already queued but unread is found at close; no FIN of ours, no TIME_WAIT.

    Sending our FIN first (as the drain did) moved the closed peer from
    FIN_WAIT2 to TIME_WAIT: one TIME_WAIT entry on the server per cycle.
    """
    server = await start_server(answer_then_close, loopback)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        for i in range(10):
            stream = await pool.open_tcp_stream(loopback, server.port)
            await stream.send_all(b"x")
            await server.finished_event.wait()  # answered and closed
            await stream.aclose()  # nothing read: the answer and the FIN are queued
            stats = pool.statistics()
            assert (stats.draining, stats.idle, stats.recycled) == (0, 1, i + 1)
        assert_idle_disconnected(pool)
    assert time_wait_count(server.port) == 0


async def test_waiter_whose_socket_cannot_be_made_gets_the_error_and_the_next_one_the_slot(
    start_server: StartServer,
) -> None:
    """A freed slot whose new socket fails for the first waiter (bind error) goes on to the next waiter."""
    server = await start_server(answer_then_close)
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery, trio_recycle.open_socket_pool(capacity=1) as pool:
        held = await pool.open_tcp_stream("127.0.0.1", server.port)

        async def waiter(name: str, local_address: str | None) -> None:
            try:
                stream = await pool.open_tcp_stream("127.0.0.1", server.port, local_address=local_address)
            except OSError as exc:
                results[name] = exc
            else:
                results[name] = stream.getsockname()[0]
                await stream.aclose()

        # 192.0.2.1 (TEST-NET-1) is no address of this machine: bind() fails
        # with EADDRNOTAVAIL when the slot is handed to this waiter.
        nursery.start_soon(waiter, "unbindable", "192.0.2.1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "next", None)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().tasks_waiting == 2
        await held.send_all(b"x")
        await read_until_eof(held)
        await held.aclose()
        await trio.testing.wait_all_tasks_blocked()
    error = results["unbindable"]
    assert isinstance(error, OSError)
    assert error.errno == errno.EADDRNOTAVAIL
    assert "192.0.2.1" in str(error)
    assert results["next"] == "127.0.0.1"
    stats = pool.statistics()
    # held's socket (another key than the first waiter's) was closed for it.
    # Three socket() calls: the held one, the unbindable waiter's (closed when
    # bind() failed) and the next waiter's; every one counted, every one closed.
    assert (stats.created, stats.discarded, stats.tasks_waiting) == (3, 3, 0)
