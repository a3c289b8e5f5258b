"""RecyclingStream: a trio.abc.HalfCloseableStream over a pooled TCP socket."""

# The stream works on the pool's stdlib socket directly, with
# trio.lowlevel.wait_readable / wait_writable, instead of wrapping it in a
# trio socket object. That keeps no per-connection state (trio's wrapper
# remembers did_shutdown_SHUT_WR forever) and makes the stale-handle rule
# easy to keep: after every wait, and before every system call, we check
# our own `_closed` flag, because by the time a woken task runs the
# descriptor may already be connected for somebody else.
#
# The checkpoint pattern is trio's own (_socket.py, _nonblocking_helper):
# checkpoint_if_cancelled() first, then the system call, then either a
# wait (a full checkpoint) or cancel_shielded_checkpoint() on success, so
# every call is exactly one checkpoint when it does not block.

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, final

import attrs
import trio

from ._close import ENDS
from ._errors import check_run, translate_oserror, wrong_run_error
from ._socket_access import DEFAULT_RECEIVE_SIZE, Home, SocketAccess

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._pooled_socket import PooledSocket

__all__ = ["RecyclingStream"]

# Every public method first checks that it runs in the pool's own trio.run:
# from another run, the waits would register the descriptor with
# the wrong event loop and aclose() would touch the pool's bookkeeping from
# the wrong thread. One call and one identity test, about 0.1 us.
_current_trio_token = trio.lowlevel.current_trio_token


