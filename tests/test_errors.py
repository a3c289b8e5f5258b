"""OSError from a socket call mapped the way trio.SocketStream maps it."""

from __future__ import annotations

import errno
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_recycle
from trio_recycle._errors import closed_stream_error, translate_oserror, wrong_run_error

from .conftest import StartServer, UDPPeer, answer_then_close, never_close

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOTSOCK])
def test_gone_descriptor_means_closed(code: int) -> None:
    """EBADF/ENOTSOCK: the resource was closed under us."""
    assert isinstance(translate_oserror(OSError(code, "x")), trio.ClosedResourceError)


@pytest.mark.parametrize("code", [errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, None])
def test_anything_else_means_broken(code: int | None) -> None:
    """Any other error: the connection broke, and the message keeps the original."""
    error = translate_oserror(OSError(code, "boom"))
    assert isinstance(error, trio.BrokenResourceError)
    assert "boom" in str(error)


def test_closed_stream_error_says_closed() -> None:
    """The error for calls after aclose names the cause."""
    assert "closed" in str(closed_stream_error())


def test_closed_by_the_pool_says_the_pool_block_exited() -> None:
    """The error for a stream the pool's exit closed names the pool's block, not just 'closed'."""
    message = str(closed_stream_error(by_pool=True))
    assert "open_socket_pool()" in message
    assert "exited" in message


async def test_calls_after_the_pool_exit_say_the_pool_block_exited(start_server: StartServer) -> None:
    """Every call on a stream the pool's exit closed says that; a stream closed by aclose does not."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool() as pool:
        closed_by_us = await pool.open_tcp_stream(server.host, server.port)
        await closed_by_us.aclose()
        stream = await pool.open_tcp_stream(server.host, server.port)
    with pytest.raises(trio.ClosedResourceError, match="already closed"):
        await closed_by_us.send_all(b"x")
    for call in (partial(stream.send_all, b"x"), stream.receive_some, stream.send_eof):
        with pytest.raises(trio.ClosedResourceError, match=r"block has exited"):
            await call()
    with pytest.raises(trio.ClosedResourceError, match=r"block has exited"):
        stream.getpeername()


async def test_task_blocked_at_the_pool_exit_is_told_why(start_server: StartServer, udp_peer: UDPPeer) -> None:
    """Tasks blocked in receive_some / receive when the pool's block exits hear that it exited."""
    server = await start_server(never_close)
    peer = await udp_peer()
    errors: list[BaseException] = []

    async def blocked(receive: Callable[[], Awaitable[bytes]]) -> None:
        try:
            await receive()
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery, trio_recycle.open_socket_pool() as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        udp = await pool.open_udp_socket("127.0.0.1", peer.getsockname()[1])
        nursery.start_soon(blocked, stream.receive_some)
        nursery.start_soon(blocked, udp.receive)
        await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 2
    for error in errors:
        assert "block has exited" in str(error)


def test_wrong_run_message_says_what_was_opened_where() -> None:
    """The pool 'was opened in another trio.run'; a stream or UDP socket 'belongs to a pool opened' there."""
    pool_message = str(wrong_run_error("SocketPool"))
    assert pool_message.startswith("this trio_recycle.SocketPool was opened in another trio.run: ")
    assert "SocketPool of" not in pool_message
    stream_message = str(wrong_run_error("RecyclingStream"))
    assert stream_message.startswith("this trio_recycle.RecyclingStream belongs to a pool opened in another trio.run")
