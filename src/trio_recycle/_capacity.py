"""Capacity: which open gets which socket, who waits, where sockets go back, and the reconciler."""

# The policy beside the waiting room, as trio keeps CapacityLimiter beside
# ParkingLot (trio/_sync.py, trio/_core/_parking_lot.py):
#
# * An arriving open takes an idle socket of its key, a new one below
#   `capacity`, or the place of the least recently used idle or parked
#   socket (evicted), else a drain's that has had GIVE_WAY_AFTER; otherwise
#   it waits, first come first served, never overtaking a servable waiter.
# * `serve_waiters` is the reconciler, run at the end of every entry point
#   (httpcore's _assign_requests_to_connections rule); nothing else serves a
#   waiter but release() handing a live connection to a waiter of its open.
# * A waiter's own failure (socket(), setsockopt(), bind()) goes to that
#   waiter alone. Out of descriptors, `create` evicts once and retries; if
#   socket() still fails every queued waiter gets the error at once: the
#   pool gets no event when the process frees a descriptor, and a waiter
#   queued in front of a free place would block everyone with no bound.
# * capacity_per_peer: a waiter whose peer is at its limit is skipped, not
#   served, so it never blocks other peers' waiters; an arriving open for a
#   full peer first evicts a parked connection to the same peer.
# * Happy eyeballs at a full pool: a later attempt that would wait takes
#   over its sibling's place while the sibling is still in SYN_SENT.

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from . import _pressure
from ._close import StreamEnd, Verdict, decide, discard_queued, finish_drain
from ._errors import pool_closed_error
from ._in_flight import nothing_in_flight
from ._lifecycle import Ledger, State
from ._pooled_socket import TCP_DEFAULTS, PooledSocket
from ._tcp_state import TcpState, tcp_state
from ._waiting import Request, WaitingRoom

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._pooled_socket import OpenKey, PoolKey, SocketOption
    from ._store import SocketStore

__all__ = ["Capacity"]

IDLE, CONNECTING, HANDED, IN_USE, PARKED, DRAINING, CLOSED = State

#: Seconds a drain has to finish before it gives way to a waiting task
#: (at most half of eof_timeout).
GIVE_WAY_AFTER: Final = 0.5
#: socket() errors that closing one of our own descriptors can cure.
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})


