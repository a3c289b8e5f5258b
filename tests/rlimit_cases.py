"""Cases run in a subprocess with RLIMIT_NOFILE lowered (tests/test_failures.py starts them).

``python -m tests.rlimit_cases CASE PORT...``: the servers run in the parent
(pytest) process, so that their accepted connections cost this process no
descriptor; each case lowers the limit, uses up descriptors with /dev/null,
and exits 0 when every check held (an AssertionError's traceback otherwise).
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import trio
import trio.testing

import trio_recycle

from . import checks
from .checks import assert_capacity, fd_inodes
from .conftest import LocalResolver, drained, read_until_eof

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

HOST: Final = "127.0.0.1"
#: The soft limit for every case: far below the usual 1024, so that using
#: the descriptors up is quick.
LIMIT: Final = 96


@contextmanager
def descriptors_left(count: int) -> Iterator[list[int]]:
    """Open /dev/null until only ``count`` descriptors are left; close them on exit."""
    fillers: list[int] = []
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        for _ in range(count):
            os.close(fillers.pop())
        yield fillers
    finally:
        for fd in fillers:
            os.close(fd)


def assert_counts(pool: trio_recycle.SocketPool) -> None:
    """I4 from statistics() alone (listing /proc/self/fd takes a descriptor)."""
    checks.assert_counts(pool.statistics())


def sockets_open() -> set[str]:
    return {v for v in fd_inodes().values() if v.startswith("socket:")}


async def cycle(pool: trio_recycle.SocketPool, port: int) -> bytes:
    async with await pool.open_tcp_stream(HOST, port) as stream:
        await stream.send_all(b"ping")
        return await read_until_eof(stream)


async def evict_idle_on_emfile(ports: list[int]) -> None:
    """socket() fails with EMFILE while 3 sockets sit idle for other peers: one is evicted, the open succeeds."""
    async with trio_recycle.open_socket_pool(capacity=8, peer_affinity=True) as pool:
        for port in ports[:3]:
            assert await cycle(pool, port) == b"ok:ping"
        assert pool.statistics().idle == 3
        with descriptors_left(0):
            stream = await pool.open_tcp_stream(HOST, ports[3])
            stats = pool.statistics()
            assert (stats.idle, stats.in_use, stats.discarded) == (2, 1, 1), stats
        async with stream:
            await stream.send_all(b"x")
            assert await read_until_eof(stream) == b"ok:x"
        assert_capacity(pool)


async def takeover_at_the_limit(ports: list[int]) -> None:
    """Happy eyeballs at a full pool with no descriptor left: the hanging attempt is closed first."""
    good = ports[0]
    with checks.silent_address("127.0.0.2", good):
        trio.socket.set_custom_hostname_resolver(
            LocalResolver({"slow.test": [("127.0.0.2", socket.AF_INET), (HOST, socket.AF_INET)]})
        )
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            result: list[trio_recycle.RecyclingStream] = []

            async def opener() -> None:
                result.append(await pool.open_tcp_stream("slow.test", good, happy_eyeballs_delay=0.25))

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(opener)
                    await trio.testing.wait_all_tasks_blocked()
                    assert pool.statistics().in_use == 1  # the first attempt, in SYN_SENT
                    with descriptors_left(0):
                        await trio.sleep(0.5)  # the second attempt takes over
            async with result[0] as stream:
                assert stream.getpeername() == (HOST, good)
                await stream.send_all(b"x")
                assert await read_until_eof(stream) == b"ok:x"
            stats = pool.statistics()
            assert (stats.created, stats.discarded) == (2, 1), stats
            assert_capacity(pool)


async def churn_at_the_limit(ports: list[int]) -> None:
    """Tasks wait, recycle and drain while socket() keeps failing: errors are EMFILE, nobody is stuck."""
    answer, echo = ports[0], ports[1]
    errors: list[OSError] = []
    done = 0
    async with trio_recycle.open_socket_pool(capacity=8, eof_timeout=0.5) as pool:

        async def worker(number: int) -> None:
            nonlocal done
            for round_ in range(12):
                port = echo if (number + round_) % 3 == 0 else answer
                try:
                    stream = await pool.open_tcp_stream(HOST, port)
                except OSError as exc:
                    if exc.errno != errno.EMFILE:
                        raise
                    errors.append(exc)
                    continue
                async with stream:
                    await stream.send_all(b"x")
                    if port == answer:
                        assert await read_until_eof(stream) == b"ok:x"
                    # An echo is closed unread: its socket drains.
                assert_counts(pool)
            done += 1

        with descriptors_left(5), trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for number in range(16):
                    nursery.start_soon(worker, number)
        assert done == 16
        assert errors, "the limit was never reached"
        await drained(pool)
        stats = pool.statistics()
        assert stats.tasks_waiting == 0
        assert_capacity(pool)
        assert await cycle(pool, answer) == b"ok:ping"


CASES: Final[dict[str, Callable[[list[int]], Awaitable[None]]]] = {
    case.__name__: case for case in (evict_idle_on_emfile, takeover_at_the_limit, churn_at_the_limit)
}


def main(argv: list[str]) -> None:
    case, ports = CASES[argv[0]], [int(port) for port in argv[1:]]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, hard))
    before = sockets_open()
    trio.run(case, ports)
    after = sockets_open()
    assert after <= before, f"sockets left open: {sorted(after - before)}"
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
