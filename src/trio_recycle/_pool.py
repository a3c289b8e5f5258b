"""SocketPool and open_socket_pool: capacity, waiting, hand-off, keep-alive, statistics."""

# Bookkeeping. Every descriptor the pool owns is in exactly one of four
# places: `_store` (idle: disconnected, waiting; or parked: a live
# connection released for another exchange, watched by `_watch`),
# `_in_use` (handed to a caller, connecting or wrapped in a stream),
# `_draining` (a background task waits for the peer's FIN). Their sizes add
# up to the descriptors open, which is at most `capacity` (invariant I4).
# `created - discarded` equals the same sum at every checkpoint.
#
# Waiting is FIFO and hand-off is direct, like trio.CapacityLimiter: a task
# that finds the pool full parks in `_waiters`; whoever frees a socket or a
# slot gives it straight to the first waiter that can be served (re-created
# for the waiter's peer if it does not match) before anybody else can take
# it. So a task arriving later can never overtake one that is waiting, and
# while anyone waits there is nothing idle or parked: an arriving task that
# finds the pool full but some socket idle or parked (for another peer)
# closes the least recently used of them and takes its place instead of
# waiting, and a stream released while tasks wait is not parked.
#
# Failures while a waiter's socket is made (socket(), setsockopt(), bind(),
# whatever they raise) belong to that waiter: _hand_off gives the error to
# its task and offers the slot to the next waiter, so the aclose() or the
# drain task that freed the slot never sees it. Out of descriptors
# (EMFILE/ENFILE), _create first evicts the least recently used idle socket
# or parked connection and retries once. If socket() still fails, every
# queued waiter gets the error at once: the limit is the process's, the pool
# gets no event when some other part of the program frees a descriptor, and
# a waiter left queued in front of a free slot would block everyone behind
# it with no bound. Failing fast is what trio.open_tcp_stream does in the
# same spot.
#
# capacity_per_peer bounds the sockets in use, draining or parked toward one
# peer address (idle sockets are disconnected and count for nobody). A
# waiter whose peer is at its limit is skipped, not served, so it never
# blocks the waiters of other peers behind it; among the waiters that can
# be served the order stays first come first served.

from __future__ import annotations

import contextlib
import errno
import math
import socket
import weakref
from typing import TYPE_CHECKING, Final, Literal, Protocol, final

import attrs
import outcome
import trio

from ._connect import (
    all_failed,
    connect_pooled,
    connect_socket,
    connect_udp,
    validate_delay,
    validate_endpoint,
    validate_local_address,
)
from ._disconnect import can_recycle
from ._drain import fin_unacknowledged, finish_drain, read_available
from ._errors import check_run, wrong_run_error
from ._pooled_socket import OpenKey, PooledSocket, PoolKey, SocketOption
from ._store import SocketStore
from ._stream import RecyclingStream
from ._udp import RecyclingUDPSocket
from ._watch import Watch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

__all__ = ["PoolStatistics", "SocketPool", "open_socket_pool"]

# The pool's methods check first that they run in the pool's own trio.run
# (_stream.py says why).
_current_trio_token: Final = trio.lowlevel.current_trio_token

#: Default for ``open_socket_pool(capacity=...)``.
DEFAULT_CAPACITY: Final = 64
#: Default for ``open_socket_pool(eof_timeout=...)``, in seconds.
DEFAULT_EOF_TIMEOUT: Final = 5.0
#: Default for ``open_socket_pool(drain_limit=...)``, in bytes.
DEFAULT_DRAIN_LIMIT: Final = 65536
#: Default for ``open_socket_pool(keepalive_expiry=...)``, in seconds.
DEFAULT_KEEPALIVE_EXPIRY: Final = 5.0


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


