"""The examples' key paths: the reverse proxy in-process, the scripts as subprocesses."""

from __future__ import annotations

import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

import trio_recycle

pytest.importorskip("h11", reason="the examples need the `examples` extra")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The examples are scripts, not a package: import them from their folder.
sys.path.insert(0, str(EXAMPLES))
import reverse_proxy  # noqa: E402
import run_all  # noqa: E402
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


async def start_upstream(nursery: trio.Nursery, *, delay: float = 0.0, size: int = 0) -> tuple[str, int]:
    """The upstream_server example, in this process."""
    config = upstream_server.Config(host="127.0.0.1", port=0, size=size, delay=delay)
    address: tuple[str, int] = await nursery.start(upstream_server.serve, config, upstream_server.Counters())
    return address


async def start_raw_upstream(nursery: trio.Nursery, answer: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """A server whose every connection is handled by ``answer``."""
    listeners: list[trio.SocketListener] = await nursery.start(trio.serve_tcp, answer, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@asynccontextmanager
async def running_proxy(host: str, port: int, *, upstream_timeout: float = 5.0) -> AsyncIterator[Proxy]:
    """The reverse proxy over a pool of capacity 8, serving on a free port."""
    async with trio_recycle.open_socket_pool(capacity=8) as pool:
        proxy = reverse_proxy.Proxy(reverse_proxy.PooledUpstream(pool, host, port), b"upstream", upstream_timeout)
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


async def settled(pool: trio_recycle.SocketPool) -> trio_recycle.PoolStatistics:
    """The pool's statistics once no socket is in use or draining; every socket accounted for."""
    await eventually(lambda: pool.statistics().in_use == pool.statistics().draining == 0)
    stats = pool.statistics()
    assert stats.idle == stats.created - stats.discarded, stats
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
        async with reverse_proxy.open_upstream(host, port, mode="plain", capacity=8) as upstream:
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
            await trio.sleep(0.1)  # the last FIN reaches the proxy, which recycles
            report = await proxy.stop()
    assert "proxy: 2 requests, responses 200=2, 0 aborted" in report
    assert "in_use=0" in report
    assert "recycled=2" in report


async def test_fetcher_and_demo_run_clean(nursery: trio.Nursery) -> None:
    host, port = await start_upstream(nursery)
    fetcher = [sys.executable, str(EXAMPLES / "fetcher.py"), "--upstream", f"{host}:{port}", "--requests", "100"]
    demo = [sys.executable, str(EXAMPLES / "demo.py"), "--duration", "0.3", "--rounds", "1", "--connections", "4"]
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as inner:
            results: dict[str, subprocess.CompletedProcess[bytes]] = {}

            async def run(name: str, argv: list[str]) -> None:
                results[name] = await trio.run_process(argv, capture_stdout=True, check=False)

            inner.start_soon(run, "fetcher", fetcher)
            inner.start_soon(run, "demo", demo)
    fetched, demoed = results["fetcher"], results["demo"]
    assert fetched.returncode == 0, fetched.stdout.decode()
    assert b"TIME_WAIT left on server" in fetched.stdout
    assert demoed.returncode == 0, demoed.stdout.decode()
    assert b"[ok] no TIME_WAIT on the upstream with recycling" in demoed.stdout


def test_run_all_checks_every_example() -> None:
    covered = {script for _, scripts in run_all.CHECKS for script in scripts}
    scripts = {path.name for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    assert scripts - run_all.NOT_EXAMPLES <= covered
