"""Whether a live TCP connection has nothing in flight, so that its disconnect loses nothing."""

# DESIGN.md, "Many peers": an idle connection that must go is best ended by
# the disconnect itself. Its RST then loses nothing (no byte unread on our
# side, none unsent or unacknowledged on the way out) and leaves no
# TIME_WAIT on either side, where a FIN of ours leaves one here. The check
# is two system calls: a poll(0) (nothing queued, not even the peer's FIN or
# an urgent byte) and SIOCOUTQ (bytes in our send queue not yet acknowledged:
# tcp(7)). Whether the peer still owes us an answer is the protocol's
# knowledge, not the kernel's: the caller vouches for that.

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import termios
from typing import Final

__all__ = ["nothing_in_flight", "pending", "poller", "quiet"]

_SIOCOUTQ = termios.TIOCOUTQ  # the same ioctl number (tcp(7))


_POLL_EVENTS: Final = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)


def poller(sock: socket.socket) -> select.poll:
    """A poll object watching this socket alone, for `pending` (the pool keeps one per socket)."""
    watching = select.poll()
    watching.register(sock, _POLL_EVENTS)
    return watching


def pending(watching: select.poll) -> int:
    """The events of one poll(0) of the socket ``watching`` watches: 0 when it is quiet.

    Quiet means no bytes, no urgent byte (seen only as POLLPRI: no peek
    finds a lone one), no FIN and no error. One system call, no exception
    in the common case: a poll object made once per socket costs half of a
    fresh one, and a peek that finds nothing raises BlockingIOError.
    """
    found = watching.poll(0)
    return found[0][1] if found else 0


def quiet(sock: socket.socket) -> bool:
    """Whether a connected socket has nothing to read: no bytes, no urgent byte, no FIN, no error (one poll(0)).

    When something is there, a peek reads a pending error (as SO_ERROR
    would), so that the close protocol that follows sees the state it left.
    """
    if sock.fileno() < 0:
        return False
    if not pending(poller(sock)):
        return True
    with contextlib.suppress(OSError):
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    return False


def nothing_in_flight(sock: socket.socket) -> bool:
    """Nothing unread (urgent data included), no FIN received, nothing unacknowledged in our send queue."""
    if not quiet(sock):
        return False
    try:
        unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return False
    return bool(unacked == 0)
