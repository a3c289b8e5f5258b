"""The kernel facts of DESIGN.md that the code relies on, checked on this kernel.

If one of these fails on a new kernel, the module comment of
_pooled_socket.py (options) or the docs (sequence numbers) is out of date.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from itertools import pairwise
from typing import TYPE_CHECKING

import pytest

import trio_recycle
from trio_recycle._pooled_socket import RESTORABLE_OPTIONS

from .checks import listener
from .conftest import TCP_CLOSE, tcp_state

if TYPE_CHECKING:
    from collections.abc import Iterator


def use_and_recycle(client: socket.socket, server: socket.socket) -> None:
    """Connect, let the peer answer and close first, read EOF, disconnect."""
    client.connect(server.getsockname())
    peer, _ = server.accept()
    with peer:
        peer.sendall(b"answer")
    assert client.recv(100) == b"answer"
    assert client.recv(100) == b""
    trio_recycle.disconnect(client)
    assert tcp_state(client) == TCP_CLOSE
    client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


SURVIVING = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000),
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 12345),
    (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3)),
]


@pytest.mark.parametrize(("level", "option", "value"), SURVIVING)
def test_option_survives_disconnect(level: int, option: int, value: int | bytes) -> None:
    """These options keep their value across disconnect and reconnect."""
    with listener() as server, socket.socket() as client:
        client.setsockopt(level, option, value)
        use_and_recycle(client, server)
        client.connect(server.getsockname())
        server.accept()[0].close()
        size = len(value) if isinstance(value, bytes) else 0
        got = client.getsockopt(level, option, size) if size else client.getsockopt(level, option)
        assert got == value


def test_rcvbuf_survives_disconnect() -> None:
    """SO_RCVBUF survives (and reads back doubled, which is why it is not restorable)."""
    with listener() as server, socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 16384
        use_and_recycle(client, server)
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 16384


@pytest.mark.parametrize(("option", "value"), [(socket.TCP_MAXSEG, 1000), (socket.TCP_WINDOW_CLAMP, 20000)])
def test_option_reset_by_disconnect(option: int, value: int) -> None:
    """TCP_MAXSEG and TCP_WINDOW_CLAMP are cleared by tcp_disconnect(): the pool re-applies them."""
    with listener() as server, socket.socket() as client:
        client.setsockopt(socket.IPPROTO_TCP, option, value)
        use_and_recycle(client, server)
        client.connect(server.getsockname())
        server.accept()[0].close()
        assert client.getsockopt(socket.IPPROTO_TCP, option) > value


def test_ip_tos_also_sets_so_priority() -> None:
    """Setting IP_TOS changes SO_PRIORITY too (rt_tos2priority): the pool restores them as a pair."""
    with socket.socket() as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 0
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)  # IPTOS_LOWDELAY
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 6  # TC_PRIO_INTERACTIVE


def test_restorable_options_round_trip() -> None:
    """Every option the pool restores reads back exactly what was written."""
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        with listener(host) as server, socket.socket(family) as client:
            client.connect(server.getsockname())
            for level, option in RESTORABLE_OPTIONS:
                if family == socket.AF_INET and level == socket.IPPROTO_IPV6:
                    continue
                if family == socket.AF_INET6 and level == socket.IPPROTO_IP:
                    continue
                try:
                    original = client.getsockopt(level, option)
                except OSError:
                    continue  # not readable here: the pool then refuses to recycle
                client.setsockopt(level, option, original)
                assert client.getsockopt(level, option) == original, (level, option)


def _capture_syn_sequence_numbers(connects: int) -> list[int]:
    try:
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"no packet capture here: {exc}")
    with capture, listener() as server, socket.socket() as client:
        capture.bind(("lo", 0))
        capture.settimeout(0.5)
        port = server.getsockname()[1]
        for _ in range(connects):
            use_and_recycle(client, server)
        seqs: list[int] = []
        # Bounded in count and time: other loopback traffic (another test
        # run, a benchmark) would otherwise keep the capture from ever
        # timing out.
        deadline = time.monotonic() + 5
        with contextlib.suppress(TimeoutError):
            while len(seqs) < connects and time.monotonic() < deadline:
                frame = capture.recv(65535)
                ip = frame[14:]
                if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
                    continue
                tcp = ip[(ip[0] & 15) * 4 :]
                dport, seq = struct.unpack("!2xHI", tcp[:8])
                flags = tcp[13]
                if dport == port and flags & 0x02 and not flags & 0x10 and (not seqs or seqs[-1] != seq):
                    seqs.append(seq)
    return seqs


def test_next_isn_follows_the_previous_connection() -> None:
    """A reconnected socket's SYN sequence number is the old one plus a small, known step.

    tcp_disconnect() keeps write_seq and tcp_connect() then starts from
    write_seq + max_window + 2 instead of a fresh RFC 6528 value, so the
    previous peer can predict the next connection's ISN. That is why peer
    affinity (I8) is on by default where the pool cannot reset it (see
    tests/test_isn.py for the reset).
    """
    seqs = _capture_syn_sequence_numbers(connects=4)
    assert len(seqs) == 4
    steps = [(b - a) % 2**32 for a, b in pairwise(seqs)]
    # Each step is the previous connection's bytes sent + SYN/FIN + one
    # window (64 KiB on loopback): tiny compared with the 2**32 space.
    assert all(0 < step < 2**20 for step in steps), steps


def test_disconnect_of_a_fresh_socket_is_harmless() -> None:
    """Disconnecting a never-connected socket succeeds and leaves it usable."""
    with listener() as server, socket.socket() as client:
        trio_recycle.disconnect(client)
        with pytest.raises(OSError) as info:
            client.getpeername()
        assert info.value.errno == errno.ENOTCONN
        client.connect(server.getsockname())
        server.accept()[0].close()
        assert client.getpeername() == server.getsockname()


_TCP_FIN_WAIT1 = 4  # include/net/tcp_states.h
_TCP_CLOSE_WAIT = 8
_TCP_LAST_ACK = 9
_TCP_CLOSING = 11


@contextlib.contextmanager
def stalled_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connection whose client holds bytes that the server's full window keeps unsent.

    The server never reads until told, so a FIN of the client's waits in the
    write queue behind those bytes: the state between sending our FIN and
    its acknowledgement, which loopback is otherwise too fast to show.
    """
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        client.connect(lsock.getsockname())
        server, _ = lsock.accept()
    with client, server:
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):
                client.send(b"d" * 4096)
        server.settimeout(5)
        yield client, server


