"""httpx and httpcore over recycled sockets: a network backend and a transport.

Install the extra (``pip install 'trio-recycle[httpx]'``), then::

    async with trio_recycle.open_socket_pool(capacity=32) as pool:
        async with httpx.AsyncClient(transport=RecyclingTransport(pool)) as client:
            response = await client.get("http://127.0.0.1:8000/")

`RecyclingTransport` is `httpx.AsyncHTTPTransport` with its connections
taken from the pool; `RecyclingBackend` is the `httpcore` network backend
under it, for programs that use httpcore directly.
"""

# httpx 0.28 has no public parameter for httpcore's network backend, so
# RecyclingTransport builds a stock httpx.AsyncHTTPTransport (every keyword
# argument keeps its meaning, the proxy and TLS setup included) and points
# its httpcore pool at our backend. That and reading a connection's network
# stream are the only accesses to private attributes of httpx or httpcore,
# in _httpx_parts.py (use_backend, network_stream);
# tests/test_httpx.py checks it against the installed versions.

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

try:
    import httpcore
    import httpx
except ImportError as _exc:  # pragma: no cover - the tests run with the extra
    raise ImportError(
        f"trio_recycle.httpx needs httpx and httpcore ({_exc}): pip install 'trio-recycle[httpx]'"
    ) from _exc

import attrs
import trio

from . import _pressure
from ._arguments import HttpcoreSocketOption
from ._httpcore_stream import NetworkStream, deadline, exchange, give_back_if_cancelled
from ._httpx_parts import Relieving as _Relieving
from ._httpx_parts import backend_pool as _backend_pool
from ._httpx_parts import check_socket_options as _check_socket_options
from ._httpx_parts import network_stream as _network_stream
from ._httpx_parts import replayable as _replayable
from ._httpx_parts import use_backend as _use_backend

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable, Iterator
    from types import TracebackType

    from typing_extensions import Self

    from ._pool import SocketPool

__all__ = ["RecyclingBackend", "RecyclingTransport"]

#: httpcore's socket options: ``(level, option, int)``, ``(level, option,
#: bytes)`` and ``(level, option, None, optlen)``, as for
#: :meth:`socket.socket.setsockopt`.
SocketOption = HttpcoreSocketOption

#: Seconds httpx keeps an idle keep-alive connection by default.
_HTTPX_KEEPALIVE_EXPIRY: Final = 5.0


