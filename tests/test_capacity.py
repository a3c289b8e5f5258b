"""Capacity's choices on real sockets: a draining socket gives way to a waiting task."""

from __future__ import annotations

import trio
import trio.testing

import trio_recycle

from . import checks


async def test_a_drain_that_does_not_end_gives_way_to_a_waiting_task(autojump_clock: trio.testing.MockClock) -> None:
    """A peer that never answers our FIN: the drain holds its place only GIVE_WAY_AFTER, then a waiter gets it."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1, eof_timeout=30) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            peer, _ = listener.accept()  # holds the connection, never closes it
            with peer:
                await stream.aclose()  # no FIN from the peer: draining
                assert pool.statistics().draining == 1
                start = trio.current_time()
                with trio.fail_after(5):
                    waiter = await pool.open_tcp_stream("127.0.0.1", port)
                waited = trio.current_time() - start
                assert 0 < waited <= 0.5 + 0.01  # GIVE_WAY_AFTER, not eof_timeout
                stats = pool.statistics()
                assert (stats.draining, stats.in_use, stats.evicted) == (0, 1, 1)
                checks.check_pool(pool)
                assert checks.drains_cut(pool) == 1
                listener.accept()[0].close()
                await waiter.aclose()


async def test_a_drain_that_ends_in_time_is_not_cut(autojump_clock: trio.testing.MockClock) -> None:
    """A waiter does not cut a young drain whose peer closes: the socket is recycled for it."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1, eof_timeout=30, peer_affinity=True) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            peer, _ = listener.accept()
            await stream.aclose()  # draining: the peer has not closed yet
            async with trio.open_nursery() as nursery:
                got: list[trio_recycle.RecyclingStream] = []

                async def waiter() -> None:
                    got.append(await pool.open_tcp_stream("127.0.0.1", port))

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().tasks_waiting == 1
                peer.close()  # its FIN ends the drain well before GIVE_WAY_AFTER
            stats = pool.statistics()
            assert (stats.evicted, stats.recycled, stats.reused, stats.created) == (0, 1, 1, 1)
            listener.accept()[0].close()
            await got[0].aclose()
            checks.check_pool(pool)


async def test_a_waiter_that_leaves_does_not_cut_the_drain(autojump_clock: trio.testing.MockClock) -> None:
    """The waiter gives up before the drain is old enough: the drain goes on, and recycles when the peer closes."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1, eof_timeout=5, peer_affinity=True) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            peer, _ = listener.accept()
            await stream.aclose()  # draining: the peer has not closed
            with trio.move_on_after(0.1):
                await pool.open_tcp_stream("127.0.0.1", port)
            await trio.sleep(1)  # past GIVE_WAY_AFTER, with nobody waiting
            assert pool.statistics().draining == 1
            peer.close()
            with trio.fail_after(5):
                while pool.statistics().draining:  # noqa: ASYNC110 - the drain has no event to wait on
                    await trio.sleep(0.01)
            stats = pool.statistics()
            assert (stats.evicted, stats.recycled, stats.idle) == (0, 1, 1)
            checks.check_pool(pool)


async def test_reset_idle_false_never_resets_a_released_connection(autojump_clock: trio.testing.MockClock) -> None:
    """With reset_idle=False a release that cannot park (a task waits for another peer) sends our FIN, not an RST."""
    with checks.listener() as listener, checks.listener() as other:
        port, other_port = listener.getsockname()[1], other.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1, reset_idle=False) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            peer, _ = listener.accept()
            with peer:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pool.open_tcp_stream, "127.0.0.1", other_port)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not await stream.release()  # a waiter for another open: not parked
                    # Our FIN (from the drain, after its grace), no reset.
                    peer.setblocking(False)
                    with trio.fail_after(5):
                        while True:
                            try:
                                data = peer.recv(1)
                            except BlockingIOError:
                                await trio.sleep(0.001)
                            else:
                                break
                    assert data == b""
                    peer.close()
                    nursery.cancel_scope.cancel()
