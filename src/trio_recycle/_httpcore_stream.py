"""NetworkStream: an httpcore network stream over a RecyclingStream, TLS or not."""

# httpcore drives a connection through five calls: read, write, aclose,
# start_tls and get_extra_info. Three facts about how it calls them shape
# this module (httpcore 1.0, _async/http11.py and _async/connection_pool.py):
#
# * Every read and write carries its own timeout, so each one gets its own
#   cancel scope, and the scope is entered only when there is a timeout.
# * httpcore closes a connection under a cancel shield, and never reads the
#   server's FIN before it does (with ``Connection: close`` the response is
#   complete at its last body byte). So aclose must not wait for the peer:
#   RecyclingStream.aclose never does, and trio.SSLStream with
#   ``https_compatible=True`` closes its transport without waiting for a
#   close_notify. The pool then finds the FIN, or drains for it, by itself.
# * Before every request, and after every response, httpcore's pool asks
#   each of its idle connections ``get_extra_info("is_readable")``: an idle
#   HTTP/1.1 connection that is readable has been closed by the server.
#   With 16 connections that is about 50 calls per request (strace figures
#   in docs/benchmarks.md), so the answer costs one poll() on one
#   descriptor through a poll object kept per stream, and no trio wait.

from __future__ import annotations

import contextlib
import contextvars
import math
import select
from typing import TYPE_CHECKING, final

import attrs
import httpcore
import trio

from ._stream import RecyclingStream

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterator

__all__ = ["Exchange", "NetworkStream", "deadline", "exchange", "give_back_if_cancelled"]

#: One of the two streams a NetworkStream can sit on: a pooled connection,
#: or (``connect_unix_socket``) a plain trio socket stream.
Transport = RecyclingStream | trio.SocketStream


@final
@attrs.define(eq=False)
class Exchange:
    """One request through `trio_recycle.httpx`, as its connection saw it (for the stale-connection retry).

    Set in a context variable around the request; the first write names
    the connection, and whether it had served a request before; a read
    that returns data marks that the answer has begun.
    """

    stream: NetworkStream | None = None
    reused: bool = False
    received: bool = False


#: The `Exchange` of the request being sent in this context, if any.
_exchange: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("trio_recycle_exchange", default=None)


@contextlib.contextmanager
def exchange() -> Iterator[Exchange]:
    """A fresh `Exchange` for the request sent inside the block."""
    cell = Exchange()
    token = _exchange.set(cell)
    try:
        yield cell
    finally:
        _exchange.reset(token)


def deadline(timeout: float | None) -> float:
    """The trio deadline for an httpcore ``timeout`` (None: no deadline)."""
    return math.inf if timeout is None else trio.current_time() + timeout