@final
@attrs.define(eq=False)
class Capacity:
    """The places of one pool: taking a socket for an open or waiting for one, evicting, and serving the waiters."""

    capacity: int
    per_peer: int | None
    _peer_affinity: bool
    recycling: bool
    #: End an idle parked connection that must go with the disconnect
    #: itself, not our FIN (open_socket_pool's reset_idle).
    reset_idle: bool
    _drain_limit: int
    _eof_timeout: float
    #: Options for every socket made, and for TCP ones (trio's defaults first).
    _socket_options: tuple[SocketOption, ...]
    #: Where drains run: the pool's.
    _nursery: trio.Nursery
    #: The SocketPool, by which protocol layers register their idle
    #: connections (_pressure.py).
    _pool: object
    ledger: Ledger[PooledSocket]
    store: SocketStore
    room: WaitingRoom[PooledSocket] = attrs.field(init=False)
    closed: bool = False
    _tcp_options: tuple[SocketOption, ...] = attrs.field(init=False)
    #: When each drain started.
    _drains: dict[PooledSocket, float] = attrs.field(factory=dict)
    #: When a task of the pool's runs the reconciler for a young drain (_wake_at).
    _wake_pending: float | None = None
    _give_way_after: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tcp_options = TCP_DEFAULTS + self._socket_options
        self._give_way_after = min(GIVE_WAY_AFTER, self._eof_timeout / 2)
        self.room = WaitingRoom(self.per_peer, self.ledger.per_peer)
        if self.per_peer is not None:  # the room's fullness follows every count the ledger writes
            self.ledger.on_peer_count = self.room.recount

    # ------------------------------------------------------------------
    # Taking

    async def acquire(
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
        """Take an idle socket for ``peer`` or a new one, waiting for capacity (the SocketSource of _connect).

        ``origin``: the open's (host, port, local_address), for which a
        released live connection may be HANDED to this call while it waits.
        ``replacing``: a sibling attempt of the same open still connecting,
        whose place this call takes over instead of waiting while its SYN
        is unanswered (never past this peer's capacity_per_peer).

        Raises:
          trio.ClosedResourceError: the pool's block has exited.
        """
        if self.closed:
            raise pool_closed_error()
        # Before taking anything: a task cancelled on entry must not take an
        # idle socket only to close it in its error path.
        await trio.lowlevel.checkpoint_if_cancelled()
        key = (family, type, proto, local_address, peer if self._peer_affinity else None)
        if not self.room.queue and replacing is None and (self.per_peer is None or not self.peer_full(peer)):
            # Nobody waits: an idle socket, if there is one, without the rest.
            psock = self._take_idle(key, peer)
            if psock is not None:
                return psock
        request = Request(family, type, proto, local_address, key, peer, origin)
        if replacing is not None and self._may_take_over(replacing, peer):
            return self._take_over(replacing, request)
        while not self._someone_servable():
            psock = self._take_now(request)
            if psock is not None:
                return psock
            # A layer that holds idle connections of its own (httpx:
            # _pressure.py) gives one back, and this task tries again; but
            # not for a peer at its own limit (another peer's connection
            # frees nothing for it), and only while each one given back
            # frees a place or an idle socket (it may go to a drain).
            if self.per_peer is not None and self.peer_full(peer):
                break
            before = (len(self.ledger), self.ledger.count(IDLE))
            if not _pressure.relieve(self._pool):
                break
            after = (len(self.ledger), self.ledger.count(IDLE))
            if after[0] >= before[0] and after[1] <= before[1]:
                break
        with _pressure.waiting(self._pool):
            granted = await self.room.wait(request)
        if self.closed:
            # Granted, then the pool closed before this task ran: the
            # socket is gone with the pool.
            raise pool_closed_error()
        return granted

    def _take_now(self, request: Request) -> PooledSocket | None:
        """Serve an arriving task at once, when nobody it would overtake waits; None: it must wait."""
        peer = request.peer
        if self.per_peer is not None and self.peer_full(peer):
            victim = self.store.oldest_parked_for(peer)
            if victim is not None:
                self.evict(victim, for_key=request.key)
                self.serve_waiters()
            if self.peer_full(peer) or self._someone_servable():
                return None
        while True:
            psock = self._take_idle(request.key, peer)
            if psock is not None:
                return psock
            if len(self.ledger) < self.capacity:
                return self.create(request)
            if not self.make_room(request.key):
                return None
            # The room made may serve an earlier waiter first (its peer
            # was at its limit): then this task queues behind it.
            self.serve_waiters()
            if self._someone_servable():
                return None

    def _take_idle(self, key: PoolKey, peer: object) -> PooledSocket | None:
        """The newest idle socket of ``key``, CONNECTING toward ``peer``, its ISN fresh if it was another peer's."""
        while (psock := self.store.take_idle(key)) is not None:
            if psock.fresh_for(peer):
                self.ledger.move(psock, CONNECTING, peer)
                return psock
            self.discard(psock)  # the reset failed: its next ISN is not fresh
        return None

    def _may_take_over(self, replacing: PooledSocket, peer: object) -> bool:
        return (
            replacing.state is CONNECTING
            # Only when this call would wait: behind a waiter that can be
            # served, or at a full pool with nothing to evict. Waiters
            # held back by their own peer's limit hold nobody else up.
            and (self._someone_servable() or (len(self.ledger) >= self.capacity and not self.store))
            # The place taken over counts for the sibling's peer, the new
            # socket for this one: never past this peer's capacity_per_peer.
            and not (self.peer_full(peer) and replacing.peer != peer)
            and tcp_state(replacing.sock) is TcpState.SYN_SENT
        )

    def _take_over(self, replacing: PooledSocket, request: Request) -> PooledSocket:
        """Close a sibling attempt still in SYN_SENT and give its place to a new socket."""
        # Create first: if that fails, the sibling keeps connecting.
        # Nothing here awaits, so the moment with one socket too many is
        # never seen at a checkpoint (I4).
        try:
            taking_over: PooledSocket | None = self.create(request)
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            taking_over = None
        trio.lowlevel.notify_closing(replacing.sock)
        self.discard(replacing)
        if taking_over is None:
            # At RLIMIT_NOFILE the sibling's descriptor is the one we need.
            try:
                taking_over = self.create(request)
            except BaseException:
                self.serve_waiters()
                raise
        return taking_over

    def create(self, request: Request) -> PooledSocket:
        """A new socket for ``request``, counted CONNECTING (out of descriptors: evict once and retry)."""
        options = self._tcp_options if request.type == socket.SOCK_STREAM else self._socket_options
        args = (request.family, request.type, request.proto, request.local_address, options, request.key)
        try:
            psock = self._make(args)
        except OSError as exc:
            victim = self.store.oldest()
            if exc.errno not in _OUT_OF_DESCRIPTORS or victim is None:
                raise
            self.evict(victim)
            try:
                psock = self._make(args)
            except BaseException:
                self.serve_waiters()  # the eviction's place may serve a waiter of another peer
                raise
        self.ledger.add(psock, request.peer)
        return psock

    def _make(self, args: tuple[int, int, int, str | None, tuple[SocketOption, ...], PoolKey]) -> PooledSocket:
        made: list[None] = []
        try:
            return PooledSocket.create(*args, made=lambda: made.append(None))
        except BaseException:
            if made:
                # socket() ran, what followed failed and closed it: counted in
                # created and in discarded, so statistics show every call.
                self.ledger.note_closed_at_birth()
            raise

    # ------------------------------------------------------------------
    # Giving back

    def end(self, psock: PooledSocket, end: StreamEnd) -> None:
        """Carry out the close protocol for a socket whose stream ended (or whose parking did)."""
        recycle = self.recycling and not psock.tainted
        if end.idle and not self.reset_idle:
            end = attrs.evolve(end, idle=False)  # reset_idle=False: our FIN, never the RST
        verdict, received, eof_seen, send_fin = decide(end, psock.sock, recycle=recycle, drain_limit=self._drain_limit)
        if verdict is Verdict.RECYCLE:
            self.put_back(psock)
        elif verdict is Verdict.DRAIN:
            self.ledger.move(psock, DRAINING)
            self._drains[psock] = trio.current_time()
            self._nursery.start_soon(self._drain, psock, received, eof_seen, send_fin)
        else:
            self.discard(psock)

    async def _drain(self, psock: PooledSocket, received: int, eof_seen: bool, send_fin: bool) -> None:
        fin = False
        try:
            with trio.move_on_after(self._eof_timeout):
                fin = await finish_drain(psock.sock, received, self._drain_limit, eof_seen=eof_seen, send_fin=send_fin)
        except (OSError, trio.ClosedResourceError):
            pass  # a reset; or the drain gave way to a waiting task (make_room)
        finally:
            self._drains.pop(psock, None)
            # Also on Cancelled (the pool's exit): then fin is False.
            if psock.state is DRAINING:
                if fin:
                    self.put_back(psock)
                else:
                    self.discard(psock)
                self.serve_waiters()

    async def _wake_at(self, when: float) -> None:
        """Run the reconciler at ``when``: a young drain will be old enough to give way by then."""
        await trio.sleep_until(when)
        if self._wake_pending == when:
            self._wake_pending = None
        self.serve_waiters()

    def put_back(self, psock: PooledSocket) -> None:
        """Disconnect a socket whose peer has sent its FIN and store it idle; close it when it cannot be."""
        # A drain can see the peer's FIN in the same scheduler round as the
        # pool's exit: then there is no idle to go to.
        if self.recycling and not self.closed and psock.reset_for_reuse() and self._wanted(psock):
            psock.open_key = None
            self.ledger.move(psock, IDLE)
            self.store.put_idle(psock)
        else:
            self.discard(psock)

    def _wanted(self, psock: PooledSocket) -> bool:
        """Whether a disconnected socket may go idle: not when the first waiter it would go to needs another key.

        Its place then goes to a new socket for that waiter (the reconciler
        makes it); counting it recycled would count a socket closed at once.
        """
        found = self.room.first_servable() if self.room.queue else None
        return found is None or found[1].key == psock.key

    def discard_socket(self, psock: PooledSocket) -> None:
        """Close a socket that was taken but never became an open stream (a failed or cancelled connect)."""
        if psock.state is not CLOSED:
            self.discard(psock)
            self.serve_waiters()

    def discard(self, psock: PooledSocket) -> None:
        """Close a socket for good."""
        psock.close()
        self.ledger.move(psock, CLOSED)

    def make_room(self, key: object = None) -> bool:
        """At capacity: end the least recently used idle or parked socket, else the oldest drain.

        ``key``: the PoolKey of the open the room is for, which an evicted
        parked connection may serve once disconnected. Returns False when
        there is nothing to end: every socket is in use or connecting.
        """
        victim = self.store.oldest()
        if victim is not None:
            self.evict(victim, for_key=key)
            return True
        draining = self.ledger.oldest(DRAINING)
        if draining is None:
            return False
        # A drain gives way once it has had GIVE_WAY_AFTER (a peer that
        # closes at all does so within round trips); for a younger one the
        # reconciler runs again then (the waiter may be gone by then).
        when = self._drains[draining] + self._give_way_after
        if trio.current_time() < when:
            if self._wake_pending is None or when < self._wake_pending:
                self._wake_pending = when
                self._nursery.start_soon(self._wake_at, when)
            return False
        self._give_way(draining)
        return True

    def _give_way(self, draining: PooledSocket) -> None:
        """End a drain for a waiting task: our FIN is out; the kernel finishes the close, as for trio.SocketStream."""
        # What arrived meanwhile is read first, so that the close sends no RST (I7).
        trio.lowlevel.notify_closing(draining.sock)
        discard_queued(draining.sock, self._drain_limit)
        self.ledger.note_evicted(draining)
        self.ledger.drains_cut += 1
        self.discard(draining)

    def evict(self, psock: PooledSocket, for_key: object = None) -> None:
        """End an idle socket or a parked connection to make room for an open (of ``for_key``, if known)."""
        self.ledger.note_evicted(psock)
        # A disconnected parked connection may serve the open needing the room.
        if self.store.remove(psock) and self._let_go(psock) and psock.key == for_key and not self.closed:
            psock.open_key = None
            self.ledger.move(psock, IDLE)
            self.store.put_idle(psock)
            return
        self.discard(psock)

    def _let_go(self, psock: PooledSocket) -> bool:
        """A parked connection must go: True when the disconnect ended it (reusable), else False (to close).

        The peer's FIN already here (CLOSE_WAIT, before the watch ran): as
        for any recycle, the RST ends its FIN_WAIT2, no TIME_WAIT anywhere.
        Idle and clean: the RST loses nothing (I7 as of 0.3), where our FIN
        would leave a TIME_WAIT here. Otherwise what arrived is read first,
        or close() would reset the peer (I7).
        """
        sock = psock.sock
        disconnect = tcp_state(sock) is TcpState.CLOSE_WAIT or (self.reset_idle and nothing_in_flight(sock))
        if self.recycling and disconnect and psock.reset_for_reuse():
            return True
        discard_queued(sock, self._drain_limit)
        return False

    # ------------------------------------------------------------------
    # Waiters

    def peer_full(self, peer: object) -> bool:
        """Whether ``peer`` has ``capacity_per_peer`` sockets."""
        return self.room.full(peer)

    def _someone_servable(self) -> bool:
        """Whether a waiter's peer is below its limit (every waiter is, without one)."""
        return bool(self.room.queue) and self.room.first_servable() is not None

    def first_servable_besides(self, psock: PooledSocket) -> tuple[trio.lowlevel.Task, Request] | None:
        """The first waiter that could be served if ``psock`` did not count against its peer."""
        return self.room.first_servable_besides(psock.peer) if self.room.queue else None

    def serve_waiters(self) -> None:
        """The reconciler: give what is free to the waiters that can be served, first come first served.

        Callers on a hot path test ``room.queue`` first: with nobody waiting
        there is nothing to do, and the call is saved.
        """
        room = self.room
        while room.queue and not self.closed:
            found = room.first_servable()
            if found is None:
                return
            task, request = found
            psock = self._take_idle(request.key, request.peer)
            if psock is None and len(self.ledger) >= self.capacity:
                if not self.make_room(request.key):
                    return
                # Then again from the top: the eviction may have made an
                # earlier waiter servable (its peer was at its limit), or
                # left an idle socket of this waiter's key.
                continue
            if psock is None:
                try:
                    psock = self.create(request)
                except Exception as exc:
                    # The waiter's own failure (its local_address, the
                    # descriptors running out): it goes to that task alone.
                    room.fail(task, exc)
                    continue
            room.grant(task, psock)

    def close(self, make_error: Callable[[], BaseException]) -> None:
        """The pool's exit: no more taking; every waiter fails with ``make_error()``; every stored socket is closed."""
        self.closed = True
        self.room.fail_all(make_error)
        for psock in self.store.clear():
            if psock.state is PARKED:
                self._let_go(psock)
            self.discard(psock)
