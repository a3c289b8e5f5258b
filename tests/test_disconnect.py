"""disconnect() and can_recycle() against the real kernel."""

from __future__ import annotations

import errno
import socket
import sys

import pytest

import trio_recycle
from trio_recycle import _disconnect

from .conftest import TCP_CLOSE, tcp_state, time_wait_count, wait_for_time_wait


def connected_pair(host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen()
    client = socket.socket(family)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    return listener, client, server


def test_disconnect_after_peer_close_leaves_a_reusable_socket(loopback: str) -> None:
    """After the peer's FIN, disconnect gives CLOSE, ENOTCONN, and connect works again."""
    listener, client, server = connected_pair(loopback)
    with listener, client:
        first_fd = client.fileno()
        server.sendall(b"x")
        server.close()
        assert client.recv(10) == b"x"
        assert client.recv(10) == b""
        trio_recycle.disconnect(client)
        assert tcp_state(client) == TCP_CLOSE
        with pytest.raises(OSError) as info:
            client.getpeername()
        assert info.value.errno == errno.ENOTCONN
        # tcp_disconnect() leaves ECONNRESET in sk_err; reading clears it.
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        client.connect(listener.getsockname())
        again, _ = listener.accept()
        with again:
            again.sendall(b"second")
            assert client.recv(10) == b"second"
        assert client.fileno() == first_fd


def test_disconnect_leaves_no_time_wait_when_peer_closed_first(loopback: str) -> None:
    """Peer closes first, we disconnect: no TIME_WAIT on either side."""
    listener, client, server = connected_pair(loopback)
    port = listener.getsockname()[1]
    # Only this connection's entries: bind(0) may hand out a port that an
    # earlier test's client left a TIME_WAIT entry on.
    client_port = client.getsockname()[1]
    with listener, client:
        server.close()
        assert client.recv(1) == b""
        trio_recycle.disconnect(client)
        assert time_wait_count(port, {client_port}) == 0


def test_plain_close_after_peer_closed_first_leaves_time_wait_on_the_peer(loopback: str) -> None:
    """The baseline the previous test beats: a plain close leaves TIME_WAIT."""
    listener, client, server = connected_pair(loopback)
    port = listener.getsockname()[1]
    client_port = client.getsockname()[1]
    with listener:
        server.close()
        assert client.recv(1) == b""
        client.close()
        assert wait_for_time_wait(port, 1, remote_ports={client_port}) == 1


def test_disconnect_a_closed_socket_raises_ebadf() -> None:
    """A closed socket (fileno -1) gives EBADF, not a call on fd -1."""
    sock = socket.socket()
    sock.close()
    with pytest.raises(OSError) as info:
        trio_recycle.disconnect(sock)
    assert info.value.errno == errno.EBADF


def test_disconnect_reports_kernel_errno() -> None:
    """errno from the kernel becomes OSError: a non-socket fd gives ENOTSOCK."""
    with open("/dev/null") as f, pytest.raises(OSError) as info:
        trio_recycle.disconnect(f)
    assert info.value.errno == errno.ENOTSOCK


def test_disconnect_udp_drops_the_peer() -> None:
    """A connected UDP socket becomes unconnected."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", 9))
        trio_recycle.disconnect(sock)
        with pytest.raises(OSError) as info:
            sock.getpeername()
        assert info.value.errno == errno.ENOTCONN


def test_can_recycle_on_linux() -> None:
    """The probe succeeds on this Linux kernel (the suite runs on Linux)."""
    assert trio_recycle.can_recycle() is True


def test_can_recycle_honours_the_disable_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRIO_RECYCLE_DISABLE=1 turns recycling off; 0 or empty does not."""
    monkeypatch.setenv("TRIO_RECYCLE_DISABLE", "1")
    assert trio_recycle.can_recycle() is False
    monkeypatch.setenv("TRIO_RECYCLE_DISABLE", "0")
    assert trio_recycle.can_recycle() is True


def test_probe_result_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is probed once per process."""
    calls = []
    monkeypatch.setattr(_disconnect, "_probe_result", None)
    real_probe = _disconnect._probe

    def counting_probe() -> bool:
        calls.append(1)
        return real_probe()

    monkeypatch.setattr(_disconnect, "_probe", counting_probe)
    assert trio_recycle.can_recycle()
    assert trio_recycle.can_recycle()
    assert calls == [1]


def test_probe_says_no_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """On another platform the probe answers False without trying."""
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _disconnect._probe() is False


def test_probe_says_no_when_the_disconnect_does_not_disconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel where connect(AF_UNSPEC) leaves the connection as it was (BSD-like) fails the probe."""
    monkeypatch.setattr(_disconnect, "disconnect", lambda sock: None)
    assert _disconnect._probe() is False


def test_probe_says_no_when_the_system_call_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that refuses the disconnect (EISCONN, EOPNOTSUPP, ...) fails the probe."""

    def refuse(sock: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "refused")

    monkeypatch.setattr(_disconnect, "disconnect", refuse)
    assert _disconnect._probe() is False
