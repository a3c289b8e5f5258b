"""The close protocol: from how a stream ended to its socket's verdict, and the bounded wait for the peer's FIN."""

# The close protocol (docs/how-it-works.rst, "The close protocol"): a socket
# is recycled only once the peer's FIN has arrived, and whatever the peer
# sent before it is unwanted. A stream's end is a frozen StreamEnd; `decide`
# turns it into a Verdict, reading (without blocking) and throwing away what
# is queued on the way, and sending our FIN when the drain is next. The
# pool carries the verdict out; the drain task is `wait_for_fin` under the
# pool's eof_timeout.
#
# Reading goes into one scratch buffer with recv_into(): the bytes are
# discarded anyway, so there is no reason to allocate 64 KiB per call. The
# buffer is shared by every drain in the process; concurrent writes into it
# (two trio runs in two threads) are harmless because nobody reads it.
#
# The end of a connection after the peer's FIN has a second half
# (finish_drain below). A disconnect from CLOSING (FINs crossed) or LAST_ACK
# (our FIN after the peer's) sends no RST and purges the write queue, our
# FIN with it: tcp_disconnect() only resets from the states of
# tcp_need_reset(). A peer whose copy of our FIN was lost never gets it (its
# socket sits in FIN_WAIT2 until tcp_fin_timeout), and its late ACK meets a
# CLOSE socket and draws a bare RST that ends its TIME_WAIT. So from those
# states the drain waits, bounded by the pool's eof_timeout, until the
# kernel has our FIN acknowledged: CLOSE (LAST_ACK -> CLOSE directly;
# CLOSING -> TIME_WAIT, which the kernel moves to a timewait bucket and
# leaves the descriptor in CLOSE). Then the disconnect is a no-op on the
# wire. https://datatracker.ietf.org/doc/html/rfc9293#section-3.6
#
# That wait polls TCP_INFO. The kernel has no readiness event for the state
# change: in CLOSING and LAST_ACK the socket is already readable (EOF),
# writable (SEND_SHUTDOWN) and hung up (both directions shut), so a level-
# triggered wait_readable() or wait_writable() returns at once, and trio has
# no edge-triggered wait. The ACK is due about one round trip after our FIN,
# or after a retransmission (200 ms at least): the poll starts at a fraction
# of the smoothed RTT and backs off geometrically to _ACK_POLL_MAX, so a
# lost FIN costs a few getsockopt() calls a second per socket, and no task
# but the drain's own waits.
#
# The grace before our FIN. A stream closed on the last byte of an answer
# (httpcore does, so do most clients of servers that close) is usually a few
# microseconds ahead of the server's FIN, which left the server right behind
# that byte. Sending ours at once makes the FINs cross and leaves TIME_WAIT
# on both sides. So our FIN waits in the drain (aclose() still returns at
# once) for the peer's: about one round trip, at least FIN_GRACE_MIN (the
# server's own gap between its last write and its close: 20-200 us measured
# against gunicorn and nginx, with margin for scheduling), at most
# FIN_GRACE_MAX (a peer that waits for us, a keep-alive server, loses only
# that much, and the socket's place in the pool is held no longer). A FIN
# that arrives in the grace is answered by the disconnect's RST alone:
# nothing is left in TIME_WAIT anywhere.

from __future__ import annotations

import contextlib
import enum
import itertools
import math
import socket
from typing import Final, final

import attrs
import trio

from ._in_flight import nothing_in_flight
from ._tcp_state import FIN_RECEIVED, TcpState, smoothed_rtt, tcp_state

__all__ = [
    "FIN_GRACE_MAX",
    "FIN_GRACE_MIN",
    "READ_BUDGET",
    "StreamEnd",
    "Verdict",
    "decide",
    "discard_queued",
    "drain_datagrams",
    "fin_grace",
    "fin_unacknowledged",
    "finish_drain",
    "read_available",
    "wait_for_fin",
    "wait_for_fin_acknowledged",
]

_SCRATCH: Final = bytearray(65536)

#: The most bytes one read_available() call discards (four recv() calls
#: into the scratch buffer, tens of microseconds). A fast peer refills the
#: queue as fast as it is read, so without a bound a large drain_limit
#: would keep the event loop in one synchronous loop: aclose() hands the
#: rest to the drain task, and the drain task waits for readability (a
#: trip through the I/O manager, which lets every other task run) between
#: two calls.
READ_BUDGET: Final = 4 * len(_SCRATCH)

# Out of budget, the peer's FIN may already be queued behind the bytes left.
# Reading on to find it would stall the loop; sending our FIN instead (as
# aclose() does when no FIN was found) would put a peer that has closed into
# TIME_WAIT, which recycling exists to avoid. The connection's state tells
# without reading (FIN_RECEIVED): every byte before the FIN is in our
# receive queue, which the disconnect purges.


