"""RecyclingStream: trio's conformance suite and the stream's own rules."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_recycle
from trio_recycle import RecyclingStream, SocketPool

from . import checks
from .conftest import StartServer, answer_then_close, answer_then_reset, read_until_eof

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture
async def pool() -> AsyncIterator[SocketPool]:
    async with trio_recycle.open_socket_pool(capacity=8, eof_timeout=2.0) as pool:
        yield pool


def _clog(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass


async def _check(pool: SocketPool, host: str) -> None:
    with checks.listener(host) as sock, trio.socket.from_stdlib_socket(sock) as listener:
        port = listener.getsockname()[1]

        async def stream_maker() -> tuple[RecyclingStream, trio.SocketStream]:
            client = await pool.open_tcp_stream(host, port)
            server_sock, _ = await listener.accept()
            return client, trio.SocketStream(server_sock)

        async def clogged_stream_maker() -> tuple[RecyclingStream, trio.SocketStream]:
            client, server = await stream_maker()
            _clog(client._sock)
            _clog(server.socket._sock)  # type: ignore[attr-defined]
            return client, server

        await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


async def test_conformance_fresh_sockets(pool: SocketPool, loopback: str) -> None:
    """trio.testing.check_half_closeable_stream passes with new pool sockets."""
    await _check(pool, loopback)


async def test_conformance_recycled_sockets(loopback: str, start_server: StartServer) -> None:
    """The same suite passes when every stream runs on a recycled socket."""
    server = await start_server(answer_then_close, loopback)
    async with trio_recycle.open_socket_pool(capacity=4, eof_timeout=2.0, peer_affinity=False) as pool:
        # Warm the pool: four sockets, each used and recycled once.
        streams = [await pool.open_tcp_stream(loopback, server.port) for _ in range(4)]
        for stream in streams:
            await stream.send_all(b"warm")
            assert await read_until_eof(stream) == b"ok:warm"
            await stream.aclose()
        assert pool.statistics().idle == 4
        await _check(pool, loopback)
        # Each stream the suite opened took one of the four recycled sockets.
        assert pool.statistics().reused >= 4


async def test_send_after_send_eof_raises(pool: SocketPool, start_server: StartServer) -> None:
    """send_all after send_eof raises ClosedResourceError; send_eof is idempotent."""
    server = await start_server(answer_then_close)
    async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(b"x")
        await stream.send_eof()
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"y")
        assert await read_until_eof(stream) == b"ok:x"


async def test_receive_some_validates_max_bytes(pool: SocketPool, start_server: StartServer) -> None:
    """max_bytes must be a positive int or None."""
    server = await start_server(answer_then_close)
    async with await pool.open_tcp_stream("127.0.0.1", server.port) as stream:
        with pytest.raises(ValueError, match="max_bytes"):
            await stream.receive_some(0)
        with pytest.raises(TypeError, match="max_bytes"):
            await stream.receive_some(1.5)  # type: ignore[arg-type]


async def test_every_call_checkpoints(pool: SocketPool, start_server: StartServer) -> None:
    """open, send_all, receive_some, send_eof and aclose are each a checkpoint."""
    server = await start_server(answer_then_close)
    with trio.testing.assert_checkpoints():
        stream = await pool.open_tcp_stream("127.0.0.1", server.port)
    with trio.testing.assert_checkpoints():
        await stream.send_all(b"x")
    with trio.testing.assert_checkpoints():
        await stream.receive_some()
    with trio.testing.assert_checkpoints():
        await stream.send_eof()
    with trio.testing.assert_checkpoints():
        await stream.aclose()
    with trio.testing.assert_checkpoints():
        await stream.aclose()


async def test_socket_options_through_the_stream(pool: SocketPool, start_server: StartServer) -> None:
    """getsockopt/setsockopt reach the socket; both fail once closed."""
    server = await start_server(answer_then_close)
    stream = await pool.open_tcp_stream("127.0.0.1", server.port)
    assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert len(stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)) == 8
    assert stream.getpeername() == ("127.0.0.1", server.port)
    assert stream.getsockname()[0] == "127.0.0.1"
    with pytest.raises(TypeError):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, None)  # type: ignore[call-overload]
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with pytest.raises(trio.ClosedResourceError):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with pytest.raises(trio.ClosedResourceError):
        stream.getpeername()


async def test_send_eof_after_a_reset_is_broken_and_not_recycled(start_server: StartServer) -> None:
    """send_eof on a connection the peer reset raises BrokenResourceError; the socket is then closed."""
    server = await start_server(answer_then_reset)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await stream.send_all(b"x")
        while server.finished < 1:  # the server has sent its RST
            await server.finished_event.wait()
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_eof()
        await stream.aclose()
        stats = pool.statistics()
        assert (stats.recycled, stats.discarded, stats.idle) == (0, 1, 0)


async def test_setsockopt_with_a_length_and_its_argument_checks(pool: SocketPool, start_server: StartServer) -> None:
    """setsockopt(level, option, None, length) as in the socket module, and its two misuses raise TypeError."""
    server = await start_server(answer_then_close)
    async with await pool.open_tcp_stream(server.host, server.port) as stream:
        with pytest.raises(TypeError, match="must not be None"):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, None)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="must be None when specifying optlen"):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, 4)  # type: ignore[call-overload]
        # A zero-length option with no value: a string option such as
        # SO_BINDTODEVICE, set to "" (no device). Not restorable, so the
        # socket is closed, not recycled.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, None, 0)
        await stream.send_all(b"x")
        assert await read_until_eof(stream) == b"ok:x"
    stats = pool.statistics()
    assert (stats.recycled, stats.discarded) == (0, 1)
