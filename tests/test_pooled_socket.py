"""PooledSocket: what a disconnect resets and when a socket may go back idle, on real sockets."""

from __future__ import annotations

import socket

from trio_recycle._pooled_socket import (
    RESET_BY_TCP_DISCONNECT,
    RESET_BY_UDP_DISCONNECT,
    PooledSocket,
    reset_by_disconnect,
)


def _tcp() -> PooledSocket:
    return PooledSocket.create(
        socket.AF_INET, socket.SOCK_STREAM, 0, None, (), (socket.AF_INET, socket.SOCK_STREAM, 0, None, None)
    )


def test_reset_by_disconnect_per_socket_type() -> None:
    """TCP and UDP each have their own reset options; any other type has none to re-apply."""
    assert reset_by_disconnect(socket.SOCK_STREAM) == RESET_BY_TCP_DISCONNECT
    assert reset_by_disconnect(socket.SOCK_DGRAM) == RESET_BY_UDP_DISCONNECT
    assert reset_by_disconnect(socket.SOCK_RAW) == frozenset()


def test_a_tainted_socket_is_never_reset_for_reuse() -> None:
    """An option the pool cannot restore taints the socket: reset_for_reuse says no and leaves it to be closed."""
    psock = _tcp()
    try:
        # SO_RCVBUF reads back doubled: not restorable.
        psock.note_user_option(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert psock.tainted
        assert not psock.reset_for_reuse()
        assert psock.sock.fileno() >= 0  # closing is the caller's job
    finally:
        psock.close()


def test_options_of_a_closed_descriptor_cannot_be_saved_or_restored() -> None:
    """A failing getsockopt taints the socket; a failing restore keeps it from being parked."""
    psock = _tcp()
    psock.note_user_option(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert not psock.tainted
    assert psock.saved_options == {(socket.IPPROTO_TCP, socket.TCP_NODELAY): 0}
    psock.close()
    assert not psock.restore_options()
    psock.note_user_option(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    assert psock.tainted
