"""SocketAccess: the option and address methods a pooled stream or UDP socket shares."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Final, Protocol, overload

import trio

from ._errors import check_run, closed_stream_error

if TYPE_CHECKING:
    import socket

    from typing_extensions import Buffer

    from ._pooled_socket import PooledSocket

__all__ = ["DEFAULT_RECEIVE_SIZE", "Home", "SocketAccess"]

#: Bytes asked of one recv() when the caller gives no size: trio's
#: SocketStream default, and the largest UDP payload fits.
DEFAULT_RECEIVE_SIZE: Final = 65536


class Home(Protocol):
    """What a stream or UDP socket needs from its pool (the pool implements it)."""

    def return_socket(self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool) -> None: ...

    def release_socket(
        self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool, parkable: bool
    ) -> None: ...

    def socket_dropped(self, psock: PooledSocket) -> None: ...


class SocketAccess:
    """``setsockopt``/``getsockopt``/``getpeername``/``getsockname`` behind a closed check.

    Mixed into `RecyclingStream` and `RecyclingUDPSocket`, which provide the
    three attributes below. After ``aclose`` every method raises
    `trio.ClosedResourceError`: the socket may already belong to somebody
    else.
    """

    __slots__ = ()

    _home: Home
    _closed: bool
    _psock: PooledSocket
    _sock: socket.socket
    _token: trio.lowlevel.TrioToken

    def __del__(self) -> None:
        # Dropped without aclose(): like trio's own sockets, say so with a
        # ResourceWarning, and let the pool close the socket (its state is
        # unknown) and give its place to the next task. The warning comes
        # last: under the "error" filter it raises, and the rest must run.
        try:
            if self._closed:
                return
        except AttributeError:  # pragma: no cover - __init__ never finished
            return
        self._closed = True  # type: ignore[misc]  # a slot of the attrs subclass
        self._home.socket_dropped(self._psock)
        warnings.warn(
            f"unclosed {type(self).__name__} {self._sock!r} was garbage-collected: its socket is closed, "
            "not recycled; close it with `async with` or aclose()",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )

    def _force_close(self) -> None:
        """Mark closed and wake blocked tasks; the pool closes the socket."""
        if not self._closed:
            self._closed = True  # type: ignore[misc]  # a slot of the attrs subclass
            trio.lowlevel.notify_closing(self._sock)

    @overload
    def setsockopt(self, level: int, option: int, value: int | Buffer) -> None: ...

    @overload
    def setsockopt(self, level: int, option: int, value: None, length: int) -> None: ...

    def setsockopt(self, level: int, option: int, value: int | Buffer | None, length: int | None = None) -> None:
        """Set an option on the underlying socket, for this connection only.

        See :meth:`socket.socket.setsockopt`. The pool undoes the change
        before the socket's next use: integer options that read back exactly
        (``TCP_NODELAY``, ``SO_KEEPALIVE``, the keepalive timers,
        ``TCP_USER_TIMEOUT``, ``IP_TOS``, ``SO_PRIORITY``, ...) are restored;
        the options the kernel's disconnect resets (``TCP_MAXSEG`` and
        ``TCP_WINDOW_CLAMP`` for TCP, ``SO_BINDTODEVICE`` for UDP) go with
        the connection; after any other option the socket is closed instead
        of recycled.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.ClosedResourceError: closed already.
          OSError: from the system call.
        """
        check_run(self._token, type(self).__name__)
        if self._closed:
            raise closed_stream_error()
        self._psock.note_user_option(level, option, value)
        if length is None:
            if value is None:
                raise TypeError("invalid value for argument 'value', must not be None when specifying length")
            self._sock.setsockopt(level, option, value)
        else:
            if value is not None:
                raise TypeError(f"invalid value for argument 'value': {value!r}, must be None when specifying optlen")
            self._sock.setsockopt(level, option, None, length)

    @overload
    def getsockopt(self, level: int, option: int) -> int: ...

    @overload
    def getsockopt(self, level: int, option: int, buffersize: int) -> bytes: ...

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        """Read an option of the underlying socket; see :meth:`socket.socket.getsockopt`.

        Args:
          level: The protocol level (``socket.SOL_SOCKET``, ...).
          option: The option.
          buffersize: 0 (the default) reads an integer option; a positive
              size reads that many bytes of a structure or string option.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.ClosedResourceError: closed already.
        """
        check_run(self._token, type(self).__name__)
        if self._closed:
            raise closed_stream_error()
        if buffersize == 0:
            return self._sock.getsockopt(level, option)
        return self._sock.getsockopt(level, option, buffersize)

    def getpeername(self) -> tuple[str, int] | tuple[str, int, int, int]:
        """The peer's address, as :meth:`socket.socket.getpeername` gives it.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.ClosedResourceError: closed already.
        """
        check_run(self._token, type(self).__name__)
        if self._closed:
            raise closed_stream_error()
        address: tuple[str, int] | tuple[str, int, int, int] = self._sock.getpeername()
        return address

    def getsockname(self) -> tuple[str, int] | tuple[str, int, int, int]:
        """Our local address, as :meth:`socket.socket.getsockname` gives it.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.ClosedResourceError: closed already.
        """
        check_run(self._token, type(self).__name__)
        if self._closed:
            raise closed_stream_error()
        address: tuple[str, int] | tuple[str, int, int, int] = self._sock.getsockname()
        return address
