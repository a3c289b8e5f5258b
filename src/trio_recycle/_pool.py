"""SocketPool: the coordinator that decides which socket serves which open, and what happens to it afterwards."""

# The pool's parts each have a room of their own, and the pool coordinates
# them:
#
# * _lifecycle: a socket's states, the moves allowed between them, and the
#   Ledger, the only writer of states, counts and lifetime counters;
# * _store: idle sockets and parked connections in one eviction order, and
#   the parked ones' watch;
# * _waiting: the tasks waiting for capacity, first come first served;
# * _close: from a stream's end to a verdict (recycle, drain, close) and the
#   bounded wait for the peer's FIN;
# * _connect: resolution and happy eyeballs over the pool's sockets.
#
# Every entry point (an open, a stream closed or released, the watch
# waking, a drain ending, a dropped stream reclaimed, a failed connect)
# changes states through the ledger and then calls _serve_waiters, the one
# reconciler: it gives what is free (an idle socket of the waiter's key, a
# free place, or a place made by evicting the least recently used idle or
# parked socket) to the first waiter that can be served. Nothing else hands
# anything to a waiter, except `release` handing its live connection to a
# task waiting for the same open. So a task arriving later never overtakes
# one that waits, and while a waiter that could be served waits, nothing is
# idle or parked.
#
# Failures while a waiter's socket is made (socket(), setsockopt(), bind())
# belong to that waiter: it gets the error, and the reconciler goes on with
# the next one, so the aclose() or drain that freed the place never sees
# it. Out of descriptors (EMFILE/ENFILE), _create first evicts the least
# recently used idle socket or parked connection and retries once; if
# socket() still fails, every queued waiter gets the error at once: the
# limit is the process's, the pool gets no event when some other part of
# the program frees a descriptor, and a waiter left queued in front of a
# free place would block everyone behind it with no bound. Failing fast is
# what trio.open_tcp_stream does in the same spot.
#
# capacity_per_peer bounds the sockets toward one peer address (every state
# but IDLE and CLOSED: the ledger counts them). A waiter whose peer is at
# its limit is skipped, not served, so it never blocks the waiters of other
# peers; among the waiters that can be served the order stays FIFO.

from __future__ import annotations

import contextlib
import errno
import socket
import weakref
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, final

import attrs
import trio

from ._close import StreamEnd, Verdict, decide, discard_queued, wait_for_fin
from ._connect import (
    all_failed,
    connect_pooled,
    connect_socket,
    connect_udp,
    validate_delay,
    validate_endpoint,
    validate_local_address,
)
from ._errors import check_run, wrong_run_error
from ._lifecycle import Ledger, State
from ._pooled_socket import OpenKey, PooledSocket, SocketOption
from ._statistics import PoolStatistics
from ._store import SocketStore
from ._stream import RecyclingStream
from ._tcp_state import TcpState, tcp_state
from ._udp import RecyclingUDPSocket
from ._waiting import Request, WaitingRoom
from ._watch import URGENT, quiet

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SocketPool"]

IDLE, CONNECTING, HANDED, IN_USE, PARKED, DRAINING, CLOSED = State

# The pool's methods check first that they run in the pool's own trio.run
# (_stream.py says why).
_current_trio_token: Final = trio.lowlevel.current_trio_token

# TCP defaults, the same as trio.SocketStream's (trio issue #72); both
# survive a disconnect, so they are set once per socket, not per use.
_TCP_DEFAULTS: Final[tuple[SocketOption, ...]] = tuple(
    (socket.IPPROTO_TCP, option, value)
    for option, value in (
        (socket.TCP_NODELAY, 1),
        (getattr(socket, "TCP_NOTSENT_LOWAT", None), 2**14),
    )
    if option is not None
)
#: socket() errors that closing one of our own descriptors can cure.
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
#: How a parked connection that expired or received bytes unasked ends:
#: the close protocol of a healthy stream that saw no EOF.
_QUIET_END: Final = StreamEnd(eof_seen=False, eof_sent=False, healthy=True)
_CLOSED_MESSAGE: Final = "this SocketPool is closed: the `async with open_socket_pool()` block has exited"


