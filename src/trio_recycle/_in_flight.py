"""Whether a live TCP connection has nothing in flight, so that its disconnect loses nothing."""

# DESIGN.md, "Many peers": an idle connection that must go is best ended by
# the disconnect itself. Its RST then loses nothing (no byte unread on our
# side, none unsent or unacknowledged on the way out) and leaves no
# TIME_WAIT on either side, where a FIN of ours leaves one here. The check
# is two system calls: a non-blocking MSG_PEEK (nothing queued, not even the
# peer's FIN) and SIOCOUTQ (bytes in our send queue not yet acknowledged:
# tcp(7)). Whether the peer still owes us an answer is the protocol's
# knowledge, not the kernel's: the caller vouches for that.

from __future__ import annotations

import fcntl
import socket
import struct
import termios

__all__ = ["nothing_in_flight"]

_SIOCOUTQ = termios.TIOCOUTQ  # the same ioctl number (tcp(7))


def nothing_in_flight(sock: socket.socket) -> bool:
    """Nothing unread, no FIN received, nothing unacknowledged in our send queue."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    except OSError:
        return False
    else:
        return False  # a byte or the peer's FIN (b"")
    try:
        unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return False
    return bool(unacked == 0)
