"""KeepAlive: released live connections, parked or handed over, and what the watch's events mean for them."""

# A stream's `release` gives back a live connection. It goes straight to a
# task waiting for the same open (host, port, local_address) when there is
# one and the connection is quiet; otherwise, while another task that the
# room could serve waits, it is not parked (the close protocol frees its
# place); otherwise it is parked in the store, which watches it.
#
# The liveness check is one poll of the watch's epoll (_watch.py) over every
# parked connection, at release and before every take, and each connection
# it finds is ended there and then, as the watcher would:
#
#   urgent byte or bytes  unsolicited (I9): never handed out; the close
#                         protocol discards them (and recycles if a FIN follows)
#   FIN                   the peer closed first: disconnect now, no TIME_WAIT
#                         anywhere (or, for the open taking it, reconnect)
#   error                 close
#   expired               parked for keepalive_expiry: ended by the disconnect
#                         when nothing is in flight (no TIME_WAIT anywhere),
#                         else our FIN, then the drain

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from ._close import StreamEnd
from ._connect import all_failed, connect_socket
from ._in_flight import quiet
from ._lifecycle import State
from ._watch import URGENT

if TYPE_CHECKING:
    from ._capacity import Capacity
    from ._pooled_socket import OpenKey, PooledSocket

__all__ = ["KeepAlive"]

#: How a parked connection that received bytes unasked ends: the close
#: protocol of a healthy stream that saw no EOF.
QUIET_END: Final = StreamEnd(eof_seen=False, eof_sent=False, healthy=True)
#: How one that expired ends: idle, so with nothing in flight the
#: disconnect itself ends it (no TIME_WAIT on either side); otherwise as
#: QUIET_END. Without reset_idle, as QUIET_END.
IDLE_END: Final = StreamEnd(eof_seen=False, eof_sent=False, healthy=True, idle=True)


@final
@attrs.define(eq=False)
class KeepAlive:
    """Parking and taking live connections for one pool."""

    _places: Capacity

    def keep(self, psock: PooledSocket) -> bool | None:
        """A clean live connection (IN_USE): to a task waiting for the same open, else parked.

        Returns:
          True (handed over or parked), None (refused: the caller runs the
          close protocol) or False (parked, but found at once with bytes,
          the peer's FIN or an error, and ended).
        """
        places = self._places
        # Its own place does not count against its peer while the first
        # waiter that could be served is chosen.
        found = places.first_servable_besides(psock)
        if found is not None:
            task, request = found
            if request.origin != psock.open_key or request.peer != psock.peer or not quiet(psock.sock):
                # No parking while a task that the room could serve waits:
                # the close protocol frees the room.
                return None
            places.ledger.move(psock, State.HANDED)
            places.room.grant(task, psock)
            return True
        assert psock.open_key is not None
        try:
            places.store.park(psock, psock.open_key)
        except OSError:  # pragma: no cover - epoll_ctl fails only out of kernel memory or past max_user_watches
            return None
        places.ledger.move(psock, State.PARKED)
        # The check for anything unread: the answer may have had more bytes
        # than the caller read, or the peer may have closed already.
        self.check()
        return psock.state is State.PARKED

    async def take(self, open_key: OpenKey) -> PooledSocket | None:
        """A parked connection of ``open_key`` for an open: alive (still PARKED), reconnected (CONNECTING), or None.

        The liveness check runs first. When the only connection of this
        open left was closed by its peer meanwhile, it is disconnected and
        connected again to the same address here (no DNS); None: nothing
        of this open was parked, alive or not.

        Raises:
          OSError: that reconnect failed (the socket is closed).
        """
        # Before taking anything; after it, nothing awaits until the stream
        # exists, except a reconnect, whose failure discards the socket.
        await trio.lowlevel.checkpoint_if_cancelled()
        closed_by_peer = self.check(open_key)
        psock = self._places.store.take_parked(open_key)
        if psock is None:
            return None if closed_by_peer is None else await self._reconnect(closed_by_peer, open_key)
        if closed_by_peer is not None:
            self._places.put_back(closed_by_peer)
        return psock

    async def _reconnect(self, psock: PooledSocket, open_key: OpenKey) -> PooledSocket:
        """The peer closed a parked connection first: disconnect it and connect it again."""
        places, peer = self._places, psock.peer
        if places.recycling and psock.reset_for_reuse():
            places.ledger.move(psock, State.IDLE)
            places.ledger.move(psock, State.CONNECTING, peer)
        else:
            places.discard(psock)
            places.serve_waiters()
            family, type, proto, _, _ = psock.key
            psock = await places.acquire(family, type, proto, open_key[2], peer)
        places.serve_waiters()  # check() may have freed places or stored sockets
        try:
            await connect_socket(psock.sock, peer)
        except BaseException as exc:
            places.discard_socket(psock)
            if isinstance(exc, OSError):
                raise all_failed(open_key[0], open_key[1], [(peer, exc)]) from exc
            raise
        return psock

    def check(self, key: OpenKey | None = None) -> PooledSocket | None:
        """The liveness check: end every parked connection that expired or has something to read or an error.

        Returns:
          With a ``key``: one connection of that key whose peer closed, not
          yet disconnected (still PARKED, out of the store), for the caller
          to reconnect; else None.
        """
        store = self._places.store
        expired_end = IDLE_END if self._places.reset_idle else QUIET_END
        for psock in store.expired():
            self._places.end(psock, expired_end)
        closed_by_peer = None
        for psock, events in store.ready():
            if events & URGENT:
                peeked = b"!"
            else:
                try:
                    peeked = psock.sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:  # pragma: no cover - level-triggered: something was there
                    store.park(psock, psock.open_key)  # type: ignore[arg-type]
                    continue
                except OSError:
                    self._places.discard(psock)
                    continue
            if peeked:
                self._places.end(psock, QUIET_END)
            elif key is not None and closed_by_peer is None and psock.open_key == key:
                closed_by_peer = psock
            else:
                self._places.put_back(psock)
        return closed_by_peer
