"""SocketPool: the coordinator that decides which socket serves which open, and what happens to it afterwards."""

# The pool's rooms: _lifecycle (states, moves, the Ledger: the only writer
# of states and counts), _capacity (who gets which socket, who waits, where
# sockets go back, and the one reconciler serve_waiters), _store (idle and
# parked sockets, and the watch), _keepalive (released live connections),
# _close (a stream's end to a verdict, the drain), _connect (resolution and
# happy eyeballs). Every entry point here changes states through them and
# ends with one serve_waiters().

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Final, TypeVar, final

import attrs
import trio

from ._arguments import validate_open
from ._capacity import Capacity
from ._close import PARKABLE
from ._connect import (
    connect_pooled,
    connect_udp,
    validate_endpoint,
    validate_local_address,
)
from ._errors import check_run, pool_closed_error, wrong_run_error
from ._isn import fresh_isns
from ._keepalive import KeepAlive
from ._lifecycle import Ledger, State
from ._statistics import PeerStatistics, PoolStatistics
from ._store import SocketStore
from ._stream import RecyclingStream
from ._udp import RecyclingUDPSocket

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._close import StreamEnd
    from ._pooled_socket import PooledSocket, SocketOption

__all__ = ["SocketPool"]

IDLE, CONNECTING, HANDED, IN_USE, PARKED, DRAINING, CLOSED = State

# The pool's methods check first that they run in the pool's own trio.run
# (_stream.py says why).
_current_trio_token: Final = trio.lowlevel.current_trio_token


_O = TypeVar("_O", RecyclingStream, RecyclingUDPSocket)


