"""trio_recycle.httpx used the ordinary way: shared pools, pool waits, argument checks, stale connections, idle closes.

Each behaviour is checked next to stock httpx doing the same thing (the
control), against servers in this process (tests/conftest.py's
``start_server``) speaking just enough HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

import trio_recycle

from . import checks
from .checks import assert_capacity
from .conftest import Server, StartServer, drained, time_wait_count, wait_for_time_wait

pytest.importorskip("httpx", reason="needs the httpx extra: pip install 'trio-recycle[httpx]'")
pytest.importorskip("httpcore", reason="needs the httpx extra: pip install 'trio-recycle[httpx]'")

import httpcore
import httpx

from trio_recycle._httpcore_stream import NetworkStream
from trio_recycle.httpx import RecyclingBackend, RecyclingTransport

#: Makes the transport of a client: ours over ``pool``, or stock httpx's (the control).
TransportFactory = Callable[[trio_recycle.SocketPool], httpx.AsyncBaseTransport]


# httpcore's own leaks leave stock httpx's sockets (the control) in reference
# cycles: collected after each test here, not in a later one (conftest.py).
pytestmark = pytest.mark.usefixtures("collect_stock_httpx_leaks")


def ours(pool: trio_recycle.SocketPool) -> httpx.AsyncBaseTransport:
    return RecyclingTransport(pool)


def stock(pool: trio_recycle.SocketPool) -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport()


TRANSPORTS = pytest.mark.parametrize("make_transport", [ours, stock], ids=["recycling", "stock-httpx"])


async def read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """One request head (and its Content-Length body) from ``buffer`` + ``stream``; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        rest += data
    buffer[:] = rest[length:]
    return head


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture
def peers() -> list[int]:
    """The client ports a server saw (for counting TIME_WAIT entries of this test's connections only)."""
    return []


def keep_alive_server(peers: list[int], gate: trio.Event | None = None) -> Callable[..., Awaitable[None]]:
    """Answers every request on a connection (after ``gate`` is set, if given) until the client closes."""

    async def handler(stream: trio.SocketStream, server: Server) -> None:
        peers.append(stream.socket.getpeername()[1])
        buffer = bytearray()
        while (head := await read_head(stream, buffer)) is not None:
            if gate is not None:
                await gate.wait()
            await stream.send_all(answer(head.split(b"\r\n")[0]))

    return handler


def stale_server(peers: list[int]) -> Callable[..., Awaitable[None]]:
    """Answers the first request of a connection; takes the second and closes without a byte (the idle race)."""

    async def handler(stream: trio.SocketStream, server: Server) -> None:
        peers.append(stream.socket.getpeername()[1])
        buffer = bytearray()
        head = await read_head(stream, buffer)
        if head is not None:
            await stream.send_all(answer(head.split(b"\r\n")[0]))
            await read_head(stream, buffer)

    return handler


# ----------------------------------------------------------------------
# Item 1: idle connections of one client never block another's open


@TRANSPORTS
async def test_an_idle_client_does_not_starve_another(
    start_server: StartServer, make_transport: TransportFactory
) -> None:
    """Client A fills a capacity-4 pool with keep-alive connections and goes quiet; client B is served at once."""
    peers: list[int] = []
    server = await start_server(keep_alive_server(peers))
    url = f"http://127.0.0.1:{server.port}/"
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        a = httpx.AsyncClient(transport=make_transport(pool))
        b = httpx.AsyncClient(transport=make_transport(pool))
        async with a, b:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(a.get, url)
            assert server.accepted == 4
            with trio.fail_after(2):  # far below the 5 s connect timeout a starved open would wait out
                response = await b.get(url)
            assert response.status_code == 200
        if make_transport is ours:
            stats = pool.statistics()
            assert stats.created == 4  # B took a socket back from A's idle connections
        await drained(pool)
        assert_capacity(pool)


@TRANSPORTS
async def test_a_waiting_client_gets_the_socket_of_a_connection_that_goes_idle(
    start_server: StartServer, make_transport: TransportFactory
) -> None:
    """B waits while A's 4 requests are in flight; when they end, B gets a socket, not a timeout."""
    peers: list[int] = []
    gate = trio.Event()
    server = await start_server(keep_alive_server(peers, gate))
    url = f"http://127.0.0.1:{server.port}/"
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        a = httpx.AsyncClient(transport=make_transport(pool))
        b = httpx.AsyncClient(transport=make_transport(pool))
        async with a, b, trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(a.get, url)
            with trio.fail_after(5):
                while server.accepted < 4:
                    await trio.testing.wait_all_tasks_blocked()
            done = trio.Event()

            async def b_get() -> None:
                response = await b.get(url)
                assert response.status_code == 200
                done.set()

            nursery.start_soon(b_get)
            await trio.testing.wait_all_tasks_blocked()
            if make_transport is ours:
                assert pool.statistics().tasks_waiting == 1
            gate.set()
            with trio.fail_after(2):
                await done.wait()
        await drained(pool)
        assert_capacity(pool)