#: LAST_ACK and CLOSING: the peer's FIN is in, ours is not yet acknowledged.
_FIN_UNACKED: Final = frozenset({TcpState.LAST_ACK, TcpState.CLOSING})
#: Bounds of the wait for the peer's FIN before ours goes out, in seconds.
FIN_GRACE_MIN: Final = 0.002
FIN_GRACE_MAX: Final = 0.010
#: The longest pause between two looks at the state while our FIN is unacknowledged.
_ACK_POLL_MAX: Final = 0.05
_ACK_POLL_MIN: Final = 0.0002


def _fin_received(sock: socket.socket) -> bool:
    return tcp_state(sock) in FIN_RECEIVED


@final
@attrs.frozen
class StreamEnd:
    """How a stream or UDP socket ended, as the pool needs to know it."""

    #: A receive returned b"": the peer's FIN arrived.
    eof_seen: bool
    #: Our FIN went out (send_eof).
    eof_sent: bool
    #: No call failed with a broken connection.
    healthy: bool
    #: Nothing the stream saw forbids another exchange (no cut send or
    #: receive, no other task inside): only `release` asks.
    parkable: bool = False
    #: The protocol layer vouches that no answer is owed either way (an
    #: idle keep-alive connection httpx closes): with nothing in flight in
    #: the kernel either, the disconnect itself ends the connection.
    idle: bool = False

    @property
    def may_park(self) -> bool:
        """Whether the connection may serve another exchange, as far as the stream knows."""
        return self.parkable and self.healthy and not (self.eof_seen or self.eof_sent)


#: Every StreamEnd there can be, by (eof_seen, eof_sent, healthy,
#: parkable, idle): a stream's end is looked up, not built, on every close.
ENDS: Final = {
    flags: StreamEnd(*flags) for flags in itertools.product((False, True), repeat=len(attrs.fields(StreamEnd)))
}
#: The end of a stream released clean, the common case.
PARKABLE: Final = ENDS[False, False, True, True, False]


class Verdict(enum.Enum):
    """What becomes of a socket whose stream ended."""

    RECYCLE = "disconnect now, the peer's FIN has arrived"
    DRAIN = "wait in the background for the peer's FIN"
    CLOSE = "close, never recycle"


#: A socket closed at once: the end was not healthy, or recycling is off.
CLOSE_NOW: Final = (Verdict.CLOSE, 0, False, False)


def decide(end: StreamEnd, sock: socket.socket, *, recycle: bool, drain_limit: int) -> tuple[Verdict, int, bool, bool]:
    """The verdict for a socket whose stream ended: (verdict, bytes read on the way, the peer's FIN seen, our FIN due).

    With no FIN seen yet, reads what is queued without blocking (the FIN
    may be there, unread: sending ours first would move a peer that has
    closed from FIN_WAIT2 to TIME_WAIT). Our FIN, when due (no `send_eof`
    sent it), goes out from the drain after a short grace (`finish_drain`).
    A FIN seen while ours is still unacknowledged (LAST_ACK, CLOSING) is a
    drain too: a disconnect there would drop our FIN. ``recycle`` False (or
    an unhealthy end): CLOSE. An ``idle`` end with nothing in flight is
    recycled at once.
    """
    if not (recycle and end.healthy):
        return CLOSE_NOW
    if end.idle and not (end.eof_seen or end.eof_sent) and nothing_in_flight(sock):
        # Its RST loses nothing and leaves no TIME_WAIT on either side,
        # where our FIN would leave one here (I7 as of 0.3).
        return (Verdict.RECYCLE, 0, False, False)
    eof, received = end.eof_seen, 0
    if not eof:
        try:
            eof, received = read_available(sock, drain_limit)
        except OSError:
            return CLOSE_NOW
    if eof:
        # Only a send_eof sends our FIN before this point.
        if end.eof_sent and fin_unacknowledged(sock):
            return (Verdict.DRAIN, received, True, False)
        return (Verdict.RECYCLE, received, True, False)
    if received > drain_limit:
        return (Verdict.CLOSE, received, False, False)
    return (Verdict.DRAIN, received, False, not end.eof_sent)


def discard_queued(sock: socket.socket, limit: int) -> None:
    """Read and drop what a connected socket has queued (up to about ``limit`` bytes) before a close."""
    with contextlib.suppress(OSError):
        read_available(sock, limit)


#: Upper bound on the datagrams drain_datagrams() discards in one call. The
#: receive queue is bounded by SO_RCVBUF, and an unhashed socket receives
#: nothing new, so this is only a guard against looping forever.
_DRAIN_MAX_DATAGRAMS: Final = 1 << 16


