"""The TCP state of a socket, read through TCP_INFO, with the kernel's state names."""

# tcpi_state is the first byte of struct tcp_info; the numbers are the
# kernel's (include/net/tcp_states.h), stable ABI since Linux 2.6. One enum
# and one reader, so that no module spells a state as a bare number.
#
# https://elixir.bootlin.com/linux/v6.18/source/include/net/tcp_states.h

from __future__ import annotations

import enum
import socket
import struct
from typing import Final

__all__ = ["FIN_RECEIVED", "TcpState", "smoothed_rtt", "tcp_state"]

_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
# struct tcp_info (include/uapi/linux/tcp.h): 8 bytes of u8 fields, then
# u32 tcpi_rto ... tcpi_rtt is the 16th u32 (microseconds, smoothed).
_TCPI_RTT: Final = struct.Struct("=68xI")


class TcpState(enum.IntEnum):
    """``tcpi_state`` values."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


#: The states reached once the peer's FIN arrived in sequence: every byte
#: before it is in our receive queue.
FIN_RECEIVED: Final = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})


#: TcpState by value: a dict lookup, where TcpState(value) runs Enum's
#: Python-level __call__ (every close and recycle reads the state).
_BY_VALUE: Final = {state.value: state for state in TcpState}


def tcp_state(sock: socket.socket) -> TcpState | None:
    """The socket's TCP state; None where TCP_INFO is missing (not Linux) or fails."""
    if _TCP_INFO is None:  # pragma: no cover - not Linux: the pool never recycles there
        return None
    try:
        return _BY_VALUE.get(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0])
    except OSError:  # pragma: no cover - defensive: TCP_INFO of an open TCP socket does not fail
        return None


def smoothed_rtt(sock: socket.socket) -> float:
    """The connection's smoothed round-trip time in seconds; 0 where TCP_INFO cannot say (not Linux, not TCP)."""
    if _TCP_INFO is None or sock.type != socket.SOCK_STREAM:  # a UDP socket has no RTT; off Linux, no TCP_INFO
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCPI_RTT.size)
    except OSError:  # pragma: no cover - defensive: TCP_INFO of an open TCP socket does not fail
        return 0.0
    if len(info) < _TCPI_RTT.size:  # pragma: no cover - a pre-2.6 kernel
        return 0.0
    return float(_TCPI_RTT.unpack(info)[0]) / 1e6