@TRANSPORTS
async def test_a_client_per_job_on_one_pool(start_server: StartServer, make_transport: TransportFactory) -> None:
    """A new client per job, the old ones never closed until the end: every job is served at once."""
    peers: list[int] = []
    server = await start_server(keep_alive_server(peers))
    url = f"http://127.0.0.1:{server.port}/"
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        clients = []
        try:
            with trio.fail_after(5):
                for _ in range(8):
                    client = httpx.AsyncClient(transport=make_transport(pool))
                    clients.append(client)
                    assert (await client.get(url)).status_code == 200
        finally:
            for client in clients:
                await client.aclose()
        if make_transport is ours:
            assert pool.statistics().created == 2
        await drained(pool)
        assert_capacity(pool)


# ----------------------------------------------------------------------
# Item 2: a pool wait that times out is PoolTimeout; a slow connect is ConnectTimeout


async def test_pool_wait_is_pool_timeout_and_slow_connect_is_connect_timeout() -> None:
    """PoolTimeout names the capacity; with a socket but a listener that takes no SYN: ConnectTimeout."""
    with checks.silent_address() as (_, port), checks.listener() as other:
        async with trio_recycle.open_socket_pool(capacity=2) as pool:
            transport = RecyclingTransport(pool, limits=httpx.Limits(max_connections=10))
            async with httpx.AsyncClient(transport=transport) as client:
                timeout = httpx.Timeout(5.0, connect=0.2)
                with pytest.raises(httpx.ConnectTimeout) as connect:
                    await client.get(f"http://127.0.0.1:{port}/", timeout=timeout)
                assert not isinstance(connect.value, httpx.PoolTimeout)
                holders = [await pool.open_tcp_stream(*other.getsockname()) for _ in range(2)]
                with pytest.raises(httpx.PoolTimeout, match=r"full.*capacity 2"):
                    await client.get(f"http://127.0.0.1:{port}/", timeout=timeout)
                for holder in holders:
                    await holder.aclose()
            assert pool.statistics().tasks_waiting == 0


# ----------------------------------------------------------------------
# Item 3: argument checks


async def test_transport_and_backend_check_their_pool() -> None:
    """Anything but an open SocketPool: TypeError naming it, with a hint for the forgotten `async with`."""
    for make in (RecyclingTransport, RecyclingBackend):
        with pytest.raises(TypeError, match="SocketPool, not None"):
            make(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="async with"):
            make(trio_recycle.open_socket_pool())  # type: ignore[arg-type]
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        pass
    for make in (RecyclingTransport, RecyclingBackend):
        with pytest.raises(TypeError, match="exited its `async with` block"):
            make(pool)


async def test_a_request_after_the_pool_exited_is_a_transport_error(start_server: StartServer) -> None:
    """The pool's block exited under a client: its next request raises an httpx.TransportError saying so."""
    server = await start_server(keep_alive_server([]))
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        client = httpx.AsyncClient(transport=RecyclingTransport(pool))
    with pytest.raises(httpx.TransportError, match="SocketPool is closed"):
        await client.get(f"http://127.0.0.1:{server.port}/")
    await client.aclose()


# ----------------------------------------------------------------------
# Item 4: keep-alive defaults that fit the pool