def wait_state(sock: socket.socket, wanted: int) -> int:
    """Poll (bounded) for a state change: the kernel offers no event for it."""
    deadline = time.monotonic() + 5
    while (state := tcp_state(sock)) != wanted and time.monotonic() < deadline:
        time.sleep(0.001)
    return state


def read_to_end(sock: socket.socket) -> int:
    """Bytes read until a clean EOF (OSError on a reset)."""
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
    return total


def unsent(sock: socket.socket) -> int:
    import fcntl
    import termios

    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])


def test_crossing_fins_stay_closing_until_ours_is_acknowledged() -> None:
    """FINs crossed: CLOSING (EOF readable) until the peer acknowledges ours, then CLOSE with everything delivered."""
    with stalled_pair() as (client, server):
        queued = unsent(client)
        client.shutdown(socket.SHUT_WR)
        assert tcp_state(client) == _TCP_FIN_WAIT1
        server.shutdown(socket.SHUT_WR)
        assert wait_state(client, _TCP_CLOSING) == _TCP_CLOSING
        assert client.recv(10) == b""  # the drain sees EOF here
        assert read_to_end(server) >= queued
        assert wait_state(client, TCP_CLOSE) == TCP_CLOSE


def test_our_fin_after_the_peers_waits_in_last_ack() -> None:
    """Our FIN after the peer's: LAST_ACK until it is acknowledged, then CLOSE (no TIME_WAIT for us)."""
    with stalled_pair() as (client, server):
        server.shutdown(socket.SHUT_WR)
        assert wait_state(client, _TCP_CLOSE_WAIT) == _TCP_CLOSE_WAIT
        client.shutdown(socket.SHUT_WR)
        assert tcp_state(client) == _TCP_LAST_ACK
        read_to_end(server)
        assert wait_state(client, TCP_CLOSE) == TCP_CLOSE


@pytest.mark.parametrize("state", ["closing", "last_ack"])
def test_disconnect_before_our_fin_is_acknowledged_drops_it(state: str) -> None:
    """A disconnect in CLOSING or LAST_ACK drops our queued bytes and FIN: the peer never sees a clean EOF."""
    with stalled_pair() as (client, server):
        if state == "closing":
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            assert wait_state(client, _TCP_CLOSING) == _TCP_CLOSING
        else:
            server.shutdown(socket.SHUT_WR)
            assert wait_state(client, _TCP_CLOSE_WAIT) == _TCP_CLOSE_WAIT
            client.shutdown(socket.SHUT_WR)
            assert tcp_state(client) == _TCP_LAST_ACK
        trio_recycle.disconnect(client)
        assert tcp_state(client) == TCP_CLOSE
        # The peer reads what it had, and its window update meets a CLOSE
        # socket: a reset, not our FIN.
        with pytest.raises(ConnectionResetError):
            read_to_end(server)