@final
@attrs.define(eq=False)
class RecyclingBackend(httpcore.AsyncNetworkBackend):
    """An `httpcore.AsyncNetworkBackend` whose TCP connections come from a pool.

    Pass it to any httpcore connection pool (``network_backend=``); for
    httpx, use `RecyclingTransport`. Every TCP connection is opened with
    `SocketPool.open_tcp_stream <trio_recycle.SocketPool.open_tcp_stream>`
    and its socket goes back to the pool when httpcore closes it: at once
    when the server's FIN is already there, otherwise after the pool's
    bounded background drain. httpcore keeps its own keep-alive
    connections; they hold their sockets, in use as far as the pool is
    concerned, until httpcore closes them.

    Args:
      pool: The `~trio_recycle.SocketPool` to take sockets from. It must
          outlive every connection made through this backend: when its
          ``async with`` block exits, connections still open are closed.

    Raises:
      TypeError: ``pool`` is not an open `~trio_recycle.SocketPool` (the
          object ``open_socket_pool()`` returns is the context manager, not
          the pool).
    """

    _pool: SocketPool = attrs.field(converter=_backend_pool)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Open a TCP connection to ``host:port`` with a socket from the pool.

        Waiting for a free socket when the pool is at capacity counts
        against ``timeout``, like the connect itself; a timeout that finds
        the open still waiting is `httpcore.PoolTimeout`.

        Args:
          host: The host name or address literal.
          port: The port.
          timeout: Seconds for the whole open; None waits forever.
          local_address: Local IP address to bind to, as in
              `trio.open_tcp_stream`.
          socket_options: Set on the socket after it connects, for this
              connection only: the pool restores the options it can read
              back exactly (``TCP_NODELAY``, ``SO_KEEPALIVE``, the
              keepalive timers, ...) before the socket's next use, and
              closes instead of recycling a socket that got any other
              option. Options meant for every connection are cheaper as
              the pool's own ``socket_options``.

        Returns:
          httpcore.AsyncNetworkStream: the connection.

        Raises:
          httpcore.PoolTimeout: no socket from the pool within
              ``timeout``: it was full all along.
          httpcore.ConnectTimeout: a socket, but not connected within
              ``timeout``.
          httpcore.ConnectError: the name did not resolve, every address
              refused or failed, a socket option was refused, or the
              pool's block has exited.
          TypeError: ``socket_options`` has an entry of none of the three
              shapes.
          ValueError: a ``socket_options`` int does not fit a C int.
        """
        options = _check_socket_options(socket_options)
        try:
            with _pressure.wait_cell() as cell, trio.CancelScope(deadline=deadline(timeout)) as scope:
                stream = await self._pool.open_tcp_stream(host, port, local_address=local_address)
        except trio.ClosedResourceError as exc:
            raise httpcore.ConnectError(
                f"cannot connect to {host}:{port}: the trio_recycle.SocketPool is closed"
                " (its `async with open_socket_pool()` block has exited)"
            ) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or repr(exc)) from exc
        if scope.cancelled_caught:
            if cell.waiting:
                raise httpcore.PoolTimeout(
                    f"no socket for {host}:{port} within {timeout} seconds: the trio_recycle.SocketPool was full"
                    f" (capacity {self._pool.statistics().capacity}, every socket in use, draining or parked)"
                )
            raise httpcore.ConnectTimeout(f"not connected to {host}:{port} within {timeout} seconds")
        try:
            for option in options:
                stream.setsockopt(*option)
        except BaseException as exc:
            # Whatever setsockopt() raises, the stream must not outlive the
            # error: dropped, it would hold its place until collected.
            await trio.aclose_forcefully(stream)
            if isinstance(exc, OSError):
                raise httpcore.ConnectError(f"socket option {option!r}: {exc}") from exc
            raise
        await give_back_if_cancelled(stream)
        return NetworkStream(stream, stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the Unix socket at ``path``, without the pool.

        Unix sockets leave no TIME_WAIT behind and cannot be disconnected,
        so there is nothing to recycle; this is `trio.open_unix_socket`.

        Raises:
          httpcore.ConnectTimeout: not connected within ``timeout``.
          httpcore.ConnectError: the connect or a socket option failed.
          TypeError: ``socket_options`` has an entry of none of the three
              shapes.
          ValueError: a ``socket_options`` int does not fit a C int.
        """
        options = _check_socket_options(socket_options)
        try:
            with trio.CancelScope(deadline=deadline(timeout)) as scope:
                stream = await trio.open_unix_socket(path)
            if not scope.cancelled_caught:
                try:
                    for option in options:
                        stream.setsockopt(*option)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or repr(exc)) from exc
        if scope.cancelled_caught:
            raise httpcore.ConnectTimeout(f"not connected to {path} within {timeout} seconds")
        await give_back_if_cancelled(stream)
        return NetworkStream(stream, stream)

    async def sleep(self, seconds: float) -> None:
        """`trio.sleep`: httpcore waits between connect retries with it."""
        await trio.sleep(seconds)


