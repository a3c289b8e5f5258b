"""open_socket_pool: check the arguments, open the nursery, yield the pool, close everything."""

# What open_socket_pool returns is an async context manager and nothing
# else; a program that forgets the `async with` and calls a pool method on
# it gets an AttributeError that says how to write it, where a bare
# contextlib.asynccontextmanager object would only say that it has no
# attribute 'open_tcp_stream'.

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final, Literal, NoReturn, final

import trio

from ._arguments import check_bool, check_capacity, check_number, check_socket_options, probe_socket_options
from ._disconnect import can_recycle
from ._isn import peer_affinity_for
from ._pool import SocketPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

__all__ = ["PoolOpener", "open_socket_pool"]

#: Default for ``open_socket_pool(capacity=...)``.
DEFAULT_CAPACITY: Final = 64
#: Default for ``open_socket_pool(eof_timeout=...)``, in seconds.
DEFAULT_EOF_TIMEOUT: Final = 5.0
#: Default for ``open_socket_pool(drain_limit=...)``, in bytes.
DEFAULT_DRAIN_LIMIT: Final = 65536
#: Default for ``open_socket_pool(keepalive_expiry=...)``, in seconds.
DEFAULT_KEEPALIVE_EXPIRY: Final = 5.0

_USE_ASYNC_WITH = "use `async with trio_recycle.open_socket_pool(...) as pool:` and call the pool's methods on `pool`"


@final
class PoolOpener:
    """What `open_socket_pool` returns: use it with ``async with``, which gives the `SocketPool`."""

    __slots__ = ("_manager",)

    def __init__(self, manager: AbstractAsyncContextManager[SocketPool]) -> None:
        self._manager = manager

    async def __aenter__(self) -> SocketPool:
        return await self._manager.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        return await self._manager.__aexit__(exc_type, exc_value, traceback)

    def __getattr__(self, name: str) -> NoReturn:
        # Only for names the class lacks: open_tcp_stream, statistics, ...
        raise AttributeError(
            f"open_socket_pool() returns an async context manager, not a SocketPool, so it has no "
            f"attribute {name!r}: {_USE_ASYNC_WITH}"
        )

    def __repr__(self) -> str:
        return "<trio_recycle.open_socket_pool() context manager: use it with async with>"


def open_socket_pool(
    *,
    capacity: int = DEFAULT_CAPACITY,
    eof_timeout: float = DEFAULT_EOF_TIMEOUT,
    drain_limit: int = DEFAULT_DRAIN_LIMIT,
    peer_affinity: bool | Literal["auto"] = "auto",
    recycle: bool = True,
    socket_options: Iterable[tuple[int, int, int | bytes]] = (),
    keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
    capacity_per_peer: int | None = None,
    reset_idle: bool = True,
) -> AbstractAsyncContextManager[SocketPool]:
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
    `trio.ClosedResourceError`. The arguments are checked, and the
    ``socket_options`` tried on a throwaway socket, when the block is
    entered.

    Args:
      capacity: The most sockets the pool owns at once: idle, in use,
          draining and parked together. Opens beyond it wait, first come
          first served. 64 by default: enough concurrency for a busy
          upstream, far below the usual 1024-descriptor limit.
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
          ``TCP_WINDOW_CLAMP``) are set again after every recycle. They are
          tried once when the pool opens, on a throwaway TCP socket per
          address family they apply to (not one of the pool's:
          `PoolStatistics.created` does not count it), so that a triple the kernel refuses fails
          there, named, rather than every open later.
      keepalive_expiry: Seconds a live connection given back with
          `RecyclingStream.release` stays parked at most; then the pool
          ends it: by the disconnect when nothing is in flight (no
          TIME_WAIT anywhere; see ``reset_idle``), else politely (our FIN,
          then the usual drain). 5 by default, httpcore's choice, kept after
          measuring real servers' idle timeouts (docs: interop): nginx
          75 s, h2o 10 s, Node.js 6 s (it advertises 5), lighttpd 5-6 s,
          Apache, uvicorn and hypercorn 5 s. Against the first four the
          pool ends the connection first, which costs nothing now that it
          is ended by the disconnect; against the others either side may
          close first, which is harmless too: the watch sees their FIN and
          recycles the socket, and `RecyclingStream.kept_alive` lets a
          protocol retry a request that meets the close in flight. A longer
          expiry would only keep more sockets parked for peers that may
          never come back.
          ``math.inf`` keeps connections parked until the peer closes them.
          0 is refused: it would close every released connection at once,
          with our FIN first (a TIME_WAIT on our side), which is what
          ``aclose()`` does already; a program that wants no keep-alive
          calls ``aclose()`` instead of ``release()``.
      capacity_per_peer: The most sockets in use, draining or parked
          toward one peer address at once (idle sockets are disconnected
          and count for nobody); None (the default) sets no limit below
          ``capacity``, and a value above ``capacity`` is refused. What
          aiohttp calls ``limit_per_host`` and nginx ``max_conns``: one
          slow upstream cannot take the whole pool. Opens beyond it wait
          without holding up opens to other peers.
      reset_idle: True (the default) ends an idle parked connection that
          must go (evicted for another open, past ``keepalive_expiry``,
          the pool's exit) with the disconnect itself when nothing is in
          flight either way: its RST loses nothing and leaves no TIME_WAIT
          on either side, where our FIN leaves one on ours. False keeps
          the FIN, for peers that must never see an RST.

    Returns:
      An async context manager; ``async with`` gives the open `SocketPool`.
      Any attribute of it (``open_tcp_stream``, after a forgotten ``async
      with``) raises `AttributeError` saying to use ``async with``.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: ``capacity`` or ``capacity_per_peer`` < 1,
          ``capacity_per_peer`` > ``capacity``; a negative or NaN
          ``eof_timeout``, ``drain_limit`` or ``keepalive_expiry``, one too
          large for a float, or ``keepalive_expiry`` 0; a ``socket_options``
          int that does not fit a C int, or a triple the kernel does not
          know (the message names it).
      OSError: the kernel refused a ``socket_options`` triple for another
          reason, such as `PermissionError` for a privileged option.
    """
    return PoolOpener(
        _open_socket_pool(
            capacity=capacity,
            eof_timeout=eof_timeout,
            drain_limit=drain_limit,
            peer_affinity=peer_affinity,
            recycle=recycle,
            socket_options=socket_options,
            keepalive_expiry=keepalive_expiry,
            capacity_per_peer=capacity_per_peer,
            reset_idle=reset_idle,
        )
    )


@contextlib.asynccontextmanager
async def _open_socket_pool(
    *,
    capacity: int,
    eof_timeout: float,
    drain_limit: int,
    peer_affinity: bool | Literal["auto"],
    recycle: bool,
    socket_options: Iterable[tuple[int, int, int | bytes]],
    keepalive_expiry: float,
    capacity_per_peer: int | None,
    reset_idle: bool,
) -> AsyncIterator[SocketPool]:
    check_capacity(capacity, capacity_per_peer)
    check_number("eof_timeout", eof_timeout, integer=False)
    check_number("drain_limit", drain_limit, integer=True)
    affinity = peer_affinity_for(peer_affinity)
    check_bool("recycle", recycle)
    check_bool("reset_idle", reset_idle)
    options = check_socket_options(socket_options)
    check_number("keepalive_expiry", keepalive_expiry, integer=False, positive=True)
    probe_socket_options(options)
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
            reset_idle=reset_idle,
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
