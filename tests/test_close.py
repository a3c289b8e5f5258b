"""read_available and wait_for_fin on real connected sockets."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from typing import Final

import pytest
import trio
import trio.testing

from trio_recycle import _close as _drain
from trio_recycle._close import READ_BUDGET, read_available, wait_for_fin

from .checks import bytes_queued

_TCP_CLOSE_WAIT: Final = 8  # include/net/tcp_states.h


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setblocking(False)
    return client, server


def test_nothing_queued() -> None:
    """Nothing there: no FIN, nothing read, no blocking."""
    client, server = tcp_pair()
    with client, server:
        assert read_available(client, 100) == (False, 0)


def test_data_then_fin_queued() -> None:
    """Everything up to a queued FIN is read and the FIN is found."""
    client, server = tcp_pair()
    with client:
        server.sendall(b"x" * 1000)
        server.close()
        assert read_available(client, 10_000) == (True, 1000)


def test_stops_past_the_limit() -> None:
    """More than ``limit`` bytes queued: stop past the limit, FIN not seen."""
    client, server = tcp_pair()
    with client, server:
        server.sendall(b"x" * 200_000)
        fin, count = read_available(client, 1000)
        assert not fin
        assert count > 1000


def test_reset_raises() -> None:
    """A reset from the peer surfaces as OSError(ECONNRESET)."""
    client, server = tcp_pair()
    with client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        with pytest.raises(OSError) as info:
            read_available(client, 100)
        assert info.value.errno == errno.ECONNRESET


async def test_wait_for_fin_waits_for_a_late_fin() -> None:
    """wait_for_fin blocks until the peer's FIN, counting the bytes before it."""
    client, server = tcp_pair()
    with client:
        result: list[bool] = []

        async def waiter() -> None:
            result.append(await wait_for_fin(client, 0, 10_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            server.sendall(b"late")
            await trio.testing.wait_all_tasks_blocked()
            assert result == []
            server.close()
        assert result == [True]


async def test_wait_for_fin_gives_up_past_the_limit() -> None:
    """A peer that sends more than the limit: False, without waiting for a FIN."""
    client, server = tcp_pair()
    with client, server:
        server.sendall(b"x" * 5000)
        assert await wait_for_fin(client, 4000, 4500) is False


def test_one_call_reads_at_most_the_budget() -> None:
    """With megabytes queued and a huge limit, one call stops after READ_BUDGET bytes: the loop is not stalled."""
    client, server = tcp_pair()
    with client, server:
        server.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 8 * READ_BUDGET:
                sent += server.send(b"f" * 65536)
        assert sent > READ_BUDGET
        eof, received = read_available(client, 1 << 40)
        assert not eof
        assert 0 < received < READ_BUDGET + 65536  # the last recv() may pass the budget
        assert bytes_queued(client) > 0


def test_fin_behind_the_budget_counts_as_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of budget with the peer's FIN queued behind the rest (CLOSE_WAIT): True, though bytes remain."""
    monkeypatch.setattr(_drain, "READ_BUDGET", 16384)
    client, server = tcp_pair()
    with client, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        server.settimeout(5)
        server.sendall(b"x" * 90_000)
        server.shutdown(socket.SHUT_WR)
        # The kernel offers no event for the FIN's arrival: bounded poll.
        for _ in range(5000):
            if client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT:
                break
            time.sleep(0.001)
        eof, received = read_available(client, 1 << 30)
        assert eof
        assert 0 < received < 90_000
        assert bytes_queued(client) == 90_000 - received