@final
@attrs.frozen
class PoolStatistics:
    """A snapshot of a `SocketPool`, from `SocketPool.statistics`.

    The fields from ``capacity`` to ``tasks_waiting`` and ``parked`` are
    the state now; the others are counts over the pool's life. The sockets
    the pool owns are ``idle + in_use + draining + parked``.

    Attributes:
      capacity: The most sockets the pool may own at once.
      idle: Disconnected sockets waiting to be reused.
      in_use: Sockets handed out: connecting, or behind an open stream.
      draining: Closed streams whose socket waits for the peer's FIN.
      tasks_waiting: Tasks blocked because ``capacity`` sockets are owned
          (or ``capacity_per_peer`` sockets toward their peer).
      created: ``socket()`` calls made.
      reused: Opens served by an idle socket instead of a new one.
      recycled: Disconnects that put a socket back idle, or straight into
          the hands of a task waiting for the same peer.
      discarded: Sockets closed instead of recycled (failed connects,
          peers that sent no FIN in time, evictions, the pool's exit).
      parked: Live connections released with `RecyclingStream.release`
          and waiting, watched, for an open of the same host and port.
      kept_alive: Opens served by a parked connection: no DNS, no
          ``connect()``.
      not_parked: `RecyclingStream.release` calls that ran the close
          protocol instead of parking (something unread, an EOF, an error,
          an option that cannot be undone, a task waiting, the pool's exit).
    """

    capacity: int
    idle: int
    in_use: int
    draining: int
    tasks_waiting: int
    created: int
    reused: int
    recycled: int
    discarded: int
    parked: int = 0
    kept_alive: int = 0
    not_parked: int = 0


@attrs.frozen
class _Request:
    family: int
    type: int
    proto: int
    local_address: str | None
    key: PoolKey
    peer: object
    origin: OpenKey | None = None


class _Owner(Protocol):
    """What the pool needs from a stream to close it at exit."""

    def _force_close(self) -> None: ...


