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

from __future__ import annotations

import contextlib
import enum
import socket
from typing import Final, final

import attrs
import trio

from ._in_flight import nothing_in_flight
from ._tcp_state import FIN_RECEIVED, tcp_state

__all__ = [
    "READ_BUDGET",
    "StreamEnd",
    "Verdict",
    "decide",
    "discard_queued",
    "drain_datagrams",
    "read_available",
    "wait_for_fin",
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


class Verdict(enum.Enum):
    """What becomes of a socket whose stream ended."""

    RECYCLE = "disconnect now, the peer's FIN has arrived"
    DRAIN = "wait in the background for the peer's FIN"
    CLOSE = "close, never recycle"


#: A socket closed at once: the end was not healthy, or recycling is off.
CLOSE_NOW: Final = (Verdict.CLOSE, 0)


def decide(end: StreamEnd, sock: socket.socket, *, recycle: bool, drain_limit: int) -> tuple[Verdict, int]:
    """The verdict for a socket whose stream ended, and the bytes read on the way.

    With no FIN seen yet, reads what is queued without blocking (the FIN
    may be there, unread: sending ours first would move a peer that has
    closed from FIN_WAIT2 to TIME_WAIT), and sends our FIN before a drain
    unless `send_eof` did. ``recycle`` False (or an unhealthy end): CLOSE.
    An ``idle`` end with nothing in flight is recycled at once.
    """
    if not (recycle and end.healthy):
        return CLOSE_NOW
    if end.idle and not (end.eof_seen or end.eof_sent) and nothing_in_flight(sock):
        # Its RST loses nothing and leaves no TIME_WAIT on either side,
        # where our FIN would leave one here (I7 as of 0.3).
        return (Verdict.RECYCLE, 0)
    eof, received = end.eof_seen, 0
    if not eof:
        try:
            eof, received = read_available(sock, drain_limit)
            if not eof and received <= drain_limit and not end.eof_sent:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            return CLOSE_NOW
    if eof:
        return (Verdict.RECYCLE, received)
    if received > drain_limit:
        return (Verdict.CLOSE, received)
    return (Verdict.DRAIN, received)


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