@final
@attrs.define(eq=False)
class NetworkStream(httpcore.AsyncNetworkStream):
    """An `httpcore.AsyncNetworkStream` over a trio stream.

    ``stream`` is what reads and writes go through: the transport itself, or
    a `trio.SSLStream` around it after `start_tls`. ``transport`` is the
    stream at the bottom, whose socket answers `get_extra_info`.
    """

    _stream: trio.abc.Stream
    _transport: Transport
    _poll: select.poll | None = None
    #: `trio.current_time` of the last read or write: which idle connection
    #: gives its socket back first (_pressure.py).
    last_used: float = attrs.field(factory=trio.current_time)
    #: Ended by `end_idle`, behind httpcore's back: the next request on it
    #: must go to another connection.
    _reclaimed: bool = False
    #: The last read returned data and nothing since was written, cut short
    #: or failed: for HTTP/1.1, an answer was read to its end, so a close
    #: now owes the server nothing (the pool still checks the kernel's queues).
    _answered: bool = False
    #: Some read on this connection returned data (it has served a request).
    served: bool = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Receive up to ``max_bytes``; ``b""`` at the server's EOF.

        Raises:
          httpcore.ReadTimeout: nothing arrived within ``timeout`` seconds.
          httpcore.ReadError: the connection broke or was closed.
        """
        self._answered = False
        data = None
        try:
            if timeout is None:
                data = _as_bytes(await self._stream.receive_some(max_bytes))
            else:
                with trio.CancelScope(deadline=deadline(timeout)):
                    data = _as_bytes(await self._stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(_describe(exc)) from exc
        if data is None:  # the deadline cancelled the receive
            raise httpcore.ReadTimeout(f"no data within {timeout} seconds")
        self.last_used = trio.current_time()
        if data:
            self._answered = self.served = True
            exchange = _exchange.get()
            if exchange is not None:
                exchange.received = True
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send all of ``buffer``.

        Raises:
          httpcore.WriteTimeout: not all of it could be sent within
              ``timeout`` seconds.
          httpcore.WriteError: the connection broke or was closed.
        """
        if self._reclaimed:
            # Closed by end_idle while httpcore still counted it idle (a
            # request may have been given it just before): httpcore's pool
            # takes this error to mean "try another connection".
            await trio.lowlevel.checkpoint()
            raise httpcore.ConnectionNotAvailable()
        self._answered = False
        exchange = _exchange.get()
        if exchange is not None and exchange.stream is None:
            exchange.stream = self
            exchange.reused = self.served
        self.last_used = trio.current_time()
        if not buffer:
            await trio.lowlevel.checkpoint()
            return
        try:
            if timeout is None:
                await self._stream.send_all(buffer)
                return
            with trio.CancelScope(deadline=deadline(timeout)):
                await self._stream.send_all(buffer)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpcore.WriteError(_describe(exc)) from exc
        raise httpcore.WriteTimeout(f"could not send {len(buffer)} bytes within {timeout} seconds")

    async def aclose(self) -> None:
        """Close the connection; a pooled socket goes back to its pool.

        Never waits for the server: TLS is dropped without waiting for a
        close_notify, and the pool looks for the server's FIN (or drains for
        it in the background) as for any `~trio_recycle.RecyclingStream`.
        """
        transport = self._transport
        if self._answered and isinstance(transport, RecyclingStream):
            # Idle by the last exchange: the pool may end it with the
            # disconnect itself, which leaves no TIME_WAIT (_in_flight.py).
            transport._end_now(idle=True)
        await self._stream.aclose()

    def end_idle(self) -> None:
        """Close a connection httpcore holds idle now, without awaiting; its socket is back in the pool on return.

        For `trio_recycle.httpx`'s reclaimer: httpcore still holds the
        connection, sees it readable, hence expired, and drops it at its next
        look; a request already given it gets `httpcore.ConnectionNotAvailable`
        and goes to another connection.
        """
        self._reclaimed = True
        transport = self._transport
        if isinstance(transport, RecyclingStream):
            # Idle as httpcore sees it: no request in progress, every answer
            # read (HTTP/1.1: h11 back to IDLE; HTTP/2: no open stream).
            transport._end_now(idle=True)

    @property
    def reclaimable(self) -> bool:
        """Whether `end_idle` can end this connection (pooled, not yet closed)."""
        transport = self._transport
        return isinstance(transport, RecyclingStream) and not transport._closed

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> NetworkStream:
        """Wrap the connection in TLS and do the handshake.

        The new stream reads and writes through a `trio.SSLStream` over the
        same transport; closing it closes the transport, so the socket of an
        https connection is recycled like any other.

        Raises:
          httpcore.ConnectTimeout: the handshake took more than ``timeout``
              seconds.
          httpcore.ConnectError: the handshake failed (a certificate that
              does not verify, for example) or the connection broke.
          ValueError: the ssl module refused ``server_hostname``.

        On any error the connection is closed.
        """
        try:
            # https_compatible: servers commonly close without a close_notify,
            # and a close that sends one could wait for the peer (httpcore's
            # own trio backend makes the same choice).
            ssl_stream = trio.SSLStream(
                self._stream,
                ssl_context,
                server_hostname=server_hostname,
                https_compatible=True,
            )
        except BaseException:
            # The ssl module refused an argument (a server_hostname with a
            # leading dot, say): httpcore will not close this connection.
            await trio.aclose_forcefully(self._stream)
            raise
        try:
            with trio.CancelScope(deadline=deadline(timeout)) as scope:
                await ssl_stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(ssl_stream)
            raise httpcore.ConnectError(_describe(exc)) from exc
        except BaseException:
            await trio.aclose_forcefully(ssl_stream)
            raise
        if scope.cancelled_caught:
            await trio.aclose_forcefully(ssl_stream)
            raise httpcore.ConnectTimeout(f"TLS handshake not done within {timeout} seconds")
        await give_back_if_cancelled(ssl_stream)
        return NetworkStream(ssl_stream, self._transport)

    def get_extra_info(self, info: str) -> object:
        """What httpcore and its users may ask of a network stream.

        * ``"ssl_object"``: the `ssl.SSLObject` after `start_tls`, else None.
        * ``"client_addr"``, ``"server_addr"``: our and the server's address.
        * ``"socket"``: for a pooled connection, the
          `~trio_recycle.RecyclingStream` itself, never the raw descriptor,
          which outlives the connection and will carry somebody else's next
          (it has ``getsockopt``, ``setsockopt``, ``getpeername`` and
          ``getsockname``, and dies when the connection is closed); for a
          Unix socket, the trio socket.
        * ``"is_readable"``: whether the socket has data or an EOF waiting;
          True once the connection is closed.

        Anything else is None.
        """
        if info == "is_readable":
            return self._is_readable()
        if info == "ssl_object":
            return _ssl_object(self._stream)
        if info == "client_addr":
            return self._transport_socket().getsockname()
        if info == "server_addr":
            return self._transport_socket().getpeername()
        if info == "socket":
            return self._transport_socket()
        return None

    def _transport_socket(self) -> RecyclingStream | trio.socket.SocketType:
        transport = self._transport
        return transport if isinstance(transport, RecyclingStream) else transport.socket

    def _is_readable(self) -> bool:
        transport = self._transport
        if isinstance(transport, trio.SocketStream):
            return transport.socket.is_readable()
        if transport._closed or transport._eof_seen:
            return True
        # One poll(0) on this descriptor. The poll object is ours alone and
        # lives no longer than the stream, so a descriptor that passes to
        # the socket's next owner is never polled through it again.
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(transport._sock, select.POLLIN)
        return bool(self._poll.poll(0))


