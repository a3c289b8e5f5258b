"""KeepAlive: released live connections, parked or handed over, and what the watch's events mean for them."""

# A stream's `release` gives back a live connection. It goes straight to a
# task waiting for the same open (host, port, local_address) when there is
# one and the connection is quiet; otherwise, while another task that the
# room could serve waits, it is not parked (the close protocol frees its
# place); otherwise it is parked in the store, which watches it.
#
# The liveness check looks at one connection alone, with one poll(0) of a
# poll object that socket keeps (PooledSocket.pending): the connection
# being parked, at release, and the one being taken, before it is handed
# out. Its cost does not depend on how many are parked or ready. What
# arrives at the others is the watch's (_watch.py): its task wakes when one
# has an event or expires, and ends each one it finds. Whoever finds one
# ends it there and then:
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
          close protocol) or False (found at once with bytes, the peer's
          FIN or an error, and ended instead).
        """
        places = self._places
        # Its own place does not count against its peer while the first
        # waiter that could be served is chosen.
        found = places.first_servable_besides(psock) if places.room.queue else None
        if found is not None:
            task, request = found
            if request.origin != psock.open_key or request.peer != psock.peer or not quiet(psock.sock):
                # No parking while a task that the room could serve waits:
                # the close protocol frees the room.
                return None
            places.ledger.move(psock, State.HANDED)
            places.room.grant(task, psock)
            return True
        # The check for anything unread, of this connection alone: the
        # answer may have had more bytes than the caller read, or the peer
        # may have closed already. What arrives after it is the watch's.
        events = psock.pending()
        if events:
            if not self._end_found(psock, events):
                places.put_back(psock)  # the peer's FIN, already here: disconnected, idle
            return False
        assert psock.open_key is not None
        try:
            places.store.park(psock, psock.open_key)
        except OSError:  # pragma: no cover - epoll_ctl fails only out of kernel memory or past max_user_watches
            return None
        places.ledger.park(psock)
        return True

    async def take(self, open_key: OpenKey) -> PooledSocket | None:
        """A parked connection of ``open_key`` for an open: alive (still PARKED), reconnected (CONNECTING), or None.

        The newest parked connection of this open is taken and checked
        alone: expired, or something to read or an error (one poll(0)),
        it is ended as the watcher would and the next one is taken. When
        the only ones left were closed by their peer meanwhile, one of them
        is disconnected and connected again to the same address here (no
        DNS); None: nothing of this open was parked, alive or not.

        Raises:
          OSError: that reconnect failed (the socket is closed).
        """
        # Before taking anything; after it, nothing awaits until the stream
        # exists, except a reconnect, whose failure discards the socket.
        await trio.lowlevel.checkpoint_if_cancelled()
        places = self._places
        store = places.store
        closed_by_peer = None
        now = None
        while (found := store.take_parked(open_key)) is not None:
            psock, deadline = found
            if now is None:
                now = trio.current_time()
            if deadline <= now:
                # Past keepalive_expiry: a run that went that long without a
                # checkpoint never let the watcher run, and this is the
                # connection whose server may be closing it right now.
                places.end(psock, IDLE_END if places.reset_idle else QUIET_END)
                continue
            events = psock.pending()
            if not events:
                break
            if not self._end_found(psock, events):
                # The peer closed it: ended after the next one is found
                # alive, or reconnected if none is.
                if closed_by_peer is None:
                    closed_by_peer = psock
                else:
                    places.put_back(psock)
        else:
            return None if closed_by_peer is None else await self._reconnect(closed_by_peer, open_key)
        if closed_by_peer is not None:
            places.put_back(closed_by_peer)
        return psock

    def _end_found(self, psock: PooledSocket, events: int) -> bool:
        """End a live connection (IN_USE, or PARKED out of the store) whose poll found ``events``, unless it is a FIN.

        Returns:
          True when it was ended (bytes or an urgent byte unasked, I9: the
          close protocol discards them; or an error: closed). False for the
          peer's FIN alone, left to the caller: it recycles or reconnects.
        """
        if events & URGENT:
            peeked = b"!"
        else:
            try:
                peeked = psock.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:  # pragma: no cover - level-triggered: something was there
                peeked = b"!"  # an event that no peek explains: not handed out
            except OSError:
                self._places.discard(psock)
                return True
        if peeked:
            self._places.end(psock, QUIET_END)
            return True
        return False

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
        places.serve_waiters()  # take() may have freed places or stored sockets
        try:
            await connect_socket(psock.sock, peer)
        except BaseException as exc:
            places.discard_socket(psock)
            if isinstance(exc, OSError):
                raise all_failed(open_key[0], open_key[1], [(peer, exc)]) from exc
            raise
        return psock

    def check(self) -> None:
        """The watcher's round: end every parked connection that expired or has something to read or an error."""
        places = self._places
        store = places.store
        expired_end = IDLE_END if places.reset_idle else QUIET_END
        for psock in store.expired():
            places.end(psock, expired_end)
        for psock, events in store.ready():
            if not self._end_found(psock, events):
                places.put_back(psock)  # the peer's FIN: disconnected, idle