class _Owner(Protocol):
    """What the pool needs from a stream to close it at exit."""

    def _force_close(self) -> None: ...


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
    _eof_timeout: float
    _drain_limit: int
    _peer_affinity: bool
    _recycle: bool
    #: Options for every socket it makes, and for TCP ones (trio's defaults first).
    _socket_options: tuple[SocketOption, ...]
    _tcp_options: tuple[SocketOption, ...]
    _capacity_per_peer: int | None
    _nursery: trio.Nursery
    _ledger: Ledger[PooledSocket]
    _store: SocketStore
    _room: WaitingRoom[PooledSocket]
    #: A weak reference to each IN_USE socket's stream: a stream dropped
    #: without aclose() can be collected and give its place back.
    _owners: dict[PooledSocket, weakref.ref[_Owner]]
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
    ) -> SocketPool:
        """The pool of an `open_socket_pool` block, whose arguments are checked already."""
        self = object.__new__(cls)
        self._capacity = capacity
        self._eof_timeout = eof_timeout
        self._drain_limit = drain_limit
        self._peer_affinity = peer_affinity
        self._recycle = recycle
        self._socket_options = socket_options
        self._tcp_options = _TCP_DEFAULTS + socket_options
        self._capacity_per_peer = capacity_per_peer
        self._nursery = nursery
        self._ledger = Ledger()
        self._store = SocketStore(nursery, keepalive_expiry, self._on_watch)
        self._room = WaitingRoom()
        self._owners = {}
        self._closed = False
        self._token = trio.lowlevel.current_trio_token()
        return self

    def __repr__(self) -> str:
        # Counts only: the pool can own thousands of sockets.
        ledger, waiting = self._ledger, len(self._room)
        in_use = ledger.count(CONNECTING) + ledger.count(HANDED) + ledger.count(IN_USE)
        return (
            f"<trio_recycle.SocketPool {'closed' if self._closed else 'open'},"
            f" {'recycling' if self._recycle else 'not recycling'}: {len(ledger)}/{self._capacity} sockets"
            f" ({in_use} in use, {ledger.count(IDLE)} idle, {ledger.count(PARKED)} parked,"
            f" {ledger.count(DRAINING)} draining), {waiting} task{'' if waiting == 1 else 's'} waiting>"
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
        was opened with ``peer_affinity=False``), otherwise a new one. When
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
        validate_endpoint(host, port)
        validate_delay(happy_eyeballs_delay)
        validate_local_address(local_address)
        open_key = (host, port, local_address)
        try:
            self._check_open()
            if self._store.parked_count and self._store.has_parked(open_key):
                stream = await self._take_parked(open_key)
                if stream is not None:
                    return stream
            psock = await connect_pooled(
                self,
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
        (any address when the pool was opened with ``peer_affinity=False``)
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
            psock = await connect_udp(self, host, port, local_address=local_address)
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
        ledger = self._ledger
        return PoolStatistics(
            capacity=self._capacity,
            idle=ledger.count(IDLE),
            in_use=ledger.count(CONNECTING) + ledger.count(HANDED) + ledger.count(IN_USE),
            draining=ledger.count(DRAINING),
            tasks_waiting=len(self._room),
            created=ledger.created,
            reused=ledger.reused,
            recycled=ledger.recycled,
            discarded=ledger.discarded,
            parked=ledger.count(PARKED),
            kept_alive=ledger.kept_alive,
            not_parked=ledger.not_parked,
        )

    @property
    def closed(self) -> bool:
        """Whether the pool's ``async with`` block has exited."""
        check_run(self._token, "SocketPool")
        return self._closed

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
            raise trio.ClosedResourceError(_CLOSED_MESSAGE)

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

    async def _take_parked(self, open_key: OpenKey) -> RecyclingStream | None:
        """Serve an open with a parked connection of ``open_key``; None: none was alive.

        The liveness check is the watch's: every parked connection past its
        expiry or with bytes, a FIN or an error is handled before anything
        is taken. A connection of this open whose peer closed meanwhile is
        disconnected and connected again to the same address here (no DNS),
        if no live one is left.
        """
        # Before taking anything; after it, nothing awaits until the stream
        # exists, except a reconnect, whose failure discards the socket.
        await trio.lowlevel.checkpoint_if_cancelled()
        closed_by_peer = self._check_parked(open_key)
        psock = self._store.take_parked(open_key)
        if psock is None:
            if closed_by_peer is None:
                self._serve_waiters()
                return None
            return await self._reconnect(closed_by_peer, open_key)
        if closed_by_peer is not None:
            self._recycle_or_close(closed_by_peer)
        stream = self._adopt(psock, self._new_stream)
        self._serve_waiters()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def _reconnect(self, psock: PooledSocket, open_key: OpenKey) -> RecyclingStream:
        """The peer closed a parked connection first: disconnect it and connect it again."""
        peer = psock.peer
        if self._recycle and psock.reset_for_reuse():
            self._ledger.move(psock, IDLE)
            self._ledger.move(psock, CONNECTING, peer)
        else:
            self._discard(psock)
            self._serve_waiters()
            family, type, proto, _, _ = psock.key
            psock = await self.acquire_socket(family, type, proto, open_key[2], peer)
        try:
            await connect_socket(psock.sock, peer)
        except BaseException as exc:
            self.discard_socket(psock)
            if isinstance(exc, OSError):
                raise all_failed(open_key[0], open_key[1], [(peer, exc)]) from exc
            raise
        psock.open_key = open_key
        return self._adopt(psock, self._new_stream)

    async def acquire_socket(
        self,
        family: int,
        type: int,
        proto: int,
        local_address: str | None,
        peer: object,
        *,
        replacing: PooledSocket | None = None,
        origin: OpenKey | None = None,
    ) -> PooledSocket:
        """Take an idle socket for ``peer`` or a new one, waiting for capacity.

        ``origin``: the (host, port, local_address) of the open. When this
        call waits, a stream of the same open released meanwhile may hand
        its live connection over directly (the socket is then HANDED).

        ``replacing``: a socket of the same open still connecting (happy
        eyeballs). If this call would have to wait and that socket's SYN is
        still unanswered (SYN_SENT), the new socket takes its place and it
        is closed: the open keeps the capacity it holds, and overtakes
        nobody; unless this call's peer is at ``capacity_per_peer``, which
        then waits like any other. A connect that has already finished,
        either way, is left alone: its task is about to win or to free its
        place.
        """
        self._check_open()
        # Before taking anything: a task cancelled on entry must not take an
        # idle socket only to close it in its error path.
        await trio.lowlevel.checkpoint_if_cancelled()
        key = (family, type, proto, local_address, peer if self._peer_affinity else None)
        request = Request(family, type, proto, local_address, key, peer, origin)
        if replacing is not None and self._may_take_over(replacing, peer):
            return self._take_over(replacing, request)
        if not self._someone_servable():
            psock = self._take_now(request)
            if psock is not None:
                return psock
        psock = await self._room.wait(request)
        # Granted, then the pool closed before this task ran: the socket
        # is gone with the pool.
        self._check_open()
        return psock

    def _take_now(self, request: Request) -> PooledSocket | None:
        """Serve an arriving task at once, when nobody it would overtake waits; None: it must wait."""
        peer = request.peer
        if self._capacity_per_peer is not None and self._peer_full(peer):
            # A parked connection to the same peer (of another host name,
            # say) makes room, as an idle socket does below.
            victim = self._store.oldest_parked_for(peer)
            if victim is not None:
                self._evict(victim)
                self._serve_waiters()
            if self._peer_full(peer):
                return None
        psock = self._store.take_idle(request.key)
        if psock is not None:
            self._ledger.move(psock, CONNECTING, peer)
            return psock
        if len(self._ledger) >= self._capacity:
            victim = self._store.oldest()
            if victim is None:
                return None
            self._evict(victim)
            self._serve_waiters()
            if len(self._ledger) >= self._capacity:
                return None
        return self._create(request)

    def _may_take_over(self, replacing: PooledSocket, peer: object) -> bool:
        return (
            replacing.state is CONNECTING
            # Only when this call would wait: behind a waiter that can be
            # served, or at a full pool with nothing to evict. Waiters
            # held back by their own peer's limit hold nobody else up.
            and (self._someone_servable() or (len(self._ledger) >= self._capacity and not self._store))
            # The place taken over counts for the sibling's peer, the new
            # socket for this one: never past this peer's capacity_per_peer.
            and not (self._peer_full(peer) and replacing.peer != peer)
            and tcp_state(replacing.sock) is TcpState.SYN_SENT
        )

    def _take_over(self, replacing: PooledSocket, request: Request) -> PooledSocket:
        """Close a sibling attempt still in SYN_SENT and give its place to a new socket."""
        # Create first: if that fails, the sibling keeps connecting.
        # Nothing here awaits, so the moment with one socket too many is
        # never seen at a checkpoint (I4).
        try:
            taking_over: PooledSocket | None = self._create(request)
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            taking_over = None
        trio.lowlevel.notify_closing(replacing.sock)
        self._discard(replacing)
        if taking_over is None:
            # At RLIMIT_NOFILE the sibling's descriptor is the one we need.
            try:
                taking_over = self._create(request)
            except BaseException:
                self._serve_waiters()
                raise
        return taking_over

    def discard_socket(self, psock: PooledSocket) -> None:
        """Close a socket that was taken but never became an open stream (a failed or cancelled connect)."""
        if psock.state is CLOSED:
            return
        self._discard(psock)
        self._serve_waiters()

    # ------------------------------------------------------------------
    # Sockets coming back (the Home protocol of _socket_access)

    def return_socket(self, psock: PooledSocket, end: StreamEnd) -> None:
        """A stream was closed: recycle, drain or close its socket."""
        if psock.state is not IN_USE:
            return  # pragma: no cover - defensive: the pool's exit force-closes the stream first
        del self._owners[psock]
        self._end(psock, end)
        self._serve_waiters()

    def release_socket(self, psock: PooledSocket, end: StreamEnd) -> bool:
        """A stream was released: hand over or park the live connection if it is clean, else as `return_socket`.

        Returns:
          Whether the connection was parked or handed to a waiting task.
        """
        if psock.state is not IN_USE:
            return False  # pragma: no cover - defensive: the pool's exit force-closes the stream first
        del self._owners[psock]
        kept = None
        if end.may_park and not self._closed and psock.open_key is not None and psock.restore_options():
            kept = self._keep(psock)
        if kept is None:
            self._end(psock, end)
        if not kept:
            self._ledger.note_not_parked()
        self._serve_waiters()
        return bool(kept)

    def _keep(self, psock: PooledSocket) -> bool | None:
        """A clean live connection: to a task waiting for the same open, else parked.

        Returns:
          True (handed over or parked), None (refused: the caller runs the
          close protocol) or False (parked, but found at once with bytes,
          the peer's FIN or an error, and handled).
        """
        if self._room:
            # Its own place does not count against its peer while the first
            # waiter that could be served is chosen.
            limit = self._capacity_per_peer
            per_peer = self._ledger.per_peer
            found = self._room.first_servable(
                None if limit is None else lambda p: per_peer.get(p, 0) - (p == psock.peer) >= limit
            )
            if found is not None:
                task, request = found
                if request.origin != psock.open_key or request.peer != psock.peer or not quiet(psock.sock):
                    # No parking while a task that the room could serve
                    # waits: the close protocol frees the room.
                    return None
                self._ledger.move(psock, HANDED)
                self._room.grant(task, psock)
                return True
        assert psock.open_key is not None
        try:
            self._store.park(psock, psock.open_key)
        except OSError:  # pragma: no cover - epoll_ctl fails only out of kernel memory or past max_user_watches
            return None
        self._ledger.move(psock, PARKED)
        # The check for anything unread: the answer may have had more bytes
        # than the caller read, or the peer may have closed already.
        self._check_parked()
        return psock.state is PARKED

    def _on_watch(self) -> None:
        """The watch woke: a parked connection has something to read, an error, or has expired."""
        self._check_parked()
        self._serve_waiters()

    def _check_parked(self, key: OpenKey | None = None) -> PooledSocket | None:
        """The liveness check: end every parked connection that expired or has something to read or an error.

        Returns:
          With a ``key``: one connection of that key whose peer closed, not
          yet disconnected, for the caller to reconnect; else None.
        """
        for psock in self._store.expired():
            # Parked for keepalive_expiry: close it politely (our FIN, then the drain).
            self._end(psock, _QUIET_END)
        closed_by_peer = None
        for psock, events in self._store.ready():
            if events & URGENT:
                peeked = b"!"
            else:
                try:
                    peeked = psock.sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:  # pragma: no cover - level-triggered: something was there
                    self._store.park(psock, psock.open_key)  # type: ignore[arg-type]
                    continue
                except OSError:
                    self._discard(psock)
                    continue
            if peeked:
                # Unsolicited bytes (I9): discarded with the connection,
                # never handed out. The close protocol may still recycle
                # it, if the peer's FIN follows them.
                self._end(psock, _QUIET_END)
            elif key is not None and closed_by_peer is None and psock.open_key == key:
                closed_by_peer = psock
            else:
                # The peer closed first: disconnecting now leaves no
                # TIME_WAIT anywhere and frees the peer's state at once.
                self._recycle_or_close(psock)
        return closed_by_peer

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
        self._discard(psock)
        self._serve_waiters()

    async def _drain(self, psock: PooledSocket, received: int) -> None:
        fin = False
        try:
            with trio.move_on_after(self._eof_timeout):
                fin = await wait_for_fin(psock.sock, received, self._drain_limit)
        except OSError:
            pass
        finally:
            # Also on Cancelled (the pool's exit): then fin is False.
            if fin:
                self._recycle_or_close(psock)
            else:
                self._discard(psock)
            self._serve_waiters()

    # ------------------------------------------------------------------
    # The moves, and the reconciler

    def _end(self, psock: PooledSocket, end: StreamEnd) -> None:
        """Carry out the close protocol for a socket whose stream ended (or whose parking did)."""
        recycle = self._recycle and not psock.tainted
        verdict, received = decide(end, psock.sock, recycle=recycle, drain_limit=self._drain_limit)
        if verdict is Verdict.RECYCLE:
            self._recycle_or_close(psock)
        elif verdict is Verdict.DRAIN:
            self._ledger.move(psock, DRAINING)
            self._nursery.start_soon(self._drain, psock, received)
        else:
            self._discard(psock)

    def _recycle_or_close(self, psock: PooledSocket) -> None:
        # A drain can see the peer's FIN in the same scheduler round as the
        # pool's exit, after _close() ran: then there is no idle to go to.
        if self._recycle and not self._closed and psock.reset_for_reuse() and self._wanted(psock):
            psock.open_key = None
            self._ledger.move(psock, IDLE)
            self._store.put_idle(psock)
        else:
            self._discard(psock)

    def _wanted(self, psock: PooledSocket) -> bool:
        """Whether a disconnected socket may go idle: not when the first waiter it would go to needs another key.

        Its place then goes to a new socket for that waiter (the
        reconciler makes it); counting it recycled would count a socket
        that is closed at once.
        """
        found = self._room.first_servable(self._full_peers()) if self._room else None
        return found is None or found[1].key == psock.key

    def _discard(self, psock: PooledSocket) -> None:
        psock.close()
        self._ledger.move(psock, CLOSED)

    def _evict(self, psock: PooledSocket) -> None:
        """Close an idle socket or a parked connection to make room for an open."""
        if self._store.remove(psock):
            # A parked connection is closed at once, not drained: the room
            # is needed now. What arrived since the watch last looked is
            # read and discarded first: close() with unread bytes would
            # reset the peer (I7); with none it sends our FIN and the kernel
            # finishes the connection. TIME_WAIT stays with us, as after
            # any close we start.
            discard_queued(psock.sock, self._drain_limit)
        self._discard(psock)

    def _create(self, request: Request) -> PooledSocket:
        options = self._tcp_options if request.type == socket.SOCK_STREAM else self._socket_options
        args = (request.family, request.type, request.proto, request.local_address, options, request.key)
        try:
            psock = PooledSocket.create(*args)
        except OSError as exc:
            # Out of descriptors while sockets sit idle or parked for other
            # peers: evict the least recently used, as at capacity, and
            # retry once.
            victim = self._store.oldest()
            if exc.errno not in _OUT_OF_DESCRIPTORS or victim is None:
                raise
            self._evict(victim)
            psock = PooledSocket.create(*args)
        self._ledger.add(psock, request.peer)
        return psock

    def _peer_full(self, peer: object) -> bool:
        limit = self._capacity_per_peer
        return limit is not None and self._ledger.per_peer.get(peer, 0) >= limit

    def _full_peers(self) -> Callable[[object], bool] | None:
        return None if self._capacity_per_peer is None else self._peer_full

    def _someone_servable(self) -> bool:
        """Whether a waiter's peer is below its limit (every waiter is, without one)."""
        return bool(self._room) and self._room.first_servable(self._full_peers()) is not None

    def _serve_waiters(self) -> None:
        """The reconciler: give what is free to the waiters that can be served, first come first served."""
        room = self._room
        while room and not self._closed:
            found = room.first_servable(self._full_peers())
            if found is None:
                return
            task, request = found
            psock = self._store.take_idle(request.key)
            if psock is not None:
                self._ledger.move(psock, CONNECTING, request.peer)
            elif len(self._ledger) >= self._capacity:
                victim = self._store.oldest()
                if victim is None:
                    return
                # Then again from the top: the eviction may have made an
                # earlier waiter servable (its peer was at its limit).
                self._evict(victim)
                continue
            else:
                try:
                    psock = self._create(request)
                except Exception as exc:
                    # The waiter's own failure (its local_address, the
                    # descriptors running out): it goes to that task alone.
                    room.fail(task, exc)
                    continue
            room.grant(task, psock)

    def _close(self) -> None:
        """The pool's block exited: close everything, fail every waiter."""
        if self._closed:
            return  # pragma: no cover - defensive: open_socket_pool's exit calls this once
        self._closed = True
        self._room.fail_all(lambda: trio.ClosedResourceError(_CLOSED_MESSAGE))
        for psock in self._ledger.sockets(CONNECTING, HANDED, IN_USE):
            ref = self._owners.pop(psock, None)
            owner = ref() if ref is not None else None
            if owner is not None:
                owner._force_close()
            trio.lowlevel.notify_closing(psock.sock)
            self._discard(psock)
        for psock in self._store.clear():
            if psock.state is PARKED:  # as in _evict
                discard_queued(psock.sock, self._drain_limit)
            self._discard(psock)
        # Draining sockets: their drain tasks close them when cancelled.
        self._nursery.cancel_scope.cancel()
