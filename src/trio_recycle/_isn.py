"""Fresh initial sequence numbers for reconnected TCP sockets, where the kernel allows it."""

# tcp_disconnect() does not forget the connection's sequence space: it sets
# write_seq to write_seq + max_window + 2, and tcp_v4_connect() /
# tcp_v6_connect() draw a fresh RFC 6528 ISN (secure_tcp_seq()) only when
# write_seq is 0. So by default a reconnected socket's SYN continues the old
# connection's numbers, and the old peer can predict it: the reason for peer
# affinity (I8).
#
# TCP repair mode (made for checkpoint/restore, CRIU) can write write_seq
# directly: with TCP_REPAIR on and TCP_REPAIR_QUEUE = TCP_SEND_QUEUE,
# setsockopt(TCP_QUEUE_SEQ) stores its value in write_seq, but only in
# state CLOSE (EPERM otherwise) with an empty retransmit queue, which is
# what a disconnected socket is. Writing 0 and leaving repair mode makes the
# next connect() draw a fresh ISN (and a fresh timestamp offset, which the
# connect draws anyway), exactly as for a socket fresh from socket(2).
#
# Repair mode needs CAP_NET_ADMIN in the socket's network namespace
# (tcp_can_repair_sock()). Unprivileged programs, the common case, get
# EPERM at the first step: fresh_isns() probes once per process and the
# pool then keeps affinity on by default. Two details of the kernel code:
# - A socket left in repair mode would "connect" without sending a SYN
#   (tcp_connect() skips to ESTABLISHED under repair), so a sequence that
#   fails half way makes the socket unusable: the caller closes it.
# - Leaving repair mode sets sk_reuse to SK_NO_REUSE, which clears a pool's
#   SO_REUSEADDR: it is read before and written back after.
#
# https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c (tcp_disconnect, do_tcp_setsockopt)
# https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_ipv4.c (tcp_v4_connect)
# https://www.rfc-editor.org/rfc/rfc6528

from __future__ import annotations

import socket
import sys
from typing import Final

from ._disconnect import disconnect

__all__ = ["fresh_isns", "peer_affinity_for", "renew_isn"]

# From include/uapi/linux/tcp.h, for Pythons whose socket module lacks them.
TCP_REPAIR: Final[int] = getattr(socket, "TCP_REPAIR", 19)
TCP_REPAIR_QUEUE: Final[int] = getattr(socket, "TCP_REPAIR_QUEUE", 20)
TCP_QUEUE_SEQ: Final[int] = getattr(socket, "TCP_QUEUE_SEQ", 21)
TCP_SEND_QUEUE: Final = 2
_REPAIR_ON: Final = 1
_REPAIR_OFF: Final = 0

_probe_result: bool | None = None


def _reset_write_seq(sock: socket.socket) -> None:
    """The repair-mode sequence that sets write_seq to 0; raises OSError, leaving repair mode if it entered it."""
    reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, _REPAIR_ON)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 0)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, _REPAIR_OFF)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)


def _read_write_seq(sock: socket.socket) -> int:
    """write_seq as the kernel holds it (repair mode, CAP_NET_ADMIN): the next connect's ISN, 0 for a fresh one."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, _REPAIR_ON)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        seq: int = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, _REPAIR_OFF)
    return seq & 0xFFFFFFFF


def _probe() -> bool:
    # A whole cycle, as can_recycle() does: connect, peer close, disconnect,
    # reset, check the kernel now holds 0, reconnect (a real SYN: accepted).
    if not sys.platform.startswith("linux"):
        return False  # pragma: no cover - TCP repair mode is Linux's
    try:
        with socket.socket() as listener, socket.socket() as client:
            listener.bind(("127.0.0.1", 0))
            listener.listen(2)
            client.settimeout(2.0)
            for _ in range(2):
                client.connect(listener.getsockname())
                server_side, _ = listener.accept()
                server_side.close()
                if client.recv(1) != b"":
                    return False  # pragma: no cover - defensive: the server side closed, the read is EOF
                disconnect(client)
                client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                _reset_write_seq(client)
                if _read_write_seq(client) != 0:
                    return False  # pragma: no cover - a kernel that ignores TCP_QUEUE_SEQ
    except OSError:
        return False
    return True


def fresh_isns() -> bool:
    """Whether a disconnected TCP socket's next connection can start at a fresh RFC 6528 ISN here.

    The first call probes the kernel on loopback (a connect, the peer's
    close, a disconnect, the write_seq reset in TCP repair mode, a
    reconnect); later calls return the cached answer. False without
    ``CAP_NET_ADMIN`` (unprivileged programs), off Linux, or where
    ``TCP_REPAIR`` is missing.
    """
    global _probe_result
    if _probe_result is None:
        _probe_result = _probe()
    return _probe_result


def renew_isn(sock: socket.socket) -> bool:
    """Make a disconnected (CLOSE) TCP socket's next connect draw a fresh ISN, where `fresh_isns` says it can.

    Returns:
      True when the socket may be reused: its ISN was reset, or this process
      cannot reset ISNs at all (then nothing is tried, and affinity keeps the
      old sequence to its peer). False when the reset failed on this socket:
      the caller must close it, since its next ISN is not fresh and it may
      even still be in repair mode.
    """
    if not (_probe_result if _probe_result is not None else fresh_isns()):
        return True
    try:
        _reset_write_seq(sock)
    except OSError:
        return False
    return True


def peer_affinity_for(peer_affinity: object) -> bool:
    """Check ``open_socket_pool(peer_affinity=...)`` and resolve ``"auto"``: affinity only where ISNs are not fresh.

    Raises:
      TypeError: not a bool nor ``"auto"``.
    """
    if not isinstance(peer_affinity, bool) and peer_affinity != "auto":
        raise TypeError(f'peer_affinity must be a bool or "auto", not {peer_affinity!r}')
    # Probed here, when a pool opens, whatever the value: not in the
    # middle of the first recycle.
    fresh = fresh_isns()
    return not fresh if peer_affinity == "auto" else bool(peer_affinity)
