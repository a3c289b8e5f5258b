"""SocketPool and open_socket_pool: capacity, idle sockets, the drain nursery, statistics."""

# Bookkeeping. Every descriptor the pool owns is in exactly one of three
# places: `_idle` (disconnected, waiting), `_in_use` (handed to a caller,
# connecting or wrapped in a stream), `_draining` (a background task waits
# for the peer's FIN). Their sizes add up to the descriptors open, which is
# at most `capacity` (invariant I4). `created - discarded` equals the same
# sum at every checkpoint.
#
# Waiting is FIFO and hand-off is direct, like trio.CapacityLimiter: a task
# that finds the pool full parks in `_waiters`; whoever frees a socket or a
# slot gives it straight to the first waiter (re-created for the waiter's
# peer if it does not match) before anybody else can take it. So a task
# arriving later can never overtake one that is waiting, and while anyone
# waits there is nothing idle: an arriving task that finds the pool full but
# some socket idle (for another peer) closes the least recently used idle
# socket and takes its place instead of waiting.
#
# Failures while a waiter's socket is made (socket(), setsockopt(), bind(),
# whatever they raise) belong to that waiter: _hand_off gives the error to
# its task and offers the slot to the next waiter, so the aclose() or the
# drain task that freed the slot never sees it. Out of descriptors
# (EMFILE/ENFILE), _create first evicts the least recently used idle socket
# and retries once. If socket() still fails, every queued waiter gets the
# error at once: the limit is the process's, the pool gets no event when
# some other part of the program frees a descriptor, and a waiter left
# queued in front of a free slot would block everyone behind it with no
# bound. Failing fast is what trio.open_tcp_stream does in the same spot.

from __future__ import annotations

import contextlib
import errno
import math
import socket
import weakref
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import outcome
import trio

from ._connect import connect_pooled, connect_udp, validate_delay, validate_endpoint, validate_local_address
from ._disconnect import can_recycle
from ._drain import read_available, wait_for_fin
from ._errors import check_run, wrong_run_error
from ._pooled_socket import PooledSocket, PoolKey, SocketOption
from ._stream import RecyclingStream
from ._udp import RecyclingUDPSocket

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

__all__ = ["PoolStatistics", "SocketPool", "open_socket_pool"]

# The pool's methods check first that they run in the pool's own trio.run
# (issue 9; _stream.py says why).
_current_trio_token: Final = trio.lowlevel.current_trio_token