@final
@attrs.define(eq=False, repr=False, init=False)
class SocketPool:
    """A capacity-limited set of sockets that are disconnected and reused.

    Open one with ``async with trio_recycle.open_socket_pool(...) as pool``;
    see `open_socket_pool` for the options. The pool is bound to that
    block: its background drains run in a nursery of the block, and when
    the block exits every socket it owns is closed.
    """

    _capacity: int
    _recycle: bool
    _nursery: trio.Nursery
    _ledger: Ledger[PooledSocket]
    _store: SocketStore
    _places: Capacity
    _keepalive: KeepAlive
    #: A weak reference to each IN_USE socket's stream: a stream dropped
    #: without aclose() can be collected and give its place back.
    _owners: dict[PooledSocket, weakref.ref[RecyclingStream | RecyclingUDPSocket]]
    _closed: bool
    #: The pool's own run: finalizers hand their work to it.
    _token: trio.lowlevel.TrioToken

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "SocketPool is not created directly: open one with `async with trio_recycle.open_socket_pool() as pool:`"
        )

    @classmethod
    def _open(
        cls,
        nursery: trio.Nursery,
        *,
        capacity: int,
        eof_timeout: float,
        drain_limit: int,
        peer_affinity: bool,
        recycle: bool,
        socket_options: tuple[SocketOption, ...],
        keepalive_expiry: float,
        capacity_per_peer: int | None,
        reset_idle: bool = True,
    ) -> SocketPool:
        """The pool of an `open_socket_pool` block, whose arguments are checked already."""
        self = object.__new__(cls)
        self._capacity = capacity
        self._recycle = recycle
        self._nursery = nursery
        self._ledger = Ledger()
        self._store = SocketStore(nursery, keepalive_expiry, self._on_watch)
        self._places = Capacity(capacity, capacity_per_peer, peer_affinity, recycle, reset_idle, drain_limit,
                                eof_timeout, socket_options, nursery, self, self._ledger, self._store)  # fmt: skip
        self._keepalive = KeepAlive(self._places)
        self._owners = {}
        self._closed = False
        self._token = trio.lowlevel.current_trio_token()
        return self

    def __repr__(self) -> str:
        # Counts only: the pool can own thousands of sockets.
        st = self._snapshot()
        return (
            f"<trio_recycle.SocketPool {'closed' if self._closed else 'open'},"
            f" {'recycling' if self._recycle else 'not recycling'}: {len(self._ledger)}/{st.capacity} sockets"
            f" ({st.in_use} in use, {st.idle} idle, {st.parked} parked, {st.draining} draining),"
            f" {st.tasks_waiting} task{'' if st.tasks_waiting == 1 else 's'} waiting>"
        )

    # ------------------------------------------------------------------
    # Public API

    async def open_tcp_stream(
        self,
        host: str | bytes,
        port: int,
        *,
        happy_eyeballs_delay: float | None = 0.25,
        local_address: str | None = None,
    ) -> RecyclingStream:
        """Connect to ``host:port`` over TCP with a socket from this pool.

        The same signature and semantics as `trio.open_tcp_stream`: the host
        is resolved with :func:`trio.socket.getaddrinfo`, the addresses are
        ordered as RFC 6555 section 5.4 says, and attempts are staggered by
        ``happy_eyeballs_delay``; the first to connect wins. Each attempt
        takes a socket from the pool: an idle one connected to the same
        address before (or any idle one of the right family when the pool
        has no peer affinity: see `fresh_isns`), otherwise a new one. When
        ``capacity`` sockets are owned, it waits, first come first served.

        Before any of that, a live connection that an earlier stream of the
        same ``host``, ``port`` and ``local_address`` gave back with
        `RecyclingStream.release` is taken, the most recently parked first:
        no DNS, no ``connect()``, one non-blocking look at the socket. If
        the peer has closed it meanwhile, the socket is disconnected and
        connected again to the same address within this call; if it holds
        unread bytes or an error, it is closed and the next one is tried.
        The stream's `~RecyclingStream.kept_alive` says which happened.

        Args:
          host: The host to connect to: an IPv4 or IPv6 literal (resolved
              without DNS and without a thread) or a name.
          port: The port, an int from 1 to 65535.
          happy_eyeballs_delay: Seconds to wait for one attempt before
              starting the next in parallel; None means wait for each
              attempt to fail. trio's default.
          local_address: Local IP address to bind the socket to before
              connecting, as in `trio.open_tcp_stream`; sockets bound to
              different local addresses are kept apart in the pool. It
              must be an IP literal: a host name is refused, because
              ``bind()`` would resolve it with a blocking lookup.

        Returns:
          RecyclingStream: the connected stream. Close it (``async with``)
          to give the socket back, or `~RecyclingStream.release` it to keep
          the connection alive for the next open.

        Raises:
          TypeError: ``host`` is not str/bytes, ``port`` is not an int, or
              ``local_address`` is not a str.
          ValueError: ``port`` or ``happy_eyeballs_delay`` is out of range,
              or ``local_address`` is not an IP literal.
          socket.gaierror: the host name cannot be resolved.
          OSError: every connection attempt failed; the message names each
              address with its error.
          trio.ClosedResourceError: the pool's block has exited.
          RuntimeError: called from a trio.run other than the pool's.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("SocketPool")
        validate_open(host, port, happy_eyeballs_delay, local_address)
        open_key = (host, port, local_address)
        psock = None
        try:
            if self._closed:
                raise pool_closed_error()
            if self._store.parked_count and self._store.has_parked(open_key):
                psock = await self._keepalive.take(open_key)  # alive, reconnected, or None
                if psock is not None and psock.state is PARKED:
                    # The keep-alive path, written out: no connect, so this is the open's schedule point.
                    stream = RecyclingStream(self, psock, psock.sock, kept_alive=True, token=self._token)
                    self._ledger.take_parked(psock)
                    self._owners[psock] = weakref.ref(stream)
                    if self._places.room.queue:
                        self._places.serve_waiters()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return stream
                self._places.serve_waiters()
            if psock is None:
                psock = await connect_pooled(
                    self._places,
                    host,
                    port,
                    happy_eyeballs_delay=happy_eyeballs_delay,
                    local_address=local_address,
                    origin=open_key,
                )
        except Exception:
            # A failed open is a checkpoint too, like trio's socket calls:
            # a retry loop must not starve the other tasks (EMFILE, bind()).
            await trio.lowlevel.checkpoint()
            raise
        psock.open_key = open_key
        return self._adopt(psock, self._new_stream)

    def _new_stream(self, psock: PooledSocket) -> RecyclingStream:
        return RecyclingStream(self, psock, psock.sock, kept_alive=psock.state is not CONNECTING, token=self._token)

    def _new_udp(self, psock: PooledSocket) -> RecyclingUDPSocket:
        return RecyclingUDPSocket(self, psock, psock.sock, token=self._token)

    async def open_udp_socket(
        self,
        host: str | bytes,
        port: int,
        *,
        local_address: str | None = None,
    ) -> RecyclingUDPSocket:
        """Connect a UDP socket from this pool to ``host:port``.

        The host is resolved like in `open_tcp_stream` (``SOCK_DGRAM``); the
        socket is connected to the first address that ``connect()`` accepts
        (a UDP connect sends nothing, so there is nothing to race). The
        socket comes from the same pool, under the same ``capacity``, as
        TCP streams: an idle UDP socket last connected to the same address
        (any address when the pool has no peer affinity: see `fresh_isns`)
        or a new one, waiting first come first served when the pool is full.

        Args:
          host: The host: an IPv4 or IPv6 literal (resolved without DNS and
              without a thread) or a name.
          port: The port, an int from 1 to 65535.
          local_address: Local IP address to bind the socket to, as in
              `open_tcp_stream` (an IP literal); None lets the kernel
              choose. The local port is always the kernel's choice, a new
              one for every owner.

        Returns:
          RecyclingUDPSocket: the connected socket. Close it (``async
          with``) to give it back.

        Raises:
          TypeError: ``host`` is not str/bytes, ``port`` is not an int, or
              ``local_address`` is not a str.
          ValueError: ``port`` is out of range, or ``local_address`` is not
              an IP literal.
          socket.gaierror: the host name cannot be resolved.
          OSError: no address could be connected to (for example no route);
              the message names each address with its error.
          trio.ClosedResourceError: the pool's block has exited.
          RuntimeError: called from a trio.run other than the pool's.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("SocketPool")
        validate_endpoint(host, port)
        validate_local_address(local_address)
        try:
            self._check_open()
            psock = await connect_udp(self._places, host, port, local_address=local_address)
        except Exception:
            await trio.lowlevel.checkpoint()  # as in open_tcp_stream
            raise
        return self._adopt(psock, self._new_udp)

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of this pool's state and counters.

        Returns:
          PoolStatistics: the state now (idle, in use, draining, waiting,
          parked) and the counts over the pool's life.

        Raises:
          RuntimeError: called from a trio.run other than the pool's (from
              no run at all, for example after it, is fine).
        """
        check_run(self._token, "SocketPool")
        return self._snapshot()

    def peer_statistics(self, peer: object) -> PeerStatistics:
        """A snapshot of this pool's sockets toward one peer address (``("127.0.0.1", 8080)``), in O(1).

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
        """
        check_run(self._token, "SocketPool")
        return PeerStatistics._of(peer, self._ledger.peers.get(peer))

    def statistics_by_peer(self) -> dict[object, PeerStatistics]:
        """`peer_statistics` of every peer address the pool keeps counts for.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
        """
        check_run(self._token, "SocketPool")
        return {peer: PeerStatistics._of(peer, counts) for peer, counts in self._ledger.peers.items()}

    def _snapshot(self) -> PoolStatistics:
        return PoolStatistics._of(self._capacity, self._ledger, len(self._places.room))

    @property
    def closed(self) -> bool:
        """Whether the pool's ``async with`` block has exited."""
        check_run(self._token, "SocketPool")
        return self._closed

    @property
    def fresh_isns(self) -> bool:
        """Whether no connection of this pool can continue an earlier one's sequence numbers.

        True where the pool resets a disconnected socket so that its next
        connection, to another peer, starts at a fresh RFC 6528 ISN, as
        after ``socket()`` (TCP repair mode, which needs ``CAP_NET_ADMIN``;
        its last peer knows the old sequence anyway), or does not
        recycle at all: an idle socket then serves any peer by default
        (``peer_affinity="auto"``). False where the reset is not permitted,
        the common case: the next ISN then follows from the last one, which
        that peer could predict, so an idle socket serves only it.
        """
        check_run(self._token, "SocketPool")
        return not self._recycle or fresh_isns()

    @property
    def recycling(self) -> bool:
        """Whether closed sockets are disconnected and reused.

        False when the pool was opened with ``recycle=False`` or when
        `can_recycle` is False: the pool then closes every socket instead,
        with the same API.
        """
        check_run(self._token, "SocketPool")
        return self._recycle

    # ------------------------------------------------------------------
    # Opens: taking a parked connection, or a socket (the SocketSource of _connect)

    def _check_open(self) -> None:
        if self._closed:
            raise pool_closed_error()

    def _adopt(self, psock: PooledSocket, make: Callable[[PooledSocket], _O]) -> _O:
        """A connected socket, or a live one handed over, becomes an open stream or UDP socket."""
        # The pool's exit can come between the winning attempt and here (the
        # happy-eyeballs nursery still had to wind down): then the socket is
        # closed already.
        self._check_open()
        if psock.state is CLOSED:  # pragma: no cover - defensive
            raise trio.ClosedResourceError("the socket was closed while it was connecting")
        owner = make(psock)
        self._ledger.move(psock, IN_USE)
        self._owners[psock] = weakref.ref(owner)
        return owner

    # ------------------------------------------------------------------
    # Sockets coming back (the Home protocol of _socket_access)

    def return_socket(self, psock: PooledSocket, end: StreamEnd) -> None:
        """A stream was closed: recycle, drain or close its socket."""
        if psock.state is not IN_USE:
            return  # pragma: no cover - defensive: the pool's exit force-closes the stream first
        del self._owners[psock]
        self._places.end(psock, end)
        if self._places.room.queue:
            self._places.serve_waiters()

    def release_socket(self, psock: PooledSocket, end: StreamEnd) -> bool:
        """A stream was released: hand over or park the live connection if it is clean, else as `return_socket`.

        Returns:
          Whether the connection was parked or handed to a waiting task.
        """
        if psock.state is not IN_USE:
            return False  # pragma: no cover - defensive: the pool's exit force-closes the stream first
        del self._owners[psock]
        may_park = (end is PARKABLE or end.may_park) and not self._closed
        kept = None
        # No option set through the stream (restore_options() has nothing to do): the common case, inline.
        untouched = not (psock.saved_options or psock.tainted or psock.unparkable)
        if may_park and psock.open_key is not None and (untouched or psock.restore_options()):
            kept = self._keepalive.keep(psock)
        if kept is None:
            # Not parked (a task the room could serve waits, say): by releasing, the caller vouched
            # nothing is owed, so with nothing in flight the disconnect ends it, freeing its place at once.
            self._places.end(psock, attrs.evolve(end, idle=may_park))
        if not kept:
            self._ledger.note_not_parked()
        if self._places.room.queue:
            self._places.serve_waiters()
        return bool(kept)

    def _on_watch(self) -> None:
        """The watch woke: a parked connection has something to read, an error, or has expired."""
        self._keepalive.check()
        self._places.serve_waiters()

    def socket_dropped(self, psock: PooledSocket) -> None:
        """A stream was garbage-collected without aclose(): reclaim its socket.

        Called from the stream's ``__del__``, which can run in any thread and
        between any two bytecodes of the pool's own code, so it touches no
        bookkeeping: the work goes to the pool's run as a callback.
        """
        # RunFinishedError: the run is over, and the pool's exit closed every socket.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._reclaim, psock)

    def _reclaim(self, psock: PooledSocket) -> None:
        # Its state is unknown (unread data, no FIN): close, never recycle.
        if psock.state is not IN_USE:
            return  # the pool's exit came first
        del self._owners[psock]
        trio.lowlevel.notify_closing(psock.sock)
        self._places.discard(psock)
        self._places.serve_waiters()

    # ------------------------------------------------------------------
    # The exit

    def _close(self) -> None:
        """The pool's block exited: close everything, fail every waiter."""
        if self._closed:
            return  # pragma: no cover - defensive: open_socket_pool's exit calls this once
        self._closed = True
        self._places.close(pool_closed_error)
        for psock in self._ledger.sockets(CONNECTING, HANDED, IN_USE):
            ref = self._owners.pop(psock, None)
            owner = ref() if ref is not None else None
            if owner is not None:
                owner._force_close()
            trio.lowlevel.notify_closing(psock.sock)
            self._places.discard(psock)
        # Draining sockets: their drain tasks close them when cancelled.
        self._nursery.cancel_scope.cancel()