@final
class RecyclingTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncHTTPTransport` whose connections use sockets from a pool.

    ::

        client = httpx.AsyncClient(transport=RecyclingTransport(pool))

    The keyword arguments are `httpx.AsyncHTTPTransport`'s, with the same
    meaning (TLS verification, HTTP/2, limits, retries, proxies, Unix
    sockets, socket options); only the default of ``limits`` differs.
    Connections to the server, or to the proxy, come from
    `RecyclingBackend`. Close the transport (the client does, on exit)
    before the pool's block exits, so that every socket goes back.

    Several transports (clients) may share one pool. A connection that
    httpcore keeps idle holds its socket; when a task of any client must
    wait for a socket, the pool first takes one back from an idle
    connection (expired ones first, then the least recently used), so an
    idle client never starves a busy one. A connection closed while idle
    is ended by the disconnect itself when nothing is in flight: no
    TIME_WAIT on either side.

    An idempotent request (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) that
    fails on a reused connection before any byte of its answer arrived
    (the server closed the idle connection just as the request went out)
    is sent once more, on a fresh connection.

    Args:
      pool: The `~trio_recycle.SocketPool` to take sockets from.
      verify: As for httpx: True, a CA bundle path, an `ssl.SSLContext`, or
          False.
      cert: As for httpx: a client certificate file, or (file, key) or
          (file, key, password).
      trust_env: As for httpx: read ``SSL_CERT_FILE`` and friends.
      http1: As for httpx.
      http2: As for httpx (needs the ``h2`` package).
      limits: As for httpx. None (the default) means ``max_connections``
          and ``max_keepalive_connections`` both at the pool's capacity,
          with httpx's keep-alive expiry of 5 seconds. Not httpx's 100 and
          20: a connection beyond the pool's capacity would only wait in
          the pool, against its connect timeout; and with fewer keep-alive
          connections than sockets, httpcore closes an idle connection
          whenever it holds more than that many, so over many hosts most
          requests would open a new connection (and leave a TIME_WAIT)
          although the pool had room to keep it.
      proxy: As for httpx: the connections to the proxy come from the pool.
      uds: As for httpx; Unix sockets do not use the pool.
      local_address: As for httpx.
      retries: As for httpx: connect retries.
      socket_options: As for httpx; see `RecyclingBackend.connect_tcp` for
          how the pool treats them.

    Raises:
      TypeError: ``pool`` is not an open `~trio_recycle.SocketPool`.
    """

    def __init__(
        self,
        pool: SocketPool,
        *,
        verify: ssl.SSLContext | str | bool = True,
        cert: str | tuple[str, str] | tuple[str, str, str] | None = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        proxy: httpx.URL | str | httpx.Proxy | None = None,
        uds: str | None = None,
        local_address: str | None = None,
        retries: int = 0,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> None:
        # Checked here too, so that a bad entry fails now, not at the first
        # request; and taken as a tuple, in case it is an iterator.
        self._backend: Final = RecyclingBackend(pool)
        pool = self._backend._pool
        options = None if socket_options is None else _check_socket_options(socket_options)
        if limits is None:
            capacity = pool.statistics().capacity
            limits = httpx.Limits(
                max_connections=capacity,
                max_keepalive_connections=capacity,
                keepalive_expiry=_HTTPX_KEEPALIVE_EXPIRY,
            )
        self._socket_pool: Final = pool
        self._transport: Final = httpx.AsyncHTTPTransport(
            verify=verify,
            cert=cert,
            trust_env=trust_env,
            http1=http1,
            http2=http2,
            limits=limits,
            proxy=proxy,
            uds=uds,
            local_address=local_address,
            retries=retries,
            socket_options=options,
        )
        self._connections: Final = _use_backend(self._transport, self._backend)
        _pressure.register(pool, self)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; see `httpx.AsyncBaseTransport.handle_async_request`."""
        with exchange() as sent:
            try:
                response = await self._transport.handle_async_request(request)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if not (sent.reused and not sent.received and _replayable(request)):
                    raise
                # The stale-connection race: the server closed the idle
                # connection as the request went out. Once more, on a
                # fresh connection: every idle one to this origin may be as
                # stale, so they go first.
                self._end_idle(request)
                response = await self._transport.handle_async_request(request)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_Relieving(response.stream, self._socket_pool),
            extensions=response.extensions,
        )

    def idle_connections(self) -> Iterator[_pressure.Candidate]:
        """The connections httpcore holds idle, for the pool to take back when a task must wait."""
        for connection in self._connections.connections:
            stream = _network_stream(connection)
            if stream is not None and stream.reclaimable and connection.is_idle():
                yield _pressure.Candidate(connection.has_expired(), stream.last_used, stream.end_idle)

    def _end_idle(self, request: httpx.Request | None) -> None:
        """End the idle connections to ``request``'s origin (None: every one) by the disconnect, when they can be.

        Before the transport closes, so that an idle HTTP/2 connection, whose
        close httpcore does not tell apart from one cut mid-stream, ends as
        an idle HTTP/1.1 one does: no FIN, no drain, no TIME_WAIT.
        """
        origin = None
        if request is not None:
            url = request.url
            origin = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=b"/").origin
        for connection in self._connections.connections:
            stream = _network_stream(connection)
            if (
                stream is not None
                and stream.reclaimable
                and connection.is_idle()
                and (origin is None or connection.can_handle_request(origin))
            ):
                stream.end_idle()

    async def aclose(self) -> None:
        """Close every connection; their sockets go back to the pool."""
        self._end_idle(None)
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        await self._transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self._end_idle(None)
        await self._transport.__aexit__(exc_type, exc_value, traceback)
