"""Watch: one task per pool watching every parked connection through a private epoll; the one-socket check."""

# A parked connection must be noticed when its peer closes (FIN), sends
# something unasked, or breaks, and when it has been parked longer than
# keepalive_expiry. A task per parked connection blocked in wait_readable
# would do it, but starting and cancelling a task per park costs more than
# the rest of an exchange (measured at 34-62 us per exchange). Instead:
#
# * The store owns one private `select.epoll` object, created at the first
#   park. Parking registers the connection's descriptor there (EPOLLIN |
#   EPOLLRDHUP | EPOLLPRI, level-triggered), taking it unregisters it: one epoll_ctl
#   system call each, synchronous, no await, so nothing can come between
#   taking a connection and the end of its watch.
# * One watcher task waits with trio.lowlevel.wait_readable on the private
#   epoll's own descriptor, which is readable while any registered socket
#   has an event. Woken, it asks the private epoll what is ready with
#   poll(0) and tells the pool, which asks the store what is ready.
# * Woken, the watcher polls again while a call comes back full: one
#   epoll_wait returns at most `maxevents` events (CPython's default is
#   FD_SETSIZE - 1 = 1023), and every ready connection must be found,
#   whatever the number parked. The cost grows with the number ready (each
#   of which must be handled anyway), not with the number parked.
# * The liveness check at release and at a take is not this poll: it looks
#   at the one connection concerned (PooledSocket.pending, one poll(0) of
#   that descriptor alone), whatever the others hold.
# * Urgent data (TCP MSG_OOB) is reported only as EPOLLPRI: neither
#   EPOLLIN nor recv(MSG_PEEK) sees a lone urgent byte, and an owner that
#   sets SO_OOBINLINE would read it. It counts as unsolicited bytes.
# * No trio task ever waits on a parked socket itself, so trio's rule that
#   only one task may wait on a descriptor (BusyResourceError) is never at
#   stake: the next owner's first wait_readable is the only one.
# * Expiry: keepalive_expiry is the same for every connection, so park
#   order is deadline order. The watcher waits under a CancelScope whose
#   deadline is the oldest connection's; parking into an empty watch lowers
#   that deadline from outside (CancelScope.deadline is settable). A
#   connection taken before its deadline leaves the scope's deadline
#   early, which only costs one spurious wake-up.
#
# https://man7.org/linux/man-pages/man7/epoll.7.html ("Can an epoll file
# descriptor itself be polled/epoll_waited/selected? Yes.")

from __future__ import annotations

import math
import select
from collections import OrderedDict
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._pooled_socket import PooledSocket

__all__ = ["URGENT", "Watch"]

_EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLPRI
#: Events that mean bytes the peer sent unasked, however the peek reads.
URGENT: Final = select.EPOLLPRI
#: The most events one epoll.poll() returns when maxevents is not given.
_MAX_EVENTS: Final = 1023


@final
@attrs.define(eq=False)
class Watch:
    """The parked connections' watch, owned by the SocketStore; the pool decides what an event means.

    ``on_wake()`` is called when some watched connection has something to
    read (FIN, data, urgent data) or an error, or when the oldest one's
    ``expiry`` has passed: the pool then asks for `expired` and `ready`.
    """

    expiry: float
    _on_wake: Callable[[], object]
    _epoll: select.epoll | None = None
    _by_fd: dict[int, PooledSocket] = attrs.field(factory=dict)
    #: Every watched connection and its deadline, in park (= deadline) order;
    #: ordered so that the oldest is found in O(1) (_store.py says why).
    _deadlines: OrderedDict[PooledSocket, float] = attrs.field(factory=OrderedDict)
    _scope: trio.CancelScope | None = None
    _closed: bool = False

    def __contains__(self, psock: PooledSocket) -> bool:
        return psock in self._deadlines

    def add(self, psock: PooledSocket, nursery: trio.Nursery) -> None:
        """Start watching a parked connection (the watcher task starts with the first).

        Raises:
          OSError: from epoll_ctl (for example ENOMEM); nothing was changed.
        """
        epoll = self._epoll
        if epoll is None:
            epoll = self._epoll = select.epoll()
            nursery.start_soon(self._run, name="trio_recycle keep-alive watch")
        fd = psock.sock.fileno()
        epoll.register(fd, _EVENTS)
        self._by_fd[fd] = psock
        deadline = trio.current_time() + self.expiry
        scope = self._scope
        # Only when the watcher sleeps with no deadline at all: a deadline it
        # already has is earlier than this one (expiry is constant), and a
        # wake-up for a connection taken since then only costs a spurious
        # round. Setting a CancelScope's deadline is the dearest step here.
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        self._deadlines[psock] = deadline

    def remove(self, psock: PooledSocket) -> float:
        """Stop watching ``psock`` (synchronously); return its deadline."""
        deadline = self._deadlines.pop(psock)
        fd = psock.sock.fileno()
        del self._by_fd[fd]
        assert self._epoll is not None
        self._epoll.unregister(fd)
        return deadline

    async def _run(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        deadlines = self._deadlines
        while not self._closed:
            deadline = next(iter(deadlines.values()), math.inf)
            with trio.CancelScope(deadline=deadline) as self._scope:
                try:
                    await trio.lowlevel.wait_readable(epoll)
                except trio.ClosedResourceError:
                    return  # close(): the pool's exit
            self._scope = None
            if self.closed:
                return  # woken, then the pool's exit ran before this task did
            self._on_wake()

    def expired(self) -> list[PooledSocket]:
        """The connections parked longer than ``expiry``, no longer watched (no await).

        The watcher's wake-up asks, and so does a take first: a run that
        went that long without a checkpoint never let the watcher run, and a
        connection past its expiry is the one whose server may be closing
        it right now.
        """
        deadlines = self._deadlines
        if not deadlines:
            return []
        now = trio.current_time()
        found = []
        while deadlines:
            psock, deadline = next(iter(deadlines.items()))
            if deadline > now:
                break
            self.remove(psock)
            found.append(psock)
        return found

    def ready(self) -> list[tuple[PooledSocket, int]]:
        """The watched connections with something to read or an error, with their events, unwatched (no await)."""
        epoll = self._epoll
        if epoll is None or not self._deadlines:
            return []
        found = []
        while True:
            events = epoll.poll(0)
            for fd, mask in events:
                psock = self._by_fd[fd]
                self.remove(psock)
                found.append((psock, mask))
            if len(events) < _MAX_EVENTS:
                return found

    @property
    def closed(self) -> bool:
        """Whether `close` was called (the pool's exit)."""
        return self._closed

    def close(self) -> None:
        """Forget every connection and close the epoll (the pool's exit closes the sockets)."""
        self._closed = True
        self._deadlines.clear()
        self._by_fd.clear()
        if self._epoll is not None:
            # Wakes the watcher with ClosedResourceError and drops the
            # descriptor from trio's epoll before it is closed.
            trio.lowlevel.notify_closing(self._epoll)
            self._epoll.close()
