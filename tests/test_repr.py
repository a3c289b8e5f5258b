"""Short reprs: addresses, state and the pool's counts, never the pool's contents."""

from __future__ import annotations

import re

import trio
import trio.testing

import trio_recycle
from trio_recycle._addresses import format_address

from . import checks
from .conftest import StartServer, UDPPeer, answer_then_close, never_close, read_until_eof


async def test_pool_repr_shows_counts_and_state(start_server: StartServer) -> None:
    """The pool's repr gives owned/capacity, each state's count and waiters; closed once its block exits."""
    server = await start_server(never_close)
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        assert repr(pool) == (
            "<trio_recycle.SocketPool open, recycling: 0/2 sockets"
            " (0 in use, 0 idle, 0 parked, 0 draining), 0 tasks waiting>"
        )
        first = await pool.open_tcp_stream(server.host, server.port)
        second = await pool.open_tcp_stream(server.host, server.port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.open_tcp_stream, server.host, server.port)
            await trio.testing.wait_all_tasks_blocked()
            assert repr(pool) == (
                "<trio_recycle.SocketPool open, recycling: 2/2 sockets"
                " (2 in use, 0 idle, 0 parked, 0 draining), 1 task waiting>"
            )
            nursery.cancel_scope.cancel()
        await first.aclose()  # no FIN from never_close: drains in the background
        assert "(1 in use, 0 idle, 0 parked, 1 draining)" in repr(pool)
        await second.aclose()
    assert repr(pool).startswith("<trio_recycle.SocketPool closed, recycling: 0/2 sockets")


async def test_pool_repr_says_when_it_does_not_recycle() -> None:
    """recycle=False shows in the repr."""
    async with trio_recycle.open_socket_pool(recycle=False) as pool:
        assert repr(pool).startswith("<trio_recycle.SocketPool open, not recycling: 0/64 sockets")


async def test_repr_stays_short_however_many_sockets_the_pool_owns(start_server: StartServer) -> None:
    """A stream's repr has no pool in it, and the pool's does not grow with its sockets."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=64) as pool:
        streams = [await pool.open_tcp_stream(server.host, server.port) for _ in range(64)]
        assert len(repr(pool)) < 120
        for stream in streams:
            assert len(repr(stream)) < 100
            assert "SocketPool" not in repr(stream)
        for stream in streams:
            await stream.aclose()


async def test_stream_repr_shows_addresses_and_state(start_server: StartServer, loopback: str) -> None:
    """Local and peer address (IPv6 in brackets), EOF in either direction, closed."""
    server = await start_server(answer_then_close, loopback)
    async with trio_recycle.open_socket_pool(peer_affinity=True) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        local_port = stream.getsockname()[1]
        host = f"[{loopback}]" if ":" in loopback else loopback
        assert repr(stream) == f"<trio_recycle.RecyclingStream {host}:{local_port} -> {host}:{server.port}>"
        await stream.send_all(b"ping")
        await stream.send_eof()
        assert await read_until_eof(stream) == b"ok:ping"
        assert repr(stream).endswith(f"{host}:{server.port}, EOF received, EOF sent>")
        await stream.aclose()
        assert repr(stream) == "<trio_recycle.RecyclingStream closed>"
        stream = await pool.open_tcp_stream(server.host, server.port)
    assert repr(stream) == "<trio_recycle.RecyclingStream closed by its pool's exit>"


async def test_udp_repr_shows_addresses_and_state(udp_peer: UDPPeer) -> None:
    """A UDP socket's repr: local -> peer while open, closed after."""
    peer = await udp_peer()
    port = peer.getsockname()[1]
    async with trio_recycle.open_socket_pool() as pool:
        udp = await pool.open_udp_socket("127.0.0.1", port)
        local_port = udp.getsockname()[1]
        assert repr(udp) == f"<trio_recycle.RecyclingUDPSocket 127.0.0.1:{local_port} -> 127.0.0.1:{port}>"
        await udp.aclose()
        assert repr(udp) == "<trio_recycle.RecyclingUDPSocket closed>"


async def test_pooled_socket_repr(start_server: StartServer) -> None:
    """The pool's own socket record: descriptor, type and family, the peer it is kept for."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(peer_affinity=True) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        psock = checks.pooled_socket_of(stream)
        assert repr(psock) == (
            f"<trio_recycle.PooledSocket IN_USE fd={psock.sock.fileno()} TCP/IPv4 peer=127.0.0.1:{server.port}>"
        )
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 65536)  # cannot be restored
        assert repr(psock).endswith(" tainted>")
        await stream.aclose()
    assert re.fullmatch(r"<trio_recycle\.PooledSocket CLOSED TCP/IPv4 peer=127\.0\.0\.1:\d+ tainted>", repr(psock))


async def test_pooled_socket_repr_without_peer_affinity(start_server: StartServer) -> None:
    """With peer_affinity=False a socket is kept for no peer, and the repr names none."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(peer_affinity=False) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        assert "peer=" not in repr(checks.pooled_socket_of(stream))
        await stream.send_all(b"ping")
        await stream.send_eof()
        assert await read_until_eof(stream) == b"ok:ping"
        # The connection is over, so the kernel no longer knows the peer, and
        # without affinity the pool does not keep it either.
        assert repr(stream).endswith(" -> ?, EOF received, EOF sent>")
        await stream.aclose()


def test_format_address() -> None:
    """IPv4 host:port, IPv6 in brackets, anything else (an AF_UNIX path) as its repr."""
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"
    assert format_address("/run/app.sock") == "'/run/app.sock'"
