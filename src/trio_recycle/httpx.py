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
# its httpcore pool at our backend. That is the only access to private
# attributes of httpx or httpcore, in _use_backend() below;
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

from ._arguments import HttpcoreSocketOption, check_httpcore_socket_options
from ._httpcore_stream import NetworkStream, deadline, give_back_if_cancelled

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable
    from types import TracebackType

    from typing_extensions import Self

    from ._pool import SocketPool

__all__ = ["RecyclingBackend", "RecyclingTransport"]

#: httpcore's socket options: ``(level, option, int)``, ``(level, option,
#: bytes)`` and ``(level, option, None, optlen)``, as for
#: :meth:`socket.socket.setsockopt`.
SocketOption = HttpcoreSocketOption

#: Most idle keep-alive connections httpx keeps by default.
_HTTPX_KEEPALIVE_CONNECTIONS: Final = 20
#: Seconds httpx keeps an idle keep-alive connection by default.
_HTTPX_KEEPALIVE_EXPIRY: Final = 5.0


def _check_socket_options(socket_options: Iterable[SocketOption] | None) -> tuple[SocketOption, ...]:
    # The pool's own validator, with httpcore's shapes: one set of C-int bounds.
    if socket_options is None:
        return ()
    return check_httpcore_socket_options(socket_options)


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
    """

    _pool: SocketPool

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
        against ``timeout``, like the connect itself.

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
          httpcore.ConnectTimeout: not connected within ``timeout``.
          httpcore.ConnectError: the name did not resolve, every address
              refused or failed, or a socket option was refused.
          TypeError: ``socket_options`` has an entry of none of the three
              shapes.
          ValueError: a ``socket_options`` int does not fit a C int.
          trio.ClosedResourceError: the pool's block has exited.
        """
        options = _check_socket_options(socket_options)
        try:
            with trio.CancelScope(deadline=deadline(timeout)) as scope:
                stream = await self._pool.open_tcp_stream(host, port, local_address=local_address)
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or repr(exc)) from exc
        if scope.cancelled_caught:
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

    Args:
      pool: The `~trio_recycle.SocketPool` to take sockets from.
      verify: As for httpx: True, a CA bundle path, an `ssl.SSLContext`, or
          False.
      cert: As for httpx: a client certificate file, or (file, key) or
          (file, key, password).
      trust_env: As for httpx: read ``SSL_CERT_FILE`` and friends.
      http1: As for httpx.
      http2: As for httpx (needs the ``h2`` package).
      limits: As for httpx. None (the default) means httpx's own defaults
          (20 keep-alive connections for 5 seconds) with ``max_connections``
          set to the pool's capacity instead of 100: httpcore's keep-alive
          connections hold pool sockets, and a connection beyond the
          pool's capacity would only wait in the pool, against its connect
          timeout, while httpcore kept an idle one it could have closed.
      proxy: As for httpx: the connections to the proxy come from the pool.
      uds: As for httpx; Unix sockets do not use the pool.
      local_address: As for httpx.
      retries: As for httpx: connect retries.
      socket_options: As for httpx; see `RecyclingBackend.connect_tcp` for
          how the pool treats them.
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
        options = None if socket_options is None else _check_socket_options(socket_options)
        if limits is None:
            capacity = pool.statistics().capacity
            limits = httpx.Limits(
                max_connections=capacity,
                max_keepalive_connections=min(_HTTPX_KEEPALIVE_CONNECTIONS, capacity),
                keepalive_expiry=_HTTPX_KEEPALIVE_EXPIRY,
            )
        self._backend: Final = RecyclingBackend(pool)
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
        _use_backend(self._transport, self._backend)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; see `httpx.AsyncBaseTransport.handle_async_request`."""
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        """Close every connection; their sockets go back to the pool."""
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
        await self._transport.__aexit__(exc_type, exc_value, traceback)


def _use_backend(transport: httpx.AsyncHTTPTransport, backend: httpcore.AsyncNetworkBackend) -> None:
    """Make ``transport``'s httpcore pool open its connections through ``backend``.

    The one place that touches private attributes: httpx keeps its httpcore
    pool in ``AsyncHTTPTransport._pool`` (an `httpcore.AsyncConnectionPool`,
    or its `~httpcore.AsyncHTTPProxy`/`~httpcore.AsyncSOCKSProxy`
    subclasses), and that pool hands ``_network_backend`` to every
    connection it creates. If a new release moves either, fail here, when
    the transport is made, instead of quietly opening sockets outside the
    pool.

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
