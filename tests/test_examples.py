"""The examples' key paths: the reverse proxy in-process, the scripts as subprocesses."""

from __future__ import annotations

import math
import re
import socket
import sys
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing

import trio_recycle

from . import checks

pytest.importorskip("h11", reason="the examples need the `examples` extra")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The examples are scripts, not a package: import them from their folder.
sys.path.insert(0, str(EXAMPLES))
import fetcher  # noqa: E402
import reverse_proxy  # noqa: E402
import run_all  # noqa: E402
import udp_query  # noqa: E402
import upstream_server  # noqa: E402

if TYPE_CHECKING:
    import subprocess
    from collections.abc import AsyncIterator, Awaitable, Callable

TEST_TIMEOUT = 15


@attrs.frozen
class Proxy:
    proxy: reverse_proxy.Proxy
    pool: trio_recycle.SocketPool
    address: str


async def start_upstream(
    nursery: trio.Nursery,
    *,
    delay: float = 0.0,
    size: int = 0,
    keepalive_requests: int = 1,
    keepalive_timeout: float = 5.0,
    counters: upstream_server.Counters | None = None,
) -> tuple[str, int]:
    """The upstream_server example, in this process."""
    config = upstream_server.Config(
        host="127.0.0.1",
        port=0,
        size=size,
        delay=delay,
        keepalive_requests=keepalive_requests,
        keepalive_timeout=keepalive_timeout,
    )
    counters = upstream_server.Counters() if counters is None else counters
    address: tuple[str, int] = await nursery.start(upstream_server.serve, config, counters)
    return address