def drain_datagrams(sock: socket.socket) -> bool:
    """Discard every datagram queued on a non-blocking socket.

    Returns:
      True once the queue is empty; False if it was still not empty after
      ``_DRAIN_MAX_DATAGRAMS`` datagrams (somebody keeps sending).

    Raises:
      OSError: from ``recv()``, for example a pending ICMP error.
    """
    for _ in range(_DRAIN_MAX_DATAGRAMS):
        try:
            # One byte is enough: a datagram socket dequeues the whole
            # datagram and drops what does not fit.
            sock.recv(1)
        except BlockingIOError:
            return True
    return False


def read_available(sock: socket.socket, limit: int) -> tuple[bool, int]:
    """Discard what is queued, without blocking: (the peer's FIN has arrived, bytes read).

    Stops once more than ``limit`` bytes were read, or `READ_BUDGET` bytes
    in this call (the last recv() may pass either by less than 64 KiB). When
    the budget stops it, the FIN counts as arrived if the connection's state
    says so, even with bytes still queued before it.

    Raises:
      OSError: from recv(), for example ECONNRESET.
    """
    received = 0
    while received <= limit:
        if received >= READ_BUDGET:
            return _fin_received(sock), received
        try:
            count = sock.recv_into(_SCRATCH)
        except BlockingIOError:
            return False, received
        if not count:
            return True, received
        received += count
    return False, received


async def wait_for_fin(sock: socket.socket, received: int, limit: int) -> bool:
    """Discard incoming bytes until the FIN (True) or past ``limit`` in all (False).

    ``received`` counts what was already read. No time bound: the caller
    runs this under its own cancel scope.

    Raises:
      OSError: from recv(), for example ECONNRESET.
    """
    while received <= limit:
        eof, count = read_available(sock, limit - received)
        if eof:
            return True
        received += count
        if received <= limit:
            await trio.lowlevel.wait_readable(sock)
    return False


def fin_unacknowledged(sock: socket.socket) -> bool:
    """Whether the peer's FIN has arrived and ours is sent but not acknowledged (LAST_ACK, CLOSING)."""
    return sock.type == socket.SOCK_STREAM and tcp_state(sock) in _FIN_UNACKED


def fin_grace(sock: socket.socket) -> float:
    """How long our FIN waits for the peer's: about one round trip, within [FIN_GRACE_MIN, FIN_GRACE_MAX]."""
    return min(max(smoothed_rtt(sock), FIN_GRACE_MIN), FIN_GRACE_MAX)


async def wait_for_fin_acknowledged(sock: socket.socket) -> None:
    """Return once our FIN is acknowledged (or was never sent): the state is no longer LAST_ACK or CLOSING.

    Polls TCP_INFO with a bounded backoff (the module comment says why).
    No time bound: the caller runs this under its own cancel scope.
    """
    delay = min(max(smoothed_rtt(sock) / 4, _ACK_POLL_MIN), _ACK_POLL_MAX)
    while fin_unacknowledged(sock):
        await trio.sleep(delay)
        delay = min(delay * 2, _ACK_POLL_MAX)


async def _discard_until(sock: socket.socket, received: int, limit: int, deadline: float) -> tuple[bool, int]:
    """wait_for_fin until ``deadline``: (the FIN arrived, bytes read in all), the count exact on timeout."""
    with trio.move_on_at(deadline):
        while received <= limit:
            eof, count = read_available(sock, limit - received)
            received += count
            if eof:
                return True, received
            if received <= limit:
                await trio.lowlevel.wait_readable(sock)
    return False, received


async def finish_drain(sock: socket.socket, received: int, limit: int, *, eof_seen: bool, send_fin: bool) -> bool:
    """The background drain of a closed stream's socket: True once it may be disconnected politely.

    In order: if ``send_fin``, wait `fin_grace` for the peer's FIN, then
    send ours (shutdown SHUT_WR) if it has not come; wait for the peer's
    FIN, discarding what precedes it (``received`` bytes were already read,
    at most ``limit`` in all: False past it); then wait until our FIN, if
    one was sent, is acknowledged. ``eof_seen``: the peer's FIN is already
    in, only the last step remains. No time bound: the caller runs this
    under its own cancel scope (``eof_timeout``).

    Raises:
      OSError: from recv() or shutdown(), for example ECONNRESET.
    """
    if not eof_seen:
        deadline = trio.current_time() + fin_grace(sock) if send_fin else math.inf
        eof_seen, received = await _discard_until(sock, received, limit, deadline)
        if not eof_seen and received <= limit and send_fin:
            sock.shutdown(socket.SHUT_WR)
            eof_seen, received = await _discard_until(sock, received, limit, math.inf)
        if not eof_seen:
            return False
    await wait_for_fin_acknowledged(sock)
    return True
