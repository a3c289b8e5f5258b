"""open_socket_pool: the async context manager that checks a pool's options and binds it to a nursery."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Final, Literal

import trio

from ._disconnect import can_recycle
from ._isn import peer_affinity_for
from ._pool import SocketPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from ._pooled_socket import SocketOption

__all__ = ["open_socket_pool"]

#: Default for ``open_socket_pool(capacity=...)``.
DEFAULT_CAPACITY: Final = 64
#: Default for ``open_socket_pool(eof_timeout=...)``, in seconds.
DEFAULT_EOF_TIMEOUT: Final = 5.0
#: Default for ``open_socket_pool(drain_limit=...)``, in bytes.
DEFAULT_DRAIN_LIMIT: Final = 65536
#: Default for ``open_socket_pool(keepalive_expiry=...)``, in seconds.
DEFAULT_KEEPALIVE_EXPIRY: Final = 5.0


_C_INT_MIN: Final = -(2**31)
_C_INT_MAX: Final = 2**31 - 1


def _check_options(socket_options: Iterable[SocketOption]) -> tuple[SocketOption, ...]:
    try:
        options = tuple(socket_options)
    except TypeError:
        raise TypeError(
            f"socket_options must be an iterable of (level, option, value) triples, not {socket_options!r}"
        ) from None
    for item in options:
        if (
            not isinstance(item, tuple)
            or len(item) != 3
            or not all(isinstance(part, int) for part in item[:2])
            or not isinstance(item[2], (int, bytes))
        ):
            raise TypeError(
                f"socket_options entries must be (level: int, option: int, value: int | bytes), not {item!r}"
            )
        # setsockopt() takes C ints; a larger int fails only at socket
        # creation, and a value with a misleading "bytes-like object" error.
        if not all(_C_INT_MIN <= part <= _C_INT_MAX for part in item if isinstance(part, int)):
            raise ValueError(f"socket_options entries must hold C int values (32-bit signed), not {item!r}")
    return options


def _check_number(name: str, value: object, *, integer: bool) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, not {value!r}")
    assert isinstance(value, (int, float))
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, not {value!r}")


@contextlib.asynccontextmanager
async def open_socket_pool(
    *,
    capacity: int = DEFAULT_CAPACITY,
    eof_timeout: float = DEFAULT_EOF_TIMEOUT,
    drain_limit: int = DEFAULT_DRAIN_LIMIT,
    peer_affinity: bool | Literal["auto"] = "auto",
    recycle: bool = True,
    socket_options: Iterable[tuple[int, int, int | bytes]] = (),
    keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
    capacity_per_peer: int | None = None,
) -> AsyncIterator[SocketPool]:
    """Open a `SocketPool` for the duration of an ``async with`` block.

    ::

        async with trio_recycle.open_socket_pool(capacity=32) as pool:
            async with await pool.open_tcp_stream("127.0.0.1", 8080) as stream:
                await stream.send_all(b"ping")
                async for chunk in stream:
                    ...

    The pool owns a nursery, where streams closed before the peer's FIN wait
    for it, and every socket it creates. When the block exits, every socket
    is closed, every stream still open is closed with it, every background
    task is cancelled, and tasks waiting for capacity get
    `trio.ClosedResourceError`.

    Args:
      capacity: The most sockets the pool owns at once, idle, in use and
          draining together. Opens beyond it wait, first come first served.
          64 by default: enough concurrency for a busy upstream, far below
          the usual 1024-descriptor limit.
      eof_timeout: Seconds a closed stream's socket waits for the peer's FIN
          before it is closed instead of recycled. 5 by default: a peer that
          closes after answering does so within milliseconds, and a socket
          that waits longer holds a place in ``capacity``.
      drain_limit: Bytes read and discarded while waiting for that FIN;
          past it the socket is closed. 64 KiB by default: reading more of
          an unwanted answer costs more than a new socket.
      peer_affinity: ``"auto"`` (the default) gives affinity only where
          ISNs are not fresh (`SocketPool.fresh_isns`). With affinity (True
          forces it) an idle socket is reconnected only to the address it
          last talked to. Where ISNs are not fresh, a reconnected socket's
          initial sequence number follows from the previous connection's,
          so the previous peer could predict it: False then leaks that
          sequence to the next peer; set it only when every peer is
          trusted alike. Where the pool resets ISNs (``CAP_NET_ADMIN``),
          affinity protects nothing and only costs ``socket()`` calls.
      recycle: False closes sockets instead of recycling them, the same
          fallback the pool uses when `can_recycle` is False. Use it for
          protocols where the peer half-closes and keeps reading: recycling
          answers its FIN with an RST.
      socket_options: ``(level, option, value)`` triples set on every socket
          the pool creates, after the defaults (``TCP_NODELAY`` on and
          ``TCP_NOTSENT_LOWAT`` 16 KiB for TCP, as in `trio.SocketStream`).
          Options the kernel resets on disconnect (``TCP_MAXSEG``,
          ``TCP_WINDOW_CLAMP``) are set again after every recycle.
      keepalive_expiry: Seconds a live connection given back with
          `RecyclingStream.release` stays parked at most; then the pool
          closes it politely (our FIN, then the usual drain). 5 by default,
          httpcore's choice: well below nginx's 75 s idle timeout, so the
          pool closes first there; uvicorn, Apache and Node.js close after
          5 s idle too, and since their timer starts before ours they
          usually close first. That is harmless: the watch sees their FIN
          and recycles the socket with no TIME_WAIT on either side, and
          `RecyclingStream.kept_alive` lets a protocol retry a request that
          meets the close in flight.
          ``math.inf`` keeps connections parked until the peer closes them.
      capacity_per_peer: The most sockets in use, draining or parked
          toward one peer address at once (idle sockets are disconnected
          and count for nobody); None (the default) sets no limit below
          ``capacity``. What aiohttp calls ``limit_per_host`` and nginx
          ``max_conns``: one slow upstream cannot take the whole pool.
          Opens beyond it wait without holding up opens to other peers.

    Yields:
      SocketPool: the open pool.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: ``capacity`` or ``capacity_per_peer`` < 1, a negative or
          NaN ``eof_timeout``, ``drain_limit`` or ``keepalive_expiry``, or a
          ``socket_options`` int that does not fit a C int.
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, not {capacity!r}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, not {capacity!r}")
    _check_number("eof_timeout", eof_timeout, integer=False)
    _check_number("drain_limit", drain_limit, integer=True)
    affinity = peer_affinity_for(peer_affinity)
    if not isinstance(recycle, bool):
        raise TypeError(f"recycle must be a bool, not {recycle!r}")
    options = _check_options(socket_options)
    _check_number("keepalive_expiry", keepalive_expiry, integer=False)
    if capacity_per_peer is not None:
        if not isinstance(capacity_per_peer, int) or isinstance(capacity_per_peer, bool):
            raise TypeError(f"capacity_per_peer must be an int or None, not {capacity_per_peer!r}")
        if capacity_per_peer < 1:
            raise ValueError(f"capacity_per_peer must be >= 1 or None, not {capacity_per_peer!r}")
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        pool = SocketPool._open(
            nursery,
            capacity=capacity,
            eof_timeout=float(eof_timeout),
            drain_limit=drain_limit,
            peer_affinity=affinity,
            recycle=recycle and can_recycle(),
            socket_options=options,
            keepalive_expiry=float(keepalive_expiry),
            capacity_per_peer=capacity_per_peer,
        )
        try:
            yield pool
        except BaseException as exc:
            # Re-raised below, outside the nursery, so that the caller sees
            # its own exception and not an ExceptionGroup around it.
            body_error = exc
        finally:
            pool._close()
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None
