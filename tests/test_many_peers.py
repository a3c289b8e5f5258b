"""Issue 16's trial: 2,000 exchanges over 50 peers (127.0.0.2 to .51), 32 tasks, ``capacity=32``, default options.

Done means: no failed exchange, no cross-talk, ``socket()`` calls at most
twice the capacity and TIME_WAIT entries at most 1% of the exchanges on
either side, for servers that close after each answer and for servers
that keep alive (the client releasing each connection). The bound on
``socket()`` calls holds only where idle sockets may serve any peer, with
fresh ISNs: root on CI.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import TYPE_CHECKING

import pytest
import trio

import trio_recycle

from .conftest import KeepAlive, answer_then_close, exchange, keep_alive, read_until_eof

if TYPE_CHECKING:
    from .conftest import Handler, Server, StartServer

PEERS = 50
EXCHANGES = 2000
TASKS = 32
CAPACITY = 32
#: TCP state TIME_WAIT in /proc/net/tcp.
TIME_WAIT = "06"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="fresh ISNs (no affinity by default) need CAP_NET_ADMIN")


def _address(field: str) -> tuple[bytes, int]:
    address, _, port = field.partition(":")
    return struct.pack("<I", int(address, 16)), int(port, 16)  # /proc/net/tcp: host byte order


def time_wait_toward(servers: list[Server]) -> tuple[int, int]:
    """TIME_WAIT entries now: (client side, toward one of ``servers``; servers' side)."""
    wanted = {(socket.inet_aton(server.host), server.port) for server in servers}
    client = peer = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == TIME_WAIT:
                client += _address(fields[2]) in wanted
                peer += _address(fields[1]) in wanted
    return client, peer


async def settled_time_wait(servers: list[Server]) -> tuple[int, int]:
    """The TIME_WAIT counts once the last FINs have crossed loopback (polled, bounded: no event exists)."""
    last = time_wait_toward(servers)
    for _ in range(30):
        await trio.sleep(0.01)
        now = time_wait_toward(servers)
        if now == last:
            return now
        last = now
    return last


async def trial(start_server: StartServer, handler: Handler, *, keep: bool) -> None:
    servers = [await start_server(handler, f"127.0.0.{2 + number}") for number in range(PEERS)]
    before = time_wait_toward(servers)
    failures: list[str] = []
    todo = iter(range(EXCHANGES))
    with trio.fail_after(60):
        async with trio_recycle.open_socket_pool(capacity=CAPACITY) as pool:
            assert pool.fresh_isns

            async def worker() -> None:
                for number in todo:
                    server = servers[number % PEERS]
                    payload = b"x%d" % number
                    try:
                        with trio.fail_after(10):
                            stream = await pool.open_tcp_stream(server.host, server.port)
                            async with stream:
                                if keep:
                                    _, _, echoed = await exchange(stream, payload)
                                    await stream.release()
                                else:
                                    await stream.send_all(payload)
                                    echoed = (await read_until_eof(stream)).removeprefix(b"ok:")
                    except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                        failures.append(f"{number}: {exc!r}")
                        continue
                    if echoed != payload:
                        failures.append(f"{number}: cross-talk, got {echoed!r}")

            async with trio.open_nursery() as nursery:
                for _ in range(TASKS):
                    nursery.start_soon(worker)
            stats = pool.statistics()
        client, peer = await settled_time_wait(servers)
    assert failures == []
    assert stats.created <= 2 * CAPACITY, stats
    time_wait = (client - before[0], peer - before[1])
    assert max(time_wait) <= EXCHANGES // 100, (time_wait, stats)


@needs_root
async def test_fifty_peers_servers_that_close(start_server: StartServer) -> None:
    """Servers that close after each answer: the trial's bounds hold."""
    await trial(start_server, answer_then_close, keep=False)


@needs_root
async def test_fifty_peers_servers_that_keep_alive(start_server: StartServer) -> None:
    """Servers that keep alive, the client releasing every connection: the trial's bounds hold."""
    await trial(start_server, keep_alive(KeepAlive()), keep=True)
