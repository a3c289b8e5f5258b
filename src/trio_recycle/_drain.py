"""Waiting out a closed stream's connection: the peer's FIN (read and discard, bounded), then the ACK of ours."""

# The close protocol (docs/how-it-works.rst, "The close protocol"): a socket is
# recycled only once the peer's FIN has arrived, and whatever the peer sent
# before it is unwanted. These functions read and throw that away, up to a
# byte limit; the pool decides what a result means and bounds the time.
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

import math
import socket
import struct
from typing import Final

import trio

__all__ = [
    "FIN_GRACE_MAX",
    "FIN_GRACE_MIN",
    "READ_BUDGET",
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
# without reading: these are the states reached once the peer's FIN arrived
# in sequence, so every byte before it is in our receive queue, which the
# disconnect purges (include/net/tcp_states.h: CLOSE_WAIT, LAST_ACK, CLOSING).
_FIN_RECEIVED_STATES: Final = frozenset({8, 9, 11})
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
#: LAST_ACK and CLOSING: the peer's FIN is in, ours is not yet acknowledged.
_FIN_UNACKED_STATES: Final = frozenset({9, 11})

#: Bounds of the wait for the peer's FIN before ours goes out, in seconds.
FIN_GRACE_MIN: Final = 0.002
FIN_GRACE_MAX: Final = 0.010
#: The longest pause between two looks at the state while our FIN is unacknowledged.
_ACK_POLL_MAX: Final = 0.05
_ACK_POLL_MIN: Final = 0.0002
# struct tcp_info (include/uapi/linux/tcp.h): 8 bytes of u8 fields, then
# u32 tcpi_rto ... tcpi_rtt is the 16th u32 (microseconds, smoothed).
_TCPI_RTT: Final = struct.Struct("=68xI")


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


def _tcp_info(sock: socket.socket, size: int) -> bytes | None:
    if _TCP_INFO is None:  # pragma: no cover - not Linux: the pool never recycles there
        return None
    if sock.type != socket.SOCK_STREAM:
        return None  # a UDP socket: no TCP state, nothing unacknowledged
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, size)
    except OSError:  # pragma: no cover - defensive: TCP_INFO of an open TCP socket does not fail
        return None


def fin_unacknowledged(sock: socket.socket) -> bool:
    """Whether the peer's FIN has arrived and ours is sent but not acknowledged (LAST_ACK, CLOSING)."""
    info = _tcp_info(sock, 1)
    return info is not None and info[0] in _FIN_UNACKED_STATES


def _smoothed_rtt(sock: socket.socket) -> float:
    info = _tcp_info(sock, _TCPI_RTT.size)
    if info is None or len(info) < _TCPI_RTT.size:  # pragma: no cover - not Linux, or a pre-2.6 kernel
        return 0.0
    return float(_TCPI_RTT.unpack(info)[0]) / 1e6


def fin_grace(sock: socket.socket) -> float:
    """How long our FIN waits for the peer's: about one round trip, within [FIN_GRACE_MIN, FIN_GRACE_MAX]."""
    return min(max(_smoothed_rtt(sock), FIN_GRACE_MIN), FIN_GRACE_MAX)


async def wait_for_fin_acknowledged(sock: socket.socket) -> None:
    """Return once our FIN is acknowledged (or was never sent): the state is no longer LAST_ACK or CLOSING.

    Polls TCP_INFO with a bounded backoff (the module comment says why).
    No time bound: the caller runs this under its own cancel scope.
    """
    delay = min(max(_smoothed_rtt(sock) / 4, _ACK_POLL_MIN), _ACK_POLL_MAX)
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