async def give_back_if_cancelled(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` and raise `trio.Cancelled` if a cancellation is pending.

    The last thing a connect does before it hands httpcore a new stream.
    httpcore's first checkpoint after a connect (its HTTP/1.1 state lock)
    is outside the ``try`` that marks a failed connect, so a cancellation
    delivered there leaves a connection that no request owns in its pool,
    for good, holding the socket (httpcore issue 1093). Between this
    checkpoint and that one nothing awaits, so no cancellation can arrive
    in between: it is delivered here, inside that ``try``, and the socket
    goes back to the pool.
    """
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _ssl_object(stream: trio.abc.Stream) -> ssl.SSLObject | None:
    if not isinstance(stream, trio.SSLStream):
        return None
    # trio.SSLStream forwards SSLObject methods but does not expose the
    # object, which the "ssl_object" extension promises; httpcore's trio
    # backend reads the same attribute (trio issue #542).
    ssl_object: ssl.SSLObject = stream._ssl_object
    return ssl_object


def _as_bytes(data: bytes | bytearray) -> bytes:
    # trio's streams may return a bytearray; httpcore and h11 want bytes.
    return bytes(data) if isinstance(data, bytearray) else data


def _describe(exc: BaseException) -> str:
    """The message of ``exc`` and of its cause, for an httpcore error."""
    parts = [str(exc)]
    if exc.__cause__ is not None:
        parts.append(str(exc.__cause__))
    return ": ".join(part for part in parts if part)
