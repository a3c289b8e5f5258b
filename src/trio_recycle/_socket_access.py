"""SocketAccess: the option and address methods a pooled stream or UDP socket shares."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Final, Protocol, overload

import trio

from ._errors import check_run, closed_stream_error

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable

    from typing_extensions import Buffer

    from ._pooled_socket import PooledSocket

__all__ = ["DEFAULT_RECEIVE_SIZE", "Home", "SocketAccess", "format_address"]

#: Bytes asked of one recv() when the caller gives no size: trio's
#: SocketStream default, and the largest UDP payload fits.
DEFAULT_RECEIVE_SIZE: Final = 65536


def format_address(address: object) -> str:
    """``127.0.0.1:8080`` or ``[::1]:8080``, as a repr shows a socket address."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return repr(address)


class Home(Protocol):
    """What a stream or UDP socket needs from its pool (the pool implements it)."""

    def return_socket(
        self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool, idle: bool = False
    ) -> None: ...

    def release_socket(
        self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool, parkable: bool
    ) -> None: ...

    def socket_dropped(self, psock: PooledSocket) -> None: ...


class SocketAccess:
    """``setsockopt``/``getsockopt``/``getpeername``/``getsockname`` behind a closed check.

    Mixed into `RecyclingStream` and `RecyclingUDPSocket`, which provide the
    four attributes below. After ``aclose`` every method raises
    `trio.ClosedResourceError` (saying so when the pool's exit closed it):
    the socket may already belong to somebody else. It also gives both
    classes the body of their reprs.
    """

    __slots__ = ()

    _home: Home
    _closed: bool
    #: Closed by the pool's exit (`_force_close`), not by ``aclose``.
    _closed_by_pool: bool
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
            self._closed_by_pool = True  # type: ignore[misc]  # a slot of the attrs subclass
            trio.lowlevel.notify_closing(self._sock)

    def _closed_error(self) -> trio.ClosedResourceError:
        """The error for a call after close, saying who closed it."""
        return closed_stream_error(by_pool=self._closed_by_pool)

    async def _wait_on(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        """``await wait(sock)``; woken by the pool's exit, say that."""
        try:
            await wait(self._sock)
        except trio.ClosedResourceError:
            # trio's own message, "another task closed this fd", does not
            # say that the other task was the pool's exit.
            if self._closed_by_pool:
                raise self._closed_error() from None
            raise

    def _describe(self) -> str:
        """``127.0.0.1:40000 -> 127.0.0.1:8080``, or ``closed``, for a repr.

        Never the pool, and nothing from the socket once closed: by then it
        may be connected for its next owner.
        """
        if self._closed:
            return "closed by its pool's exit" if self._closed_by_pool else "closed"
        local = format_address(self._sock.getsockname())
        try:
            peer = format_address(self._sock.getpeername())
        except OSError:
            # Once both FINs are through the kernel forgets the peer; the
            # pool's key still holds the address it connected to.
            peer = "?" if self._psock.key[4] is None else format_address(self._psock.key[4])
        return f"{local} -> {peer}"

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
            raise self._closed_error()
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
            raise self._closed_error()
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
            raise self._closed_error()
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
            raise self._closed_error()
        address: tuple[str, int] | tuple[str, int, int, int] = self._sock.getsockname()
        return address