@final
@attrs.define(eq=False, repr=False)
class SocketPool:
    """A capacity-limited set of sockets that are disconnected and reused.

    Create one with `open_socket_pool`; see there for the options. The pool
    is bound to the ``async with`` block that created it: its background
    drain tasks run in a nursery of that block, and when the block exits
    every socket it owns is closed.
    """

    _capacity: int
    _eof_timeout: float
    _drain_limit: int
    _peer_affinity: bool
    _recycle: bool
    _socket_options: tuple[SocketOption, ...]
    _nursery: trio.Nursery
    _keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY
    _capacity_per_peer: int | None = None
    _store: SocketStore = attrs.field(factory=SocketStore)
    _watch: Watch = attrs.field(init=False)
    #: Socket -> a weak reference to its open stream (None while it
    #: connects). Weak, so that a stream dropped without aclose() can be
    #: garbage-collected and give its place back (see socket_dropped).
    _in_use: dict[PooledSocket, weakref.ref[_Owner] | None] = attrs.field(factory=dict)
    _draining: set[PooledSocket] = attrs.field(factory=set)
    _waiters: dict[trio.lowlevel.Task, _Request] = attrs.field(factory=dict)
    #: Sockets counted against ``capacity_per_peer``, by peer address.
    _per_peer: dict[object, int] = attrs.field(factory=dict)
    _closed: bool = False
    #: The pool's own run: finalizers hand their work to it.
    _token: trio.lowlevel.TrioToken = attrs.field(factory=trio.lowlevel.current_trio_token)
    _created: int = 0
    _reused: int = 0
    _recycled: int = 0
    _discarded: int = 0
    _kept_alive: int = 0
    _not_parked: int = 0

    def __attrs_post_init__(self) -> None:
        self._watch = Watch(self._keepalive_expiry, self._check_parked, self._parked_expired)

    def __repr__(self) -> str:
        # Counts only: the pool can own thousands of sockets.
        state = "closed" if self._closed else "open"
        mode = "recycling" if self._recycle else "not recycling"
        return (
            f"<trio_recycle.SocketPool {state}, {mode}: {self._owned()}/{self._capacity} sockets"
            f" ({len(self._in_use)} in use, {self._store.idle_count} idle, {self._store.parked_count} parked,"
            f" {len(self._draining)} draining),"
            f" {len(self._waiters)} tasks waiting>"
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
        # The pool's exit can come between the winning attempt and here (the
        # happy-eyeballs nursery still had to wind down): then the socket is
        # closed already.
        self._check_open()
        if self._in_use.get(psock, _GONE) is not None:  # pragma: no cover - defensive
            raise trio.ClosedResourceError("the socket was closed while it was connecting")
        psock.open_key = open_key
        kept_alive = psock.handed_live
        if kept_alive:
            psock.handed_live = False
            self._kept_alive += 1
        stream = RecyclingStream(self, psock, psock.sock, kept_alive=kept_alive, token=self._token)
        self._in_use[psock] = weakref.ref(stream)
        return stream

    async def _take_parked(self, open_key: OpenKey) -> RecyclingStream | None:
        """Serve an open with a parked connection of ``open_key``; None: none was alive.

        The liveness check is the watch's: connections past their expiry
        are closed as the watcher would (it may not have run), then one
        poll of the private epoll finds every parked connection with
        bytes, a FIN or an error, and each is handled before anything is
        taken. A connection of this open
        whose peer closed meanwhile is disconnected and connected again to
        the same address here (no DNS), if no live one is left.
        """
        # Before taking anything, as in acquire_socket; after it, nothing
        # below awaits until the stream exists, except a reconnect, whose
        # failure discards the socket like any failed connect.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._watch.expire_due()
        closed_by_peer = self._check_parked(open_key)
        psock = self._store.take_parked(open_key)
        if psock is None:
            if closed_by_peer is None:
                return None
            return await self._reconnect(closed_by_peer, open_key)
        if closed_by_peer is not None:
            self._recycle_or_close(closed_by_peer)
        self._watch.remove(psock)
        self._kept_alive += 1
        stream = RecyclingStream(self, psock, psock.sock, kept_alive=True, token=self._token)
        self._in_use[psock] = weakref.ref(stream)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def _reconnect(self, psock: PooledSocket, open_key: OpenKey) -> RecyclingStream:
        """The peer closed a parked connection first: disconnect it and connect it again."""
        peer = psock.peer
        if not (self._recycle and psock.reset_for_reuse()):
            self._close_psock(psock)
            self._free_slot()
            family, type, proto, _, _ = psock.key
            psock = await self.acquire_socket(family, type, proto, open_key[2], peer)
        else:
            self._recycled += 1
            self._reused += 1
            self._in_use[psock] = None
        try:
            await connect_socket(psock.sock, peer)
        except BaseException as exc:
            self.discard_socket(psock)
            if isinstance(exc, OSError):
                raise all_failed(open_key[0], open_key[1], [(peer, exc)]) from exc
            raise
        self._check_open()
        psock.open_key = open_key
        stream = RecyclingStream(self, psock, psock.sock, token=self._token)
        self._in_use[psock] = weakref.ref(stream)
        return stream

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
        self._check_open()  # as in open_tcp_stream
        if self._in_use.get(psock, _GONE) is not None:  # pragma: no cover - defensive
            raise trio.ClosedResourceError("the socket was closed while it was connecting")
        udp = RecyclingUDPSocket(self, psock, psock.sock, token=self._token)
        self._in_use[psock] = weakref.ref(udp)
        return udp

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
        store = self._store
        return PoolStatistics(
            capacity=self._capacity,
            idle=store.idle_count,
            in_use=len(self._in_use),
            draining=len(self._draining),
            tasks_waiting=len(self._waiters),
            created=self._created,
            reused=self._reused,
            recycled=self._recycled,
            discarded=self._discarded,
            parked=store.parked_count,
            kept_alive=self._kept_alive,
            not_parked=self._not_parked,
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
    # Taking sockets (SocketSource protocol of _connect)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(
                "this SocketPool is closed: the `async with open_socket_pool()` block has exited"
            )

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
        its live connection over directly (``handed_live`` is then set).

        ``replacing``: a socket of the same open still connecting (happy
        eyeballs). If this call would have to wait and that socket's SYN is
        still unanswered (SYN_SENT), the new socket takes its place and it
        is closed: the open keeps the capacity it holds, and overtakes
        nobody; unless this call's peer is at ``capacity_per_peer``, which
        then waits like any other. A connect that has already finished, either way, is left
        alone: its task is about to win or to free its place.
        """
        self._check_open()
        # Before taking anything: a task cancelled on entry must not take an
        # idle socket only to close it in its error path.
        await trio.lowlevel.checkpoint_if_cancelled()
        key = (family, type, proto, local_address, peer if self._peer_affinity else None)
        if (
            replacing is not None
            and self._in_use.get(replacing, _GONE) is None
            # Only when this call would wait: behind a waiter that can be
            # served, or at a full pool with nothing to evict. Waiters
            # held back by their own peer's limit hold nobody else up.
            and ((self._waiters and self._someone_servable()) or (self._owned() >= self._capacity and not self._store))
            # The place taken over counts for the sibling's peer, the new
            # socket for this one: never past this peer's capacity_per_peer.
            and not (self._peer_full(peer) and replacing.counted_peer != peer)
            and _still_in_syn_sent(replacing.sock)
        ):
            return self._take_over(replacing, _Request(family, type, proto, local_address, key, peer, origin))
        limited = self._capacity_per_peer is not None
        if not self._waiters or not self._someone_servable():
            if limited and self._peer_full(peer):
                # A parked connection to the same peer (of another host
                # name, say) makes room, as an idle socket does below.
                victim = self._store.oldest_parked_for(peer)
                if victim is not None:
                    self._evict(victim)
                    self._serve_waiters()
            if not (limited and self._peer_full(peer)):
                psock = self._store.take_idle(key)
                if psock is not None:
                    self._reused += 1
                    self._give(psock, peer)
                    return psock
                if self._owned() >= self._capacity:
                    victim = self._store.oldest()
                    if victim is not None:
                        self._evict(victim)
                        self._serve_waiters()
                if self._owned() < self._capacity:
                    psock = self._create(_Request(family, type, proto, local_address, key, peer, origin))
                    self._give(psock, peer)
                    return psock
        request = _Request(family, type, proto, local_address, key, peer, origin)
        task = trio.lowlevel.current_task()
        self._waiters[task] = request

        def abort(_: object) -> trio.lowlevel.Abort:
            # Only a task still queued can be here: _hand_off and _close
            # reschedule every task they take off the queue.
            self._waiters.pop(task, None)
            return trio.lowlevel.Abort.SUCCEEDED

        psock = await trio.lowlevel.wait_task_rescheduled(abort)
        assert isinstance(psock, PooledSocket)
        # Granted, then the pool closed before this task ran: the socket
        # is gone with the pool.
        self._check_open()
        return psock

    def _take_over(self, replacing: PooledSocket, request: _Request) -> PooledSocket:
        """Close a sibling attempt still in SYN_SENT and give its place to a new socket."""
        # Create first: if that fails, the sibling keeps connecting.
        # Nothing here awaits, so the moment with one socket too many is
        # never seen at a checkpoint (I4).
        try:
            taking_over = self._create(request)
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            taking_over = None
        del self._in_use[replacing]
        trio.lowlevel.notify_closing(replacing.sock)
        self._close_psock(replacing)
        if taking_over is None:
            # At RLIMIT_NOFILE the sibling's descriptor is the one we need.
            try:
                taking_over = self._create(request)
            except BaseException:
                self._free_slot()
                raise
        self._give(taking_over, request.peer)
        return taking_over

    def discard_socket(self, psock: PooledSocket) -> None:
        """Close a socket that was taken but never became an open stream."""
        if self._in_use.pop(psock, _GONE) is _GONE:
            return
        self._close_psock(psock)
        self._free_slot()

    def _give(self, psock: PooledSocket, peer: object) -> None:
        """Hand ``psock`` out for a connection to ``peer``: in use from now on."""
        psock.peer = peer
        if self._capacity_per_peer is not None:
            self._count(psock, peer)
        self._in_use[psock] = None

    def _count(self, psock: PooledSocket, peer: object) -> None:
        psock.counted_peer = peer
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1

    def _uncount(self, psock: PooledSocket) -> None:
        peer = psock.counted_peer
        if peer is not None:
            psock.counted_peer = None
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    def _peer_full(self, peer: object) -> bool:
        limit = self._capacity_per_peer
        return limit is not None and self._per_peer.get(peer, 0) >= limit

    def _someone_servable(self) -> bool:
        """Whether a waiter's peer is below its limit (every waiter is, without one)."""
        if self._capacity_per_peer is None:
            return True
        return any(not self._peer_full(request.peer) for request in self._waiters.values())

    # ------------------------------------------------------------------
    # Giving sockets back (the Home protocol of _socket_access)

    def return_socket(self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool) -> None:
        """A stream was closed: recycle, drain or close its socket."""
        if self._in_use.pop(psock, _GONE) is _GONE:
            return  # pragma: no cover - defensive: the pool's exit force-closes the stream first
        self._close_protocol(psock, eof_seen=eof_seen, eof_sent=eof_sent, healthy=healthy)

    def release_socket(
        self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool, parkable: bool
    ) -> None:
        """A stream was released: park the live connection if it is clean, else as `return_socket`.

        ``parkable`` False: the stream knows the connection is not clean
        (a send cut short, another task inside the stream).
        """
        if self._in_use.pop(psock, _GONE) is _GONE:
            return  # pragma: no cover - defensive: the pool's exit force-closes the stream first
        if (
            parkable
            and healthy
            and not (eof_seen or eof_sent or self._closed)
            and psock.open_key is not None
            and psock.restore_options()
        ):
            kept = self._keep(psock)
            if kept == "kept":
                return
            if kept == "found unclean":
                self._not_parked += 1
                return
        self._not_parked += 1
        self._close_protocol(psock, eof_seen=eof_seen, eof_sent=eof_sent, healthy=healthy)

    def _keep(self, psock: PooledSocket) -> Literal["kept", "refused", "found unclean"]:
        """A live connection: to a task waiting for the same open, else parked.

        Returns:
          "kept" (handed over or parked), "refused" (the caller runs the
          close protocol) or "found unclean" (parked, but the watch found
          bytes, the peer's FIN or an error at once and handled it).
        """
        if self._waiters:
            # Its own place does not count against its peer while the first
            # waiter that could be served is chosen.
            peer = psock.counted_peer
            self._uncount(psock)
            task = self._next_waiter()
            if task is not None:
                request = self._waiters[task]
                if request.origin == psock.open_key and request.peer == psock.peer and _nothing_queued(psock.sock):
                    del self._waiters[task]
                    psock.handed_live = True
                    self._give(psock, psock.peer)
                    trio.lowlevel.reschedule(task, outcome.Value(psock))
                    return "kept"
            if peer is not None:
                self._count(psock, peer)
            if task is not None:
                # No parking while a task that the room could serve waits:
                # the close protocol frees the room.
                return "refused"
        try:
            self._watch.add(psock, self._nursery)
        except OSError:  # pragma: no cover - epoll_ctl fails only out of kernel memory or past max_user_watches
            return "refused"
        assert psock.open_key is not None
        self._store.park(psock, psock.open_key)
        # The check for anything unread: the answer may have had more bytes
        # than the caller read, or the peer may have closed already. Either
        # way the connection is not the clean one the next owner expects,
        # and the watch's handling closes or recycles it.
        self._check_parked(None)
        return "kept" if self._store.is_parked(psock) else "found unclean"

    def _check_parked(self, key: OpenKey | None = None) -> PooledSocket | None:
        """Handle every parked connection the watch finds ready: the peer's FIN, bytes or an error.

        Returns:
          With a ``key``: one connection of that key whose peer closed, not
          yet disconnected, for the caller to reconnect; else None.
        """
        closed_by_peer = None
        for psock in self._watch.ready():
            self._store.remove(psock)
            try:
                peeked = psock.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:  # pragma: no cover - level-triggered: something was there
                self._watch.add(psock, self._nursery)
                self._store.park(psock, psock.open_key)  # type: ignore[arg-type]
                continue
            except OSError:
                self._close_psock(psock)
                self._free_slot()
                continue
            if peeked:
                # Unsolicited bytes (I9): discarded with the connection,
                # never handed out. The close protocol may still recycle
                # it, if the peer's FIN follows them.
                self._close_protocol(psock, eof_seen=False, eof_sent=False, healthy=True)
            elif key is not None and closed_by_peer is None and psock.open_key == key:
                closed_by_peer = psock
            else:
                # The peer closed first: disconnecting now leaves no
                # TIME_WAIT anywhere and frees the peer's state at once.
                self._recycle_or_close(psock)
        return closed_by_peer

    def _parked_expired(self, psock: PooledSocket) -> None:
        """A connection stayed parked for keepalive_expiry: close it politely (our FIN, then the drain)."""
        self._store.remove(psock)
        self._close_protocol(psock, eof_seen=False, eof_sent=False, healthy=True)

    def _evict(self, psock: PooledSocket) -> None:
        """Close an idle socket or a parked connection to make room for an open."""
        if self._store.remove(psock):
            # A parked connection is closed at once, not drained: the room
            # is needed now. What arrived since the watch last looked is
            # read and discarded first: close() with unread bytes would
            # reset the peer (I7); with none it sends our FIN and the kernel
            # finishes the connection. TIME_WAIT stays with us, as after
            # any close we start.
            self._watch.remove(psock)
            _discard_queued(psock.sock, self._drain_limit)
        self._close_psock(psock)

    def _close_protocol(self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool) -> None:
        """Recycle, drain or close a socket that belongs to no place any more."""
        if not (self._recycle and healthy) or psock.tainted:
            self._close_psock(psock)
            self._free_slot()
            return
        received = 0
        send_fin = False
        if not eof_seen:
            # The peer's FIN may be here already, unread: look before sending
            # ours. A FIN of ours would move a peer that has closed from
            # FIN_WAIT2 to TIME_WAIT, which recycling exists to avoid. Ours
            # goes out from the drain, after a grace for the peer's (_drain.py).
            try:
                eof_seen, received = read_available(psock.sock, self._drain_limit)
                send_fin = not eof_seen and not eof_sent
            except OSError:
                received = self._drain_limit + 1
        if eof_seen and not fin_unacknowledged(psock.sock):
            self._recycle_or_close(psock)
        elif received > self._drain_limit:
            self._close_psock(psock)
            self._free_slot()
        else:
            # Also with the peer's FIN in but ours unacknowledged: the drain
            # waits for the ACK before the disconnect (_drain.py).
            self._draining.add(psock)
            self._nursery.start_soon(self._drain, psock, received, eof_seen, send_fin)

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
        if self._in_use.pop(psock, _GONE) is _GONE:
            return  # the pool's exit came first, or it was released
        trio.lowlevel.notify_closing(psock.sock)
        self._close_psock(psock)
        self._free_slot()

    async def _drain(self, psock: PooledSocket, received: int, eof_seen: bool, send_fin: bool) -> None:
        fin = False
        try:
            with trio.move_on_after(self._eof_timeout):
                fin = await finish_drain(psock.sock, received, self._drain_limit, eof_seen=eof_seen, send_fin=send_fin)
        except OSError:
            pass
        finally:
            # Also on Cancelled (the pool's exit): then fin is False.
            self._draining.discard(psock)
            if fin:
                self._recycle_or_close(psock)
            else:
                self._close_psock(psock)
                self._free_slot()

    def _recycle_or_close(self, psock: PooledSocket) -> None:
        # A drain can see the peer's FIN in the same scheduler round as the
        # pool's exit, after _close() ran: then there is no idle to go to.
        if self._recycle and not self._closed and psock.reset_for_reuse():
            self._put_idle(psock)
        else:
            self._close_psock(psock)
            self._free_slot()

    # ------------------------------------------------------------------
    # Internals

    def _owned(self) -> int:
        return len(self._store) + len(self._in_use) + len(self._draining)

    def _create(self, request: _Request) -> PooledSocket:
        options = self._socket_options
        if request.type == socket.SOCK_STREAM:
            options = _TCP_DEFAULTS + options
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
        self._created += 1
        return psock

    def _put_idle(self, psock: PooledSocket) -> None:
        """A disconnected socket: to the first waiter who can use it, else idle."""
        if psock.counted_peer is not None:
            self._uncount(psock)
        psock.peer = psock.open_key = None
        if self._waiters and self._hand_off(psock):
            return
        self._recycled += 1
        self._store.put_idle(psock)

    def _close_psock(self, psock: PooledSocket) -> None:
        if psock.counted_peer is not None:
            self._uncount(psock)
        psock.close()
        self._discarded += 1

    def _free_slot(self) -> None:
        if self._waiters and not self._closed:
            self._hand_off(None)

    def _serve_waiters(self) -> None:
        """After an eviction: serve the waiters it made servable (their peer was at its limit) first.

        Only with ``capacity_per_peer``: without it a waiter is always
        servable, and an arriving task evicts only when nobody waits.
        """
        while self._waiters and self._next_waiter() is not None:
            if self._owned() >= self._capacity:
                victim = self._store.oldest()
                if victim is None:
                    return
                self._evict(victim)
            self._hand_off(None)

    def _next_waiter(self) -> trio.lowlevel.Task | None:
        """The first waiter whose peer is below ``capacity_per_peer`` (the first, without a limit)."""
        if self._capacity_per_peer is None:
            return next(iter(self._waiters), None)
        for task, request in self._waiters.items():
            if not self._peer_full(request.peer):
                return task
        return None

    def _hand_off(self, psock: PooledSocket | None) -> bool:
        """Give a recycled socket, or a freed slot, to the first waiter that can be served.

        Returns:
          Whether ``psock`` was used up (given, or closed to make room); when
          False the caller keeps it.
        """
        while (task := self._next_waiter()) is not None:
            request = self._waiters.pop(task)
            if psock is not None and psock.key == request.key:
                self._recycled += 1
                self._reused += 1
                self._give(psock, request.peer)
                trio.lowlevel.reschedule(task, outcome.Value(psock))
                return True
            if psock is not None:
                self._close_psock(psock)
                psock = None
            try:
                new = self._create(request)
            except Exception as exc:
                # The waiter's own failure (its local_address, the
                # descriptors running out): it goes to that task alone, not
                # to whoever freed the slot (an aclose(), a drain task).
                trio.lowlevel.reschedule(task, outcome.Error(exc))
                continue  # the slot is still free: next waiter
            self._give(new, request.peer)
            trio.lowlevel.reschedule(task, outcome.Value(new))
            return True
        return psock is None

    def _close(self) -> None:
        """The pool's block exited: close everything, fail every waiter."""
        if self._closed:
            return  # pragma: no cover - defensive: open_socket_pool's exit calls this once
        self._closed = True
        for task in list(self._waiters):
            del self._waiters[task]
            # One exception object per task: a shared one would collect
            # every task's traceback.
            error = trio.ClosedResourceError(
                "this SocketPool is closed: the `async with open_socket_pool()` block has exited"
            )
            trio.lowlevel.reschedule(task, outcome.Error(error))
        for psock, ref in list(self._in_use.items()):
            owner = ref() if ref is not None else None
            if owner is not None:
                owner._force_close()
            trio.lowlevel.notify_closing(psock.sock)
            self._close_psock(psock)
        self._in_use.clear()
        # The watch first: its epoll must not hold descriptors being closed.
        self._watch.close()
        for psock in self._store.clear():
            if psock.open_key is not None:  # parked: as in _evict
                _discard_queued(psock.sock, self._drain_limit)
            self._close_psock(psock)
        self._nursery.cancel_scope.cancel()


_GONE: Final = object()
#: socket() errors that closing one of our own descriptors can cure.
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
_C_INT_MIN: Final = -(2**31)
_C_INT_MAX: Final = 2**31 - 1
_TCP_SYN_SENT: Final = 2  # include/net/tcp_states.h


def _discard_queued(sock: socket.socket, limit: int) -> None:
    """Read and drop what a connected socket has queued (up to about ``limit`` bytes) before a close."""
    with contextlib.suppress(OSError):
        read_available(sock, limit)


def _nothing_queued(sock: socket.socket) -> bool:
    """Whether a connected socket has nothing to read: no bytes, no FIN, no error."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _still_in_syn_sent(sock: socket.socket) -> bool:
    """Whether a connecting TCP socket's SYN is still unanswered."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_SYN_SENT
    except OSError:  # pragma: no cover - defensive: TCP_INFO of an open TCP socket does not fail
        return False


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
    peer_affinity: bool = True,
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
      peer_affinity: When True (the default), an idle socket is reconnected
          only to the address it last talked to. A reconnected socket's
          initial sequence number follows from the previous connection's,
          so the previous peer could predict it; set False only when every
          peer is trusted alike.
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
    if not isinstance(peer_affinity, bool):
        raise TypeError(f"peer_affinity must be a bool, not {peer_affinity!r}")
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
        pool = SocketPool(
            capacity,
            float(eof_timeout),
            drain_limit,
            peer_affinity,
            recycle and can_recycle(),
            options,
            nursery,
            float(keepalive_expiry),
            capacity_per_peer,
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