#: Default for ``open_socket_pool(capacity=...)``.
DEFAULT_CAPACITY: Final = 64
#: Default for ``open_socket_pool(eof_timeout=...)``, in seconds.
DEFAULT_EOF_TIMEOUT: Final = 5.0
#: Default for ``open_socket_pool(drain_limit=...)``, in bytes.
DEFAULT_DRAIN_LIMIT: Final = 65536


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

    The first five fields are the state now; the last four are counts over
    the pool's life.

    Attributes:
      capacity: The most sockets the pool may own at once.
      idle: Disconnected sockets waiting to be reused.
      in_use: Sockets handed out: connecting, or behind an open stream.
      draining: Closed streams whose socket waits for the peer's FIN.
      tasks_waiting: Tasks blocked because ``capacity`` sockets are owned.
      created: ``socket()`` calls made.
      reused: Opens served by an idle socket instead of a new one.
      recycled: Disconnects that put a socket back idle, or straight into
          the hands of a task waiting for the same peer.
      discarded: Sockets closed instead of recycled (failed connects,
          peers that sent no FIN in time, evictions, the pool's exit).
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


@attrs.frozen
class _Request:
    family: int
    type: int
    proto: int
    local_address: str | None
    key: PoolKey


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
    _idle: dict[PoolKey, list[PooledSocket]] = attrs.field(factory=dict)
    _idle_lru: dict[PooledSocket, None] = attrs.field(factory=dict)
    #: Socket -> a weak reference to its open stream (None while it
    #: connects). Weak, so that a stream dropped without aclose() can be
    #: garbage-collected and give its place back (see socket_dropped).
    _in_use: dict[PooledSocket, weakref.ref[_Owner] | None] = attrs.field(factory=dict)
    _draining: set[PooledSocket] = attrs.field(factory=set)
    _waiters: dict[trio.lowlevel.Task, _Request] = attrs.field(factory=dict)
    _closed: bool = False
    #: The pool's own run: finalizers hand their work to it.
    _token: trio.lowlevel.TrioToken = attrs.field(factory=trio.lowlevel.current_trio_token)
    _created: int = 0
    _reused: int = 0
    _recycled: int = 0
    _discarded: int = 0

    def __repr__(self) -> str:
        # Counts only: the pool can own thousands of sockets.
        state = "closed" if self._closed else "open"
        mode = "recycling" if self._recycle else "not recycling"
        return (
            f"<trio_recycle.SocketPool {state}, {mode}: {self._owned()}/{self._capacity} sockets"
            f" ({len(self._in_use)} in use, {len(self._idle_lru)} idle, {len(self._draining)} draining),"
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
          to give the socket back.

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
        try:
            self._check_open()
            psock = await connect_pooled(
                self,
                host,
                port,
                happy_eyeballs_delay=happy_eyeballs_delay,
                local_address=local_address,
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
          PoolStatistics: the state now (idle, in use, draining, waiting)
          and the counts over the pool's life.

        Raises:
          RuntimeError: called from a trio.run other than the pool's (from
              no run at all, for example after it, is fine).
        """
        check_run(self._token, "SocketPool")
        return PoolStatistics(
            capacity=self._capacity,
            idle=len(self._idle_lru),
            in_use=len(self._in_use),
            draining=len(self._draining),
            tasks_waiting=len(self._waiters),
            created=self._created,
            reused=self._reused,
            recycled=self._recycled,
            discarded=self._discarded,
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
    ) -> PooledSocket:
        """Take an idle socket for ``peer`` or a new one, waiting for capacity.

        ``replacing``: a socket of the same open still connecting (happy
        eyeballs). If this call would have to wait and that socket's SYN is
        still unanswered (SYN_SENT), the new socket takes its place and it
        is closed: the open keeps the capacity it holds, and overtakes
        nobody. A connect that has already finished, either way, is left
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
            and (self._waiters or (self._owned() >= self._capacity and not self._idle_lru))
            and _still_in_syn_sent(replacing.sock)
        ):
            return self._take_over(replacing, _Request(family, type, proto, local_address, key))
        if not self._waiters:
            psock = self._take_idle(key)
            if psock is not None:
                self._reused += 1
                self._in_use[psock] = None
                return psock
            if self._owned() >= self._capacity and self._idle_lru:
                self._discard(next(iter(self._idle_lru)))
            if self._owned() < self._capacity:
                psock = self._create(_Request(family, type, proto, local_address, key))
                self._in_use[psock] = None
                return psock
        request = _Request(family, type, proto, local_address, key)
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
        self._in_use[taking_over] = None
        return taking_over

    def discard_socket(self, psock: PooledSocket) -> None:
        """Close a socket that was taken but never became an open stream."""
        if self._in_use.pop(psock, _GONE) is _GONE:
            return
        self._close_psock(psock)
        self._free_slot()

    # ------------------------------------------------------------------
    # Giving sockets back (the Home protocol of _socket_access)

    def return_socket(self, psock: PooledSocket, *, eof_seen: bool, eof_sent: bool, healthy: bool) -> None:
        """A stream was closed: recycle, drain or close its socket."""
        if self._in_use.pop(psock, _GONE) is _GONE:
            return  # the pool's exit closed it already
        if not (self._recycle and healthy) or psock.tainted:
            self._close_psock(psock)
            self._free_slot()
            return
        received = 0
        if not eof_seen:
            # The peer's FIN may be here already, unread: look before sending
            # ours. A FIN of ours would move a peer that has closed from
            # FIN_WAIT2 to TIME_WAIT, which recycling exists to avoid.
            try:
                eof_seen, received = read_available(psock.sock, self._drain_limit)
                if not eof_seen and received <= self._drain_limit and not eof_sent:
                    psock.sock.shutdown(socket.SHUT_WR)
            except OSError:
                received = self._drain_limit + 1
        if eof_seen:
            self._recycle_or_close(psock)
        elif received > self._drain_limit:
            self._close_psock(psock)
            self._free_slot()
        else:
            self._draining.add(psock)
            self._nursery.start_soon(self._drain, psock, received)

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
            return  # the pool's exit came first
        trio.lowlevel.notify_closing(psock.sock)
        self._close_psock(psock)
        self._free_slot()

    async def _drain(self, psock: PooledSocket, received: int) -> None:
        fin = False
        try:
            with trio.move_on_after(self._eof_timeout):
                fin = await wait_for_fin(psock.sock, received, self._drain_limit)
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
        if not self._closed and psock.reset_for_reuse():
            self._put_idle(psock)
        else:
            self._close_psock(psock)
            self._free_slot()

    # ------------------------------------------------------------------
    # Internals

    def _owned(self) -> int:
        return len(self._idle_lru) + len(self._in_use) + len(self._draining)

    def _create(self, request: _Request) -> PooledSocket:
        options = self._socket_options
        if request.type == socket.SOCK_STREAM:
            options = _TCP_DEFAULTS + options
        args = (request.family, request.type, request.proto, request.local_address, options, request.key)
        try:
            psock = PooledSocket.create(*args)
        except OSError as exc:
            # Out of descriptors while sockets sit idle for other peers:
            # evict the least recently used, as at capacity, and retry once.
            if exc.errno not in _OUT_OF_DESCRIPTORS or not self._idle_lru:
                raise
            self._discard(next(iter(self._idle_lru)))
            psock = PooledSocket.create(*args)
        self._created += 1
        return psock

    def _take_idle(self, key: PoolKey) -> PooledSocket | None:
        stack = self._idle.get(key)
        if not stack:
            return None
        psock = stack.pop()
        if not stack:
            del self._idle[key]
        del self._idle_lru[psock]
        return psock

    def _put_idle(self, psock: PooledSocket) -> None:
        if self._waiters:
            self._hand_off(psock)
        else:
            self._recycled += 1
            self._idle.setdefault(psock.key, []).append(psock)
            self._idle_lru[psock] = None

    def _discard(self, psock: PooledSocket) -> None:
        """Close an idle socket (eviction)."""
        stack = self._idle[psock.key]
        stack.remove(psock)
        if not stack:
            del self._idle[psock.key]
        del self._idle_lru[psock]
        self._close_psock(psock)

    def _close_psock(self, psock: PooledSocket) -> None:
        psock.close()
        self._discarded += 1

    def _free_slot(self) -> None:
        if self._waiters and not self._closed:
            self._hand_off(None)

    def _hand_off(self, psock: PooledSocket | None) -> None:
        """Give a recycled socket, or a freed slot, to the first waiter."""
        while self._waiters:
            task = next(iter(self._waiters))
            request = self._waiters.pop(task)
            if psock is not None and psock.key == request.key:
                self._recycled += 1
                self._reused += 1
                self._in_use[psock] = None
                trio.lowlevel.reschedule(task, outcome.Value(psock))
                return
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
            self._in_use[new] = None
            trio.lowlevel.reschedule(task, outcome.Value(new))
            return
        if psock is not None:  # pragma: no cover - defensive: callers hand off only while somebody waits
            self._put_idle(psock)

    def _close(self) -> None:
        """The pool's block exited: close everything, fail every waiter."""
        if self._closed:
            return
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
        for psock in list(self._idle_lru):
            self._close_psock(psock)
        self._idle.clear()
        self._idle_lru.clear()
        self._nursery.cancel_scope.cancel()


_GONE: Final = object()
#: socket() errors that closing one of our own descriptors can cure.
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
_C_INT_MIN: Final = -(2**31)
_C_INT_MAX: Final = 2**31 - 1
_TCP_SYN_SENT: Final = 2  # include/net/tcp_states.h


def _still_in_syn_sent(sock: socket.socket) -> bool:
    """Whether a connecting TCP socket's SYN is still unanswered."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_SYN_SENT
    except OSError:
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

    Yields:
      SocketPool: the open pool.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: ``capacity`` < 1, a negative or NaN ``eof_timeout`` or
          ``drain_limit``, or a ``socket_options`` int that does not fit a
          C int.
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