async def start_raw_upstream(nursery: trio.Nursery, answer: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """A server whose every connection is handled by ``answer``."""
    listeners: list[trio.SocketListener] = await nursery.start(trio.serve_tcp, answer, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@asynccontextmanager
async def running_proxy(
    host: str,
    port: int,
    *more: tuple[str, int],
    upstream_timeout: float = 5.0,
    keepalive: bool = True,
    retry_stale: bool = True,
    capacity: int = 8,
) -> AsyncIterator[Proxy]:
    """The reverse proxy over a pool of capacity 8, serving on a free port; ``more`` upstreams in turn."""
    async with trio_recycle.open_socket_pool(capacity=capacity) as pool:
        upstream = reverse_proxy.PooledUpstream(pool, reverse_proxy.RoundRobin(((host, port), *more)), keepalive)
        proxy = reverse_proxy.Proxy(upstream, b"upstream", upstream_timeout, retry_stale)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, proxy.handle, listeners)
            yield Proxy(proxy, pool, address)
            nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, polling; fail after ``seconds``."""
    for _ in range(int(seconds * 100)):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"still false after {seconds} s")


def _connected_to(port: int) -> int:
    """Sockets on this machine connected (ESTABLISHED or CLOSE_WAIT) to local port ``port`` as their remote port."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and int(fields[3], 16) in (1, 8):
                    count += 1
    return count


async def wait_until_disconnected_from(port: int, seconds: float = 5.0) -> None:
    """Poll (bounded) until no socket is connected to ``port``: the kernel gives no event for another process."""
    await eventually(lambda: _connected_to(port) == 0, seconds)


async def settled(pool: trio_recycle.SocketPool) -> trio_recycle.PoolStatistics:
    """The pool's statistics once no socket is in use or draining; every socket accounted for."""
    await eventually(lambda: pool.statistics().in_use == pool.statistics().draining == 0)
    stats = pool.statistics()
    assert stats.idle + stats.parked == stats.created - stats.discarded, stats
    return stats


def get(path: str) -> bytes:
    return run_all.get(path)


async def test_kept_alive_requests_are_proxied_over_recycled_sockets(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery, size=64)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            post = b"POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
            responses = await run_all.exchange(proxy.address, get("/one"), get("/two"), post)
            assert [r.status for r in responses] == [200, 200, 200]
            assert responses[0].body.startswith(b"GET /one\n")
            assert responses[1].body.startswith(b"GET /two\n")
            assert responses[2].body.startswith(b"POST /three\nbody")
            assert all(len(r.body) == 64 for r in responses)
            stats = await settled(proxy.pool)
    assert stats.recycled == 3
    assert stats.created + stats.reused == 3
    assert stats.discarded == 0
    assert proxy.proxy.stats.statuses == {200: 3}


async def test_malformed_request_gets_400(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            (response,) = await run_all.exchange(proxy.address, b"NONSENSE\r\n\r\n")
            assert response.status == 400
            assert response.headers["connection"] == "close"
            stats = await settled(proxy.pool)
    assert stats.created == 0


async def test_connect_gets_405_without_an_upstream_connection(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
            (response,) = await run_all.exchange(proxy.address, connect)
            assert response.status == 405
            assert proxy.pool.statistics().created == 0


async def test_unreachable_upstream_gets_502_and_the_client_connection_lives_on() -> None:
    with socket.socket() as refusing, trio.fail_after(TEST_TIMEOUT):
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        async with running_proxy("127.0.0.1", refusing.getsockname()[1]) as proxy:
            responses = await run_all.exchange(proxy.address, get("/a"), get("/b"))
            assert [r.status for r in responses] == [502, 502]
            assert b"Connection refused" in responses[0].body
            stats = await settled(proxy.pool)
    assert stats.created == stats.discarded == 2


async def test_slow_upstream_gets_504_in_time(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery, delay=5)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port, upstream_timeout=0.3) as proxy:
            start = trio.current_time()
            (response,) = await run_all.exchange(proxy.address, get("/slow"))
            assert response.status == 504
            assert trio.current_time() - start < 2
            # The socket waits in the pool's drain for the upstream's late
            # answer and FIN; it is not in use.
            assert proxy.pool.statistics().in_use == 0


async def test_upstream_talking_nonsense_gets_502(nursery: trio.Nursery) -> None:
    async def nonsense(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")

    port = await start_raw_upstream(nursery, nonsense)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy("127.0.0.1", port) as proxy:
            (response,) = await run_all.exchange(proxy.address, get("/"))
            assert response.status == 502
            await settled(proxy.pool)


async def test_upstream_dying_mid_response_cuts_the_client_and_leaks_nothing(nursery: trio.Nursery) -> None:
    async def dies(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten..")

    port = await start_raw_upstream(nursery, dies)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy("127.0.0.1", port) as proxy:
            with pytest.raises((run_all.CheckFailed, trio.BrokenResourceError)):
                await run_all.exchange(proxy.address, get("/"))
            await settled(proxy.pool)
            await eventually(lambda: proxy.proxy.stats.aborted == 1)


async def test_client_leaving_before_the_answer_leaks_nothing(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery, delay=0.2)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            proxy_host, _, proxy_port = proxy.address.rpartition(":")
            for _ in range(3):
                stream = await trio.open_tcp_stream(proxy_host, int(proxy_port))
                async with stream:
                    await stream.send_all(get("/gone"))
            await eventually(lambda: proxy.proxy.stats.requests == 3)
            await settled(proxy.pool)


async def test_plain_mode_uses_trio_open_tcp_stream(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery)
    with trio.fail_after(TEST_TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with reverse_proxy.open_upstream([(host, port)], mode="plain", capacity=8) as upstream:
            proxy = reverse_proxy.Proxy(upstream, b"upstream", 5.0)
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.serve_listeners, proxy.handle, listeners)
                address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
                responses = await run_all.exchange(address, get("/a"), get("/b"))
                inner.cancel_scope.cancel()
            assert [r.status for r in responses] == [200, 200]
            # Two upstream connections, and this test's own client connection.
            assert upstream.report()[-1] == "upstream socket() calls: 3"


async def test_command_line_proxy_prints_pool_statistics_on_sigint(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery)
    argv = [
        sys.executable,
        str(EXAMPLES / "reverse_proxy.py"),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"{host}:{port}",
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with run_all.serve(argv, run_all.LISTENING) as proxy:
            responses = await run_all.exchange(proxy.address, get("/cli"), get("/cli"))
            assert [r.status for r in responses] == [200, 200]
            # The last FIN reaches the proxy (another process), which
            # recycles: until none of its upstream connections is left
            # connected (a kernel state, polled with a bound).
            await wait_until_disconnected_from(port)
            report = await proxy.stop()
    assert "proxy: 2 requests, responses 200=2, 0 aborted" in report
    assert "in_use=0" in report
    assert "recycled=2" in report


async def test_fetcher_and_demo_run_clean(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery)
    fetcher = [sys.executable, str(EXAMPLES / "fetcher.py"), "--upstream", f"{host}:{port}", "--requests", "100"]
    demo = [sys.executable, str(EXAMPLES / "demo.py"), "--duration", "0.3", "--rounds", "1", "--connections", "4"]
    # The two modes that recycle, whose TIME_WAIT the demo checks; run_all.py runs all four.
    demo += ["--modes", "recycle,keepalive"]
    with trio.fail_after(2 * TEST_TIMEOUT):
        async with trio.open_nursery() as inner:
            results: dict[str, subprocess.CompletedProcess[bytes]] = {}

            async def run(name: str, argv: list[str]) -> None:
                results[name] = await trio.run_process(argv, capture_stdout=True, check=False)

            inner.start_soon(run, "fetcher", fetcher)
            inner.start_soon(run, "demo", demo)
    fetched, demoed = results["fetcher"], results["demo"]
    assert fetched.returncode == 0, fetched.stdout.decode()
    # Only its own connections' entries: never negative, never more than its requests.
    time_wait = re.search(rb"TIME_WAIT left on server +(-?\d+) +(-?\d+)", fetched.stdout)
    assert time_wait is not None, fetched.stdout.decode()
    assert int(time_wait[1]) == 0
    assert 0 <= int(time_wait[2]) <= 100
    assert demoed.returncode == 0, demoed.stdout.decode()
    assert b"[ok] no TIME_WAIT on the upstream with recycling only" in demoed.stdout
    assert b"[ok] no TIME_WAIT on the upstream with keep-alive + recycling" in demoed.stdout


async def test_crawler_runs_clean() -> None:
    """The crawler over 10 peers, both server kinds: every answer its own; no TIME_WAIT where servers close first."""
    argv = [sys.executable, str(EXAMPLES / "crawler.py"), "--peers", "10", "--requests", "200", "--capacity", "8"]
    with trio.fail_after(2 * TEST_TIMEOUT):
        closing = await trio.run_process([*argv, "--servers", "close"], capture_stdout=True, check=False)
        keeping = await trio.run_process([*argv, "--servers", "keepalive"], capture_stdout=True, check=False)
    for result in (closing, keeping):
        assert result.returncode == 0, result.stdout.decode()
        assert b"200 of 200 requests ok" in result.stdout
        assert b"cross-talk" not in result.stdout
    assert re.search(rb"TIME_WAIT left: client 0, servers 0", closing.stdout), closing.stdout.decode()
    calls = re.search(rb"socket\(\) calls: (\d+)", closing.stdout)
    assert calls is not None
    if b"fresh ISNs: yes" in closing.stdout:
        assert int(calls[1]) <= 8, closing.stdout.decode()


# ---------------------------------------------------------------------------
# Keep-alive: upstream connections released after a clean response


async def test_keepalive_upstream_serves_every_request_on_one_connection(nursery: trio.Nursery) -> None:
    """A keep-alive upstream: one socket, one connect, every later request on the parked connection."""
    host, port = await start_upstream(nursery, keepalive_requests=100)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            requests = [get(f"/{number}") for number in range(5)]
            responses = await run_all.exchange(proxy.address, *requests)
            assert [r.status for r in responses] == [200] * 5
            assert [r.body for r in responses] == [f"GET /{number}\n".encode() for number in range(5)]
            stats = await settled(proxy.pool)
    assert (stats.created, stats.kept_alive, stats.parked) == (1, 4, 1)
    assert stats.discarded == stats.recycled == 0


async def test_upstream_closing_after_k_requests_is_recycled_never_kept(nursery: trio.Nursery) -> None:
    """Its K-th answer says Connection: close: the proxy reads its FIN and recycles; nothing is parked then."""
    host, port = await start_upstream(nursery, keepalive_requests=2)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            responses = await run_all.exchange(proxy.address, *[get(f"/{number}") for number in range(5)])
            assert [r.status for r in responses] == [200] * 5
            stats = await settled(proxy.pool)
    # Requests 1, 3, 5 open a connection (the socket recycled after 2 and 4),
    # requests 2 and 4 continue the parked one.
    assert (stats.created, stats.kept_alive, stats.recycled) == (1, 2, 2)
    assert stats.parked == 1
    assert stats.discarded == 0


async def test_no_keepalive_sends_connection_close_and_parks_nothing(nursery: trio.Nursery) -> None:
    """The old behaviour: a connection per request, even to an upstream that would keep it."""
    host, port = await start_upstream(nursery, keepalive_requests=100)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port, keepalive=False) as proxy:
            responses = await run_all.exchange(proxy.address, get("/a"), get("/b"), get("/c"))
            assert [r.status for r in responses] == [200] * 3
            stats = await settled(proxy.pool)
    assert (stats.kept_alive, stats.parked, stats.recycled) == (0, 0, 3)


OK_KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="http-1.0"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", id="close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nok", id="body-to-eof"),
    ],
)
async def test_a_response_that_forbids_keepalive_is_never_released(nursery: trio.Nursery, answer: bytes) -> None:
    """HTTP/1.0, Connection: close, a body ended by the upstream's EOF: the connection is not parked."""

    async def answers(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(answer)

    port = await start_raw_upstream(nursery, answers)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy("127.0.0.1", port) as proxy:
            host, _, proxy_port = proxy.address.rpartition(":")
            stream = await trio.open_tcp_stream(host, int(proxy_port))
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b"".join([chunk async for chunk in stream])
            assert data.startswith(b"HTTP/1.1 200 ")
            assert b"ok" in data.partition(b"\r\n\r\n")[2]
            stats = await settled(proxy.pool)
    assert (stats.parked, stats.kept_alive) == (0, 0)
    assert stats.created == 1


POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"


@pytest.mark.parametrize("gap", [None, 0.0, 0.05], ids=["same-write", "next-write", "while-parked"])
async def test_bytes_past_the_end_of_a_response_never_reach_the_next_client(
    nursery: trio.Nursery, gap: float | None
) -> None:
    """Response-queue poisoning: a valid-looking second response after the first is never relayed.

    Sent in the same write, h11 holds it past the end of the first response
    and the proxy does not release; sent right after, ``release()`` finds it
    queued; sent later, the pool's watch finds it while parked. Whichever
    catches it, the next request gets its own answer.
    """

    # One message per poison sent: the test waits for it instead of a fixed sleep.
    poison_sent, poison_seen = trio.open_memory_channel[None](math.inf)

    async def poisoner(stream: trio.SocketStream) -> None:
        async with stream:
            buffer = bytearray()
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some()
                    if not data:
                        return
                    buffer += data
                line = bytes(buffer[: buffer.index(b"\r\n")])
                del buffer[: buffer.index(b"\r\n\r\n") + 4]
                body = line.split()[1]
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                if gap is None:
                    await stream.send_all(answer + POISON)
                    poison_sent.send_nowait(None)
                    continue
                await stream.send_all(answer)
                await trio.sleep(gap)
                await stream.send_all(POISON)
                poison_sent.send_nowait(None)

    port = await start_raw_upstream(nursery, poisoner)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy("127.0.0.1", port) as proxy:
            for number in range(4):
                (response,) = await run_all.exchange(proxy.address, get(f"/{number}"))
                assert (response.status, response.body) == (200, f"/{number}".encode())
                # The poison is sent, and the proxy's pool has acted on it
                # (its watch, or release()) before the next request.
                await poison_seen.receive()
                await trio.testing.wait_all_tasks_blocked()
            stats = await settled(proxy.pool)
    assert stats.kept_alive == 0
    assert stats.discarded + stats.parked + stats.idle <= stats.created


async def test_stale_kept_alive_connection_retries_an_idempotent_request(nursery: trio.Nursery) -> None:
    """The upstream closes a kept-alive connection on our request: GET is sent again, POST gets 502."""

    async def forgets(stream: trio.SocketStream) -> None:
        # Answers the first request of each connection, then takes the next
        # one and closes without a word, as an idle timeout crossing the
        # request on the wire does.
        async with stream:
            buffer = bytearray()
            for number in range(2):
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some()
                    if not data:
                        return
                    buffer += data
                del buffer[: buffer.index(b"\r\n\r\n") + 4]
                if number == 0:
                    await stream.send_all(OK_KEEP)

    port = await start_raw_upstream(nursery, forgets)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy("127.0.0.1", port, capacity=1) as proxy:
            first, second = await run_all.exchange(proxy.address, get("/1"), get("/2"))
            assert (first.status, second.status) == (200, 200)
            assert proxy.proxy.stats.retried == 1
            post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
            (refused,) = await run_all.exchange(proxy.address, post)
            assert refused.status == 502
            assert proxy.proxy.stats.retried == 1
            stats = await settled(proxy.pool)
    assert stats.kept_alive == 2


async def test_a_fresh_connection_that_fails_is_not_retried(nursery: trio.Nursery) -> None:
    """Only a kept-alive connection may be stale: a new one that fails is the upstream's failure."""

    async def hangs_up(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()

    port = await start_raw_upstream(nursery, hangs_up)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy("127.0.0.1", port) as proxy:
            (response,) = await run_all.exchange(proxy.address, get("/"))
            assert response.status == 502
            assert proxy.proxy.stats.retried == 0
            await settled(proxy.pool)


async def test_upstreams_are_taken_in_turn(nursery: trio.Nursery) -> None:
    """--upstream twice: requests alternate between the two, each with its own kept-alive connection."""
    first, second = upstream_server.Counters(), upstream_server.Counters()
    host, port = await start_upstream(nursery, keepalive_requests=100, counters=first)
    other = await start_upstream(nursery, keepalive_requests=100, counters=second)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port, other) as proxy:
            responses = await run_all.exchange(proxy.address, *[get(f"/{number}") for number in range(6)])
            assert [r.status for r in responses] == [200] * 6
            stats = await settled(proxy.pool)
    assert (first.served, second.served) == (3, 3)
    assert (stats.created, stats.kept_alive, stats.parked) == (2, 4, 2)


async def test_idle_timeout_equal_to_the_gap_loses_no_request() -> None:
    """The stale-connection race: the upstream closes after T idle, clients pause T; 0 of 1,000 fail.

    The upstream runs in its own process, so that its close and our
    request really cross; the retry of `Proxy.start` must save every one.
    """
    gap, clients, rounds = 0.02, 20, 50
    argv = [
        sys.executable,
        str(EXAMPLES / "upstream_server.py"),
        "--listen",
        "127.0.0.1:0",
        "--keepalive-requests",
        "100000",
        "--keepalive-timeout",
        str(gap),
    ]
    failures: list[str] = []
    with trio.fail_after(60):
        async with run_all.serve(argv, run_all.LISTENING) as upstream:
            async with running_proxy(upstream.host, upstream.port, capacity=clients) as proxy:

                async def client(number: int) -> None:
                    host, _, port = proxy.address.rpartition(":")
                    stream = await trio.open_tcp_stream(host, int(port))
                    async with stream:
                        buffer = bytearray()
                        for sequence in range(rounds):
                            path = f"/{number}/{sequence}"
                            await stream.send_all(get(path))
                            response = await run_all.read_response(stream, buffer)
                            if response.status != 200 or response.body != f"GET {path}\n".encode():
                                failures.append(f"{path}: {response.status} {response.body[:80]!r}")
                            await trio.sleep(gap)

                async with trio.open_nursery() as clients_nursery:
                    for number in range(clients):
                        clients_nursery.start_soon(client, number)
                stats = await settled(proxy.pool)
            report = await upstream.stop()
    assert failures == [], (proxy.proxy.stats, stats)
    assert proxy.proxy.stats.requests == clients * rounds
    print(f"retried {proxy.proxy.stats.retried}; {stats}; upstream: {report.strip()}")
    # The upstream closed idle connections under our feet, many times.
    closed = re.search(r"closed (\d+) idle connections", report)
    assert closed is not None, report
    assert int(closed[1]) > 0


async def test_head_and_post_keep_the_connection_alive(nursery: trio.Nursery) -> None:
    """A HEAD answer has no body and a POST's body is read to its end: both leave the connection parked."""
    host, port = await start_upstream(nursery, keepalive_requests=100, size=16)
    head = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
    with trio.fail_after(TEST_TIMEOUT):
        async with running_proxy(host, port) as proxy:
            proxy_host, _, proxy_port = proxy.address.rpartition(":")
            stream = await trio.open_tcp_stream(proxy_host, int(proxy_port))
            async with stream:
                await stream.send_all(head)
                buffer = bytearray()
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive_some()
                assert buffer.startswith(b"HTTP/1.1 200 ")
                assert buffer.endswith(b"\r\n\r\n")
            (posted,) = await run_all.exchange(proxy.address, post)
            assert posted.body.startswith(b"POST /p\nbody")
            stats = await settled(proxy.pool)
    assert (stats.created, stats.kept_alive, stats.parked) == (1, 1, 1)


def test_command_line_takes_several_upstreams_and_the_keepalive_switches() -> None:
    args = reverse_proxy.parse_args(
        ["--upstream", "127.0.0.1:1", "--upstream", "[::1]:2", "--capacity-per-peer", "3", "--no-keepalive"]
    )
    assert args.upstreams == (("127.0.0.1", 1), ("::1", 2))
    assert (args.capacity_per_peer, args.mode) == (3, "recycle")
    assert reverse_proxy.parse_args(["--upstream", "h:1"]).mode == "keepalive"
    assert reverse_proxy.parse_args(["--upstream", "h:1", "--no-recycle"]).mode == "keepalive-no-recycle"
    assert reverse_proxy.parse_args(["--upstream", "h:1", "--no-recycle", "--no-keepalive"]).mode == "no-recycle"
    assert reverse_proxy.parse_args(["--upstream", "h:1", "--plain"]).mode == "plain"
    with pytest.raises(SystemExit):
        reverse_proxy.parse_args(["--upstream", "h:1", "--capacity-per-peer", "0"])


def test_run_all_checks_every_example() -> None:
    covered = {script for _, scripts in run_all.CHECKS for script in scripts}
    scripts = {path.name for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    assert scripts - run_all.NOT_EXAMPLES <= covered


async def test_udp_query_skips_an_answer_to_another_query(nursery: trio.Nursery) -> None:
    """A datagram with another query's id (a late answer to an earlier port owner) is skipped and counted."""
    server = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def answer_late_first() -> None:
        with server:
            data, address = await server.recvfrom(2048)
            await server.sendto(b"answer query 999", address)
            await server.sendto(b"answer " + data, address)

    nursery.start_soon(answer_late_first)
    skipped: Counter[str] = Counter()
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        with trio.fail_after(TEST_TIMEOUT):
            assert await udp_query.query(pool, "127.0.0.1", port, 7, skipped) == b"answer query 7"
    assert skipped == Counter({"answers to other queries": 1})


def test_fetcher_counts_time_wait_of_its_own_connections_only() -> None:
    """A TIME_WAIT entry on the server's port from a client port the run never used does not count."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            client_port = client.getsockname()[1]
            conn, _ = listener.accept()
            conn.close()  # the server closes first: its side goes to TIME_WAIT after our FIN
        for _ in range(500):
            if fetcher.count_time_wait(port, {client_port}) == 1:
                break
            time.sleep(0.01)
        assert fetcher.count_time_wait(port, {client_port}) == 1
        assert fetcher.count_time_wait(port, {client_port + 1 if client_port < 65535 else 1}) == 0
