"""The parts of trio_recycle.httpx below its two classes: argument checks, replay, private attributes."""

# Imported only by trio_recycle.httpx, after it has imported httpx and
# httpcore (or said which extra to install). Everything here that touches
# a private attribute of httpx or httpcore is in network_stream and
# use_backend; tests/test_httpx.py checks both against the installed
# versions.

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

import httpcore
import httpx

from . import _pressure
from ._arguments import HttpcoreSocketOption, check_httpcore_socket_options
from ._httpcore_stream import NetworkStream
from ._pool import SocketPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

__all__ = [
    "Relieving",
    "backend_pool",
    "check_pool",
    "check_socket_options",
    "network_stream",
    "replayable",
    "use_backend",
]

SocketOption = HttpcoreSocketOption

#: Methods whose request may be sent twice with the effect of once (RFC 9110
#: section 9.2.2): the ones the stale-connection retry resends. TRACE too.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def check_pool(pool: object, who: str) -> SocketPool:
    """``pool``, if it is an open `SocketPool`; else the TypeError that says what it is instead."""
    if not isinstance(pool, SocketPool):
        hint = ""
        if hasattr(pool, "__aenter__"):
            hint = (
                ": open_socket_pool() returns an async context manager;"
                " use `async with trio_recycle.open_socket_pool(...) as pool:` and pass that pool"
            )
        raise TypeError(f"{who} takes an open trio_recycle.SocketPool, not {pool!r}{hint}")
    try:
        closed = pool.closed
    except RuntimeError:  # another trio.run, or none: the first request says so
        closed = False
    if closed:
        raise TypeError(f"{who} takes an open trio_recycle.SocketPool; {pool!r} has exited its `async with` block")
    return pool


def backend_pool(pool: object) -> SocketPool:
    return check_pool(pool, "RecyclingBackend")


def check_socket_options(socket_options: Iterable[SocketOption] | None) -> tuple[SocketOption, ...]:
    # The pool's own validator, with httpcore's shapes: one set of C-int bounds.
    if socket_options is None:
        return ()
    return check_httpcore_socket_options(socket_options)


def replayable(request: httpx.Request) -> bool:
    """Idempotent, and its body (if any) is in memory, so it can be sent again."""
    if request.method.encode() not in _IDEMPOTENT:
        return False
    try:
        request.content  # noqa: B018 - raises for a streaming body not read
    except httpx.RequestNotRead:
        return False
    return True


@final
class Relieving(httpx.AsyncByteStream):
    """A response body that, once closed, lets tasks waiting in the pool take back the connection it left idle."""

    def __init__(self, stream: httpx.AsyncByteStream | httpx.SyncByteStream, pool: SocketPool) -> None:
        assert isinstance(stream, httpx.AsyncByteStream)
        self._stream: Final = stream
        self._pool: Final = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            # Its connection is idle now, unless httpcore gave it to a
            # request of this client: a task that waited for a socket
            # meanwhile found nothing to take back when it began to wait.
            for _ in range(_pressure.tasks_waiting(self._pool)):
                if not _pressure.relieve(self._pool):
                    break


def network_stream(connection: httpcore.AsyncConnectionInterface) -> NetworkStream | None:
    """The stream under an httpcore connection from httpcore's public ``connections`` list, if it is ours.

    The one read of a private attribute besides `use_backend`'s:
    `httpcore.AsyncHTTPConnection` keeps its HTTP/1.1 or HTTP/2 connection
    in ``_connection``, which keeps its network stream in
    ``_network_stream``. Anything else (a proxy's connection, a connection
    still connecting, another httpcore) gives None, and is not reclaimed;
    tests/test_httpx.py checks that the installed httpcore keeps them there.
    """
    inner = getattr(connection, "_connection", None)
    stream = getattr(inner, "_network_stream", None)
    return stream if isinstance(stream, NetworkStream) else None


def use_backend(
    transport: httpx.AsyncHTTPTransport, backend: httpcore.AsyncNetworkBackend
) -> httpcore.AsyncConnectionPool:
    """Make ``transport``'s httpcore pool open its connections through ``backend``.

    The one place that touches private attributes: httpx keeps its httpcore
    pool in ``AsyncHTTPTransport._pool`` (an `httpcore.AsyncConnectionPool`,
    or its `~httpcore.AsyncHTTPProxy`/`~httpcore.AsyncSOCKSProxy`
    subclasses), and that pool hands ``_network_backend`` to every
    connection it creates. If a new release moves either, fail here, when
    the transport is made, instead of quietly opening sockets outside the
    pool.

    Returns:
      httpcore.AsyncConnectionPool: the transport's httpcore pool, whose
      public ``connections`` the reclaimer reads.

    Raises:
      RuntimeError: the installed httpx or httpcore keeps these elsewhere.
    """
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        raise RuntimeError(
            f"httpx {httpx.__version__} with httpcore {httpcore.__version__} does not keep its connection pool"
            " where trio_recycle.httpx expects it (AsyncHTTPTransport._pool._network_backend);"
            " RecyclingTransport cannot use this version: please report it"
        )
    pool._network_backend = backend
    return pool