@final
@attrs.define(eq=False, repr=False)
class RecyclingStream(SocketAccess, trio.abc.HalfCloseableStream):
    """A TCP connection whose socket came from, and goes back to, a `SocketPool`.

    It implements the full `trio.abc.HalfCloseableStream` interface with the
    semantics of `trio.SocketStream`. You do not construct it yourself:
    `SocketPool.open_tcp_stream` returns it.

    Closing it (`aclose`, or leaving ``async with stream:``) is where the
    recycling happens:

    * If a `receive_some` call has already returned ``b""`` (the peer's FIN
      arrived), the socket is disconnected with ``connect(AF_UNSPEC)`` at
      once, checked, and put back in the pool idle. This is synchronous, so
      no cancellation can interrupt it.
    * Otherwise the pool first reads, without blocking, whatever is still
      queued (up to its ``drain_limit`` bytes): if the peer's FIN is there,
      the socket is recycled at once as above. If not, the pool sends our
      FIN (unless `send_eof` already did) and drains the connection in the
      background, discarding up to ``drain_limit`` bytes for up to
      ``eof_timeout`` seconds. If the peer's FIN arrives in time the socket
      is recycled; if not, it is closed like any other socket. `aclose`
      never waits for this.

    Either way the stream is closed the moment `aclose` is called: every
    later call raises `trio.ClosedResourceError` and can never reach the
    socket's next owner, and tasks blocked in this stream are woken with
    `trio.ClosedResourceError`.

    A stream that is garbage-collected without being closed emits a
    :exc:`ResourceWarning`, like trio's own sockets; the pool then closes
    its socket (never recycles it: its state is unknown) and gives its
    place to the next task. The pool holds only a weak reference to an
    open stream.

    `release` ends the stream like `aclose` but gives the live connection
    back for another exchange with the same peer (keep-alive), when it is
    clean; see there.
    """

    _home: Home
    _psock: PooledSocket
    _sock: socket.socket
    _closed: bool = False
    _closed_by_pool: bool = False
    _eof_seen: bool = False
    _eof_sent: bool = False
    _healthy: bool = True
    #: The connection continues one that an earlier stream released.
    _kept_alive: bool = False
    #: A send_all ended early (cancelled or failed): the peer may hold part
    #: of a message, so the connection must not serve another exchange.
    _send_cut: bool = False
    #: A receive_some was cancelled: the answer it was to read may arrive
    #: later, so the connection must not serve another exchange either.
    _receive_cut: bool = False
    #: trio's ConflictDetector, inlined: one task at a time on the send side.
    _sending: bool = False
    #: Tasks blocked in wait_readable/wait_writable on our socket right now.
    _waiting: int = 0
    #: The pool's run, the only one this stream may be used from.
    _token: trio.lowlevel.TrioToken = attrs.field(factory=_current_trio_token)

    def __repr__(self) -> str:
        state = self._describe()
        if not self._closed:
            if self._eof_seen:
                state += ", EOF received"
            if self._eof_sent:
                state += ", EOF sent"
        return f"<trio_recycle.RecyclingStream {state}>"

    def _enter_send(self) -> None:
        # Closed wins over busy: the task that was sending when another task
        # closed the stream may still hold the guard (in its last, shielded
        # checkpoint), and a stale handle must always say it is closed (I2).
        if self._closed:
            raise self._closed_error()
        if self._sending:
            raise trio.BusyResourceError("another task is currently sending data on this RecyclingStream")
        self._sending = True

    async def _enter_send_or_checkpoint(self) -> None:
        # Every failing call is a checkpoint, as in trio's socket layer: a
        # loop that retries a closed or busy stream must not starve the run.
        try:
            self._enter_send()
        except (trio.ClosedResourceError, trio.BusyResourceError):
            await trio.lowlevel.checkpoint()
            raise

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        self._waiting += 1
        try:
            await self._wait_on(wait)
        finally:
            self._waiting -= 1

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; see `trio.abc.SendStream.send_all`.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.BusyResourceError: another task is sending on this stream.
          trio.ClosedResourceError: the stream is closed, or `send_eof` was
              called.
          trio.BrokenResourceError: the connection broke (the peer reset
              it, for example); the socket will not be recycled.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingStream")
        try:
            self._enter_send()
        except (trio.ClosedResourceError, trio.BusyResourceError):
            await trio.lowlevel.checkpoint()  # inlined _enter_send_or_checkpoint (hot path)
            raise
        try:
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("can't send data after sending EOF")
            with memoryview(data) as view:
                await trio.lowlevel.checkpoint_if_cancelled()
                sock = self._sock
                total = 0
                length = len(view)
                try:
                    while total < length:
                        if self._closed:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                            raise self._closed_error()
                        try:
                            total += sock.send(view[total:] if total else view)
                        except BlockingIOError:
                            await self._wait(trio.lowlevel.wait_writable)
                        except OSError as exc:
                            self._healthy = False
                            await trio.lowlevel.cancel_shielded_checkpoint()
                            raise translate_oserror(exc) from exc
                except BaseException:
                    self._send_cut = True
                    raise
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket can take more data; see `trio.abc.SendStream.wait_send_all_might_not_block`.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.BusyResourceError: another task is sending on this stream.
          trio.ClosedResourceError: the stream is closed.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingStream")
        await self._enter_send_or_checkpoint()
        try:
            await self._wait(trio.lowlevel.wait_writable)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """See `trio.abc.HalfCloseableStream.send_eof`.

        Sends our FIN; idempotent. The socket is still recycled when the
        stream is closed, once the peer's FIN has arrived too.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.BusyResourceError: another task is sending on this stream.
          trio.ClosedResourceError: the stream is closed.
          trio.BrokenResourceError: the connection broke.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingStream")
        await self._enter_send_or_checkpoint()
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise self._closed_error()
            if self._eof_sent:
                return
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._healthy = False
                raise translate_oserror(exc) from exc
            self._eof_sent = True
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive some data; see `trio.abc.ReceiveStream.receive_some`.

        A return of ``b""`` means the peer's FIN arrived: from then on,
        closing the stream recycles its socket at once.

        Args:
          max_bytes: The most bytes to return; None means 65536 (trio's
              default for `trio.SocketStream`).

        Returns:
          bytes: at least one byte, or ``b""`` at end of stream.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.BusyResourceError: another task is receiving on this stream.
          trio.ClosedResourceError: the stream is closed.
          trio.BrokenResourceError: the connection broke (the socket will
              not be recycled).
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingStream")
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be an int or None, not {type(max_bytes).__name__}")
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._receive_cut = True  # as below: the answer was not read
            raise
        sock = self._sock
        # After a wait, which is a full checkpoint, return without another
        # one, as trio's own socket layer does: one scheduler round per
        # call that blocks, not two.
        waited = False
        while True:
            if self._closed:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                raise self._closed_error()
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                try:
                    await self._wait(trio.lowlevel.wait_readable)
                except BaseException:
                    # Cut short (a timeout) while waiting for bytes: an answer
                    # may still be on its way, and must not reach the next
                    # owner of a released connection.
                    self._receive_cut = True
                    raise
                waited = True
            except OSError as exc:
                self._healthy = False
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                raise translate_oserror(exc) from exc
            else:
                if not data:
                    self._eof_seen = True
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data

    async def aclose(self) -> None:
        """Close the stream and hand its socket back to the pool.

        See the class description for what happens to the socket. Like every
        trio ``aclose``, it closes even when cancelled.

        Raises:
          RuntimeError: called from a trio.run other than the pool's; the
              stream is left as it was.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingStream")
        self._end_now()
        await trio.lowlevel.checkpoint()

    def _end_now(self, *, idle: bool = False) -> None:
        """`aclose` without its checkpoint: the stream is closed and its socket handed back on return.

        For a protocol layer that must end an idle connection from
        synchronous code (trio_recycle.httpx). ``idle``: the layer vouches
        that no answer is owed either way (`SocketPool.return_socket`).
        """
        if not self._closed:
            self._closed = True
            # notify_closing() wakes tasks blocked on the socket and drops it
            # from trio's epoll set. With nobody blocked there is nothing to
            # wake, and keeping the registration saves the next owner an
            # epoll_ctl(DEL) + a failed MOD + an ADD: the descriptor is the
            # same open file, so its registration stays valid.
            if self._waiting:
                trio.lowlevel.notify_closing(self._sock)
            idle = idle and not (self._send_cut or self._receive_cut or self._sending or self._waiting)
            self._home.return_socket(self._psock, ENDS[self._eof_seen, self._eof_sent, self._healthy, False, idle])

    async def release(self) -> bool:
        """End the stream and give its live connection back for another exchange.

        Like `aclose`, this closes the stream at once: every later call
        raises `trio.ClosedResourceError`, and tasks blocked in it are
        woken with it. The connection itself is *parked* in the pool, still
        connected, for the next `SocketPool.open_tcp_stream` with the same
        ``host``, ``port`` and ``local_address``, but only when it is clean:

        * nothing unread is queued (the pool looks without blocking), so
          call it only after reading the whole answer;
        * no EOF was received or sent, and no call failed or was cut short
          (a cancelled `send_all` may have sent half a message; after a
          cancelled `receive_some`, the answer may still be on its way);
        * no other task is inside the stream;
        * every option set with `setsockopt` can be restored (they are, as
          after a recycle), and none is of the kind that only a disconnect
          undoes (``TCP_MAXSEG``, ``TCP_WINDOW_CLAMP``);
        * the pool is open.

        A task waiting for capacity that opens the same ``host``, ``port``
        and ``local_address`` is handed the connection directly; while
        other tasks wait that the room could serve, nothing is parked.
        Otherwise, and whenever the connection is not clean, it goes
        through the close protocol exactly as in `aclose` (counted in
        `PoolStatistics.not_parked`). Use it only where the protocol says
        the connection may carry another exchange (HTTP/1.1 without
        ``Connection: close``, for example): the pool cannot know. Like
        `aclose`, it never waits, and when cancelled it still releases or
        closes.

        A parked connection is watched: when the peer closes it, it is
        disconnected and goes back idle; when bytes arrive unasked, it is
        never handed out again; after ``keepalive_expiry`` seconds it is
        closed politely.

        Returns:
          bool: True when the connection was parked (or handed to a task
          waiting for the same open); False when it went through the close
          protocol instead, or the stream was closed already.

        Raises:
          RuntimeError: called from a trio.run other than the pool's; the
              stream is left as it was.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingStream")
        parked = False
        if not self._closed:
            self._closed = True
            if self._waiting:
                trio.lowlevel.notify_closing(self._sock)
            parkable = not (self._send_cut or self._receive_cut or self._sending or self._waiting)
            end = ENDS[self._eof_seen, self._eof_sent, self._healthy, parkable, False]
            parked = self._home.release_socket(self._psock, end)
        await trio.lowlevel.checkpoint()
        return parked

    @property
    def kept_alive(self) -> bool:
        """Whether this stream continues a connection that an earlier stream released.

        True when `SocketPool.open_tcp_stream` took a parked connection
        (see `release`), False for a connection made by this open. A
        protocol layer uses it to decide whether a request that failed
        before any byte of the answer arrived may be retried on a fresh
        connection: the peer may have closed the kept connection just as
        the request went out (the stale-connection race), which a fresh
        connection rules out.

        Raises:
          RuntimeError: read from a trio.run other than the pool's, like
              every other member of the stream.
        """
        check_run(self._token, "RecyclingStream")
        return self._kept_alive
