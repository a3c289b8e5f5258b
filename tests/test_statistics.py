"""Per-peer statistics against what the test did and against a recount of the pool's sockets."""

from __future__ import annotations

import trio

import trio_recycle

from . import checks
from .conftest import KeepAlive, StartServer, answer_then_close, cycle, exchange, keep_alive


async def test_peer_statistics_count_each_peer_apart(start_server: StartServer) -> None:
    """Two peers: opens, reuse, keep-alive and parked connections each counted for their own peer."""
    closing = await start_server(answer_then_close)
    keeping = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=4, peer_affinity=True) as pool:
        for _ in range(3):
            await cycle(pool, closing)
        for _ in range(3):
            stream = await pool.open_tcp_stream(keeping.host, keeping.port)
            await exchange(stream, b"x")
            assert await stream.release()
        checks.check_pool(pool)
        a = pool.peer_statistics((closing.host, closing.port))
        b = pool.peer_statistics((keeping.host, keeping.port))
        assert (a.opens, a.reused, a.kept_alive, a.in_use, a.parked) == (3, 2, 0, 0, 0)
        assert (b.opens, b.reused, b.kept_alive, b.in_use, b.parked) == (3, 0, 2, 0, 1)
        held = await pool.open_tcp_stream(keeping.host, keeping.port)
        assert held.kept_alive
        assert pool.peer_statistics((keeping.host, keeping.port)).in_use == 1
        checks.check_pool(pool)
        await held.aclose()
        assert set(pool.statistics_by_peer()) == {(closing.host, closing.port), (keeping.host, keeping.port)}
        unknown = pool.peer_statistics(("127.0.0.1", 9))
        assert unknown == trio_recycle.PeerStatistics(("127.0.0.1", 9))


async def test_evictions_are_counted_for_the_peer_that_lost_its_connection(start_server: StartServer) -> None:
    """A parked connection evicted for another peer: evicted counts on its own peer and in the pool's total."""
    first = await start_server(keep_alive(KeepAlive()))
    second = await start_server(keep_alive(KeepAlive()))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(first.host, first.port)
        await exchange(stream, b"x")
        assert await stream.release()
        stream = await pool.open_tcp_stream(second.host, second.port)
        await exchange(stream, b"y")
        await stream.aclose()
        with trio.fail_after(10):
            while pool.statistics().draining:  # noqa: ASYNC110 - the drain has no event to wait on
                await trio.sleep(0.001)
        assert pool.statistics().evicted == 1
        assert pool.peer_statistics((first.host, first.port)).evicted == 1
        assert pool.peer_statistics((second.host, second.port)).evicted == 0
        checks.check_pool(pool)
