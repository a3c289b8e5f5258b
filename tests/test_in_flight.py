"""_in_flight.nothing_in_flight: what the kernel says about a live connection, on real loopback sockets."""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

import pytest

from trio_recycle._in_flight import nothing_in_flight

from . import checks

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (ours, the peer's)."""
    with checks.listener() as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    with ours, peer:
        yield ours, peer


def test_idle_connection_has_nothing_in_flight(pair: tuple[socket.socket, socket.socket]) -> None:
    """Nothing sent, nothing received: the disconnect would lose nothing."""
    ours, _ = pair
    assert nothing_in_flight(ours)


def test_unread_bytes_or_the_peers_fin_are_in_flight(pair: tuple[socket.socket, socket.socket]) -> None:
    """A byte queued for us, then the peer's FIN: either way, not idle."""
    ours, peer = pair
    peer.sendall(b"x")
    assert not nothing_in_flight(ours)
    assert ours.recv(1) == b"x"
    peer.shutdown(socket.SHUT_WR)
    assert not nothing_in_flight(ours)


def test_unacknowledged_bytes_are_in_flight(pair: tuple[socket.socket, socket.socket]) -> None:
    """More than the peer's buffers take: our send queue holds unacknowledged bytes."""
    ours, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    try:
        while True:
            ours.send(b"." * 65536)
    except BlockingIOError:
        pass
    assert not nothing_in_flight(ours)


def test_a_reset_or_closed_socket_is_not_idle(pair: tuple[socket.socket, socket.socket]) -> None:
    """The peer's RST (a pending ECONNRESET), or our own closed descriptor: not idle."""
    ours, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    assert not nothing_in_flight(ours)
    ours.close()
    assert not nothing_in_flight(ours)
