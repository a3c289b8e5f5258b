"""Waiting for the peer's FIN on a closed stream's socket: read and discard, bounded."""

# The close protocol (docs/how-it-works.rst, "The close protocol"): a socket is
# recycled only once the peer's FIN has arrived, and whatever the peer sent
# before it is unwanted. These functions read and throw that away, up to a
# byte limit; the pool decides what a result means and bounds the time.
#
# Reading goes into one scratch buffer with recv_into(): the bytes are
# discarded anyway, so there is no reason to allocate 64 KiB per call. The
# buffer is shared by every drain in the process; concurrent writes into it
# (two trio runs in two threads) are harmless because nobody reads it.

from __future__ import annotations

import socket
from typing import Final

import trio

__all__ = ["READ_BUDGET", "read_available", "wait_for_fin"]

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
# without reading: these are the states reached once the peer's FIN arrived
# in sequence, so every byte before it is in our receive queue, which the
# disconnect purges (include/net/tcp_states.h: CLOSE_WAIT, LAST_ACK, CLOSING).
_FIN_RECEIVED_STATES: Final = frozenset({8, 9, 11})
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)


def _fin_received(sock: socket.socket) -> bool:
    if _TCP_INFO is None:  # pragma: no cover - not Linux: the pool never recycles there
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] in _FIN_RECEIVED_STATES
    except OSError:  # pragma: no cover - defensive: TCP_INFO of an open TCP socket does not fail
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