async def test_many_hosts_reuse_connections_with_the_default_limits(start_server: StartServer) -> None:
    """30 servers, capacity 32, no limits=: after the first round every request reuses a connection."""
    servers = [await start_server(keep_alive_server([])) for _ in range(30)]
    async with (
        trio_recycle.open_socket_pool(capacity=32) as pool,
        httpx.AsyncClient(transport=RecyclingTransport(pool)) as client,
    ):
        for _ in range(3):
            for server in servers:
                assert (await client.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
        assert pool.statistics().created == 30
        assert sum(server.accepted for server in servers) == 30


# ----------------------------------------------------------------------
# Item 6: the stale-connection race


@TRANSPORTS
async def test_stale_connection_race_is_retried_for_idempotent_requests(
    start_server: StartServer, make_transport: TransportFactory
) -> None:
    """A GET on a reused connection that the server closes unanswered: ours resends it once, stock httpx fails."""
    peers: list[int] = []
    server = await start_server(stale_server(peers))
    url = f"http://127.0.0.1:{server.port}/"
    async with (
        trio_recycle.open_socket_pool(capacity=4) as pool,
        httpx.AsyncClient(transport=make_transport(pool)) as client,
    ):
        assert (await client.get(url)).status_code == 200
        if make_transport is ours:
            for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
                assert (await client.request(method, url)).status_code == 200
            assert server.accepted == 6
            # Not idempotent: never sent twice.
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(url, content=b"x")
            assert (await client.get(url)).status_code == 200
            # Idempotent, but its body was streamed and is gone: not sent twice either.
            with pytest.raises(httpx.RemoteProtocolError):
                await client.put(url, content=body())
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(url)


async def body() -> AsyncIterator[bytes]:
    yield b"streamed"


async def test_a_connection_reclaimed_under_a_request_sends_it_elsewhere(start_server: StartServer) -> None:
    """Reclaimed after httpcore gave it to a request: its write raises ConnectionNotAvailable ("try another")."""
    server = await start_server(keep_alive_server([]))
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        stream = await RecyclingBackend(pool).connect_tcp("127.0.0.1", server.port)
        assert isinstance(stream, NetworkStream)
        stream.end_idle()
        assert pool.statistics().in_use == 0
        with pytest.raises(httpcore.ConnectionNotAvailable):
            await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        await stream.aclose()


# ----------------------------------------------------------------------
# Item 7: httpx's own closes of idle connections leave no TIME_WAIT


@TRANSPORTS
@pytest.mark.parametrize("closed_by", ["client-close", "keepalive-limit"])
async def test_idle_connections_closed_by_httpx_leave_no_time_wait(
    start_server: StartServer, make_transport: TransportFactory, closed_by: str
) -> None:
    """httpx closes idle connections (its client's close, or its keep-alive limit): no TIME_WAIT either side.

    Stock httpx, the control, closes them with its FIN: one TIME_WAIT each, on the client.
    """
    peers: list[int] = []
    server = await start_server(keep_alive_server(peers))
    url = f"http://127.0.0.1:{server.port}/"
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        transport = make_transport(pool)
        if closed_by == "keepalive-limit":
            # httpcore closes an idle connection whenever it holds more than this.
            limits = httpx.Limits(max_connections=4, max_keepalive_connections=1)
            transport = (
                RecyclingTransport(pool, limits=limits)
                if make_transport is ours
                else httpx.AsyncHTTPTransport(limits=limits)
            )
        async with httpx.AsyncClient(transport=transport) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(client.get, url)
            if closed_by == "keepalive-limit":
                with trio.fail_after(5):
                    while server.finished < 3:
                        await trio.testing.wait_all_tasks_blocked()
                closed = 3
        if closed_by == "client-close":
            closed = 4
        with trio.fail_after(5):
            while server.finished < 4:
                await trio.testing.wait_all_tasks_blocked()
        if make_transport is ours:
            stats = pool.statistics()
            assert (stats.idle, stats.recycled, stats.draining) == (4, 4, 0)
    client_side = sum(time_wait_count(port, {server.port}) for port in peers)
    if make_transport is ours:
        assert client_side == 0
        assert time_wait_count(server.port, set(peers)) == 0
    else:
        assert sum(wait_for_time_wait(port, 1, remote_ports={server.port}) for port in peers) >= closed


async def test_reclaim_reaches_httpcore_where_we_expect(start_server: StartServer) -> None:
    """Fails loudly if a new httpcore moves the network stream the reclaimer ends (_connection._network_stream)."""
    from trio_recycle._httpx_parts import network_stream as _network_stream

    server = await start_server(keep_alive_server([]))
    async with (
        trio_recycle.open_socket_pool(capacity=1) as pool,
        httpx.AsyncClient(transport=RecyclingTransport(pool)) as client,
    ):
        await client.get(f"http://127.0.0.1:{server.port}/")
        transport = client._transport
        assert isinstance(transport, RecyclingTransport)
        (connection,) = transport._connections.connections
        assert isinstance(connection, httpcore.AsyncHTTPConnection)
        assert isinstance(_network_stream(connection), NetworkStream)
        assert connection.is_idle()
        (candidate,) = transport.idle_connections()
        assert not candidate.expired
