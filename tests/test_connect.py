"""Resolution and connection: the numeric fast path, local_address, names."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

import trio_recycle
from trio_recycle import _connect

from .checks import assert_capacity
from .conftest import ResolveNames, StartServer, answer_then_close, cycle, read_until_eof


class _SpawnCounter(trio.abc.Instrument):
    """Count tasks spawned in nurseries of the current task (the server's don't count)."""

    def __init__(self) -> None:
        self.spawned = 0
        self.task = trio.lowlevel.current_task()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        nursery = task.parent_nursery
        if nursery is not None and nursery.parent_task is self.task:
            self.spawned += 1


async def test_numeric_host_starts_no_task_and_no_thread(start_server: StartServer, loopback: str) -> None:
    """An IP literal with one address: no nursery task, no worker thread."""
    server = await start_server(answer_then_close, loopback)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        await cycle(pool, server)  # warm: the next open reuses the idle socket
        await trio.testing.wait_all_tasks_blocked()
        counter = _SpawnCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            stream = await pool.open_tcp_stream(loopback, server.port)
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.spawned == 0
        assert pool.statistics().reused == 1
        async with stream:
            await stream.send_all(b"x")
            assert await read_until_eof(stream) == b"ok:x"


async def test_names_go_through_trio_getaddrinfo(start_server: StartServer, resolve_names: ResolveNames) -> None:
    """A name is resolved by trio.socket.getaddrinfo (so custom resolvers apply)."""
    server = await start_server(answer_then_close)
    resolve_names({"upstream.test": [("127.0.0.1", socket.AF_INET)]})
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        async with await pool.open_tcp_stream("upstream.test", server.port) as stream:
            assert stream.getpeername() == ("127.0.0.1", server.port)
            await stream.send_all(b"x")
            await read_until_eof(stream)
        async with await pool.open_tcp_stream(b"upstream.test", server.port) as stream:
            await stream.send_all(b"y")
            assert await read_until_eof(stream) == b"ok:y"
        assert pool.statistics().reused == 1


async def test_local_address_binds_and_separates_sockets(start_server: StartServer) -> None:
    """local_address binds the source address; sockets bound differently are not mixed."""
    server = await start_server(answer_then_close, "127.0.0.1")
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        for local in ("127.0.0.2", "127.0.0.3", "127.0.0.2"):
            async with await pool.open_tcp_stream("127.0.0.1", server.port, local_address=local) as stream:
                assert stream.getsockname()[0] == local
                await stream.send_all(b"x")
                await read_until_eof(stream)
        stats = pool.statistics()
        assert (stats.created, stats.reused, stats.idle) == (2, 1, 2)
        assert_capacity(pool)


async def test_local_address_of_the_wrong_family_names_it(start_server: StartServer) -> None:
    """An IPv6 local_address for an IPv4 peer fails with an OSError naming local_address."""
    server = await start_server(answer_then_close, "127.0.0.1")
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        with pytest.raises(OSError, match="local_address"):
            await pool.open_tcp_stream("127.0.0.1", server.port, local_address="::1")
        with pytest.raises(TypeError, match="local_address"):
            await pool.open_tcp_stream("127.0.0.1", server.port, local_address=b"127.0.0.1")  # type: ignore[arg-type]
        stats = pool.statistics()
        # socket() ran and bind() failed: counted, and closed.
        assert (stats.in_use, stats.idle, stats.created, stats.discarded) == (0, 0, 1, 1)
        assert await cycle(pool, server) == b"ok:ping"


async def test_happy_eyeballs_delay_none_waits_for_each_failure(
    resolve_names: ResolveNames, start_server: StartServer
) -> None:
    """happy_eyeballs_delay=None tries addresses one after another."""
    server = await start_server(answer_then_close, "127.0.0.1")
    with socket.socket() as refuser:
        refuser.bind(("127.0.0.4", server.port))  # bound, not listening
        resolve_names({"seq.test": [("127.0.0.4", socket.AF_INET), ("127.0.0.1", socket.AF_INET)]})
        async with trio_recycle.open_socket_pool(capacity=2) as pool:
            async with await pool.open_tcp_stream("seq.test", server.port, happy_eyeballs_delay=None) as stream:
                await stream.send_all(b"x")
                assert await read_until_eof(stream) == b"ok:x"
            stats = pool.statistics()
            assert (stats.created, stats.discarded) == (2, 1)


async def test_happy_eyeballs_delay_of_the_wrong_type_names_it() -> None:
    """A happy_eyeballs_delay that is not a number or None: TypeError naming it, nothing taken."""
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        with pytest.raises(TypeError, match="happy_eyeballs_delay"):
            await pool.open_tcp_stream("127.0.0.1", 80, happy_eyeballs_delay="soon")  # type: ignore[arg-type]
        assert pool.statistics().created == 0


async def test_name_resolution_drops_duplicates_and_interleaves_families(resolve_names: ResolveNames) -> None:
    """Duplicate addresses are tried once, and the first address of the other family comes second (RFC 6555)."""
    resolve_names(
        {
            "many.test": [
                ("::1", socket.AF_INET6),
                ("::1", socket.AF_INET6),
                ("::ffff:127.0.0.1", socket.AF_INET6),
                ("127.0.0.1", socket.AF_INET),
            ]
        }
    )
    targets = await _connect.resolve("many.test", 80, socket.SOCK_STREAM)
    assert [(family, address) for family, _, _, address in targets] == [
        (socket.AF_INET6, ("::1", 80, 0, 0)),
        (socket.AF_INET, ("127.0.0.1", 80)),
        (socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0)),
    ]


async def test_name_without_addresses_raises_oserror_naming_it(resolve_names: ResolveNames) -> None:
    """A name that resolves to no address at all: OSError naming the host, nothing taken."""
    resolve_names({"empty.test": []})
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        with pytest.raises(OSError, match=r"no results found for hostname lookup: empty\.test:80"):
            await pool.open_tcp_stream("empty.test", 80)
        assert pool.statistics().created == 0


async def test_udp_connect_refused_by_the_kernel_gives_the_socket_back() -> None:
    """A UDP connect the kernel refuses (broadcast without SO_BROADCAST): OSError with its errno, socket discarded."""
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        with pytest.raises(OSError, match=r"255\.255\.255\.255") as info:
            await pool.open_udp_socket("255.255.255.255", 9)
        assert info.value.errno == errno.EACCES
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.in_use) == (1, 1, 0)
        assert_capacity(pool)


async def test_udp_connect_failing_differently_per_address_has_no_single_errno(resolve_names: ResolveNames) -> None:
    """Two addresses failing with different errnos: one OSError naming both, without an errno of its own."""
    resolve_names({"nowhere.test": [("255.255.255.255", socket.AF_INET), ("ff02::1", socket.AF_INET6)]})
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        with pytest.raises(OSError, match=r"255\.255\.255\.255.*ff02::1") as info:
            await pool.open_udp_socket("nowhere.test", 9)
        assert info.value.errno is None
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.in_use) == (2, 2, 0)
