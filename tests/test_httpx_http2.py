"""trio_recycle.httpx over HTTP/2: hypercorn over TLS (trustme certificates, ALPN h2), beside stock httpx."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing

import trio_recycle

from .checks import assert_capacity, fd_inodes
from .conftest import drained

pytest.importorskip("httpx", reason="needs the httpx extra: pip install 'trio-recycle[httpx]'")
pytest.importorskip("h2", reason="needs the tests extra (h2, for httpx's HTTP/2)")
pytest.importorskip("hypercorn", reason="needs the tests extra (hypercorn)")
pytest.importorskip("trustme", reason="needs the tests extra (trustme)")

import httpx
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve

from trio_recycle.httpx import RecyclingTransport

if TYPE_CHECKING:
    from pathlib import Path

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# httpcore's own leaks leave stock httpx's sockets (the control) in reference
# cycles: collected after each test here, not in a later one (conftest.py).
pytestmark = pytest.mark.usefixtures("collect_stock_httpx_leaks")

#: Seconds a pool socket waits for hypercorn's FIN after ours. hypercorn
#: answers our FIN on an HTTP/2 connection only at its keep-alive timeout
#: (5 s), so a connection cut mid-stream drains that long; the tests keep
#: the drain short (a drain gives way to a waiting task only once it has
#: had GIVE_WAY_AFTER, and the sweep cuts hundreds of connections).
EOF_TIMEOUT = 0.2


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /path?delay=S``: waits S seconds, then answers the path."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = scope["query_string"].decode()
    if query.startswith("delay="):
        await trio.sleep(float(query.split("=", 1)[1]))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


@attrs.frozen
class H2Server:
    url: str
    context: ssl.SSLContext


StartH2Server = Callable[..., Awaitable[H2Server]]


@pytest.fixture
def start_h2_server(nursery: trio.Nursery, tmp_path: Path) -> StartH2Server:
    """Start hypercorn on 127.0.0.1 over TLS, h2 then http/1.1 by ALPN (``keep_alive_timeout=`` seconds)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    async def start(*, keep_alive_timeout: float = 5.0) -> H2Server:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.certfile, config.keyfile = str(cert), str(key)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.keep_alive_timeout = keep_alive_timeout
        config.accesslog = None
        config.loglevel = "ERROR"
        binds = await nursery.start(serve, app, config)
        return H2Server(binds[0], context)

    return start


@pytest.fixture
async def h2_server(start_h2_server: StartH2Server) -> H2Server:
    """hypercorn with its default keep-alive timeout (5 s)."""
    return await start_h2_server()


def client_sockets(server_port: int) -> int:
    """Descriptors of this process on a TCP connection to ``server_port`` (the clients' side, not hypercorn's)."""
    inodes = {target[len("socket:[") : -1] for target in fd_inodes().values() if target.startswith("socket:")}
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == server_port and fields[9] in inodes:
                    count += 1
    return count


async def test_http2_streams_share_one_connection_and_its_socket_is_recycled(h2_server: H2Server) -> None:
    """20 concurrent requests over one HTTP/2 connection (ALPN h2); the client's close gives the socket back idle."""
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        async with httpx.AsyncClient(
            transport=RecyclingTransport(pool, http2=True, verify=h2_server.context)
        ) as client:
            first = await client.get(f"{h2_server.url}/first")
            assert first.http_version == "HTTP/2"
            responses: dict[int, httpx.Response] = {}

            async def get(i: int) -> None:
                responses[i] = await client.get(f"{h2_server.url}/{i}?delay=0.05")

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(get, i)
            assert {i: r.text for i, r in responses.items()} == {i: f"/{i}" for i in range(20)}
            assert {r.http_version for r in responses.values()} == {"HTTP/2"}
            assert pool.statistics().created == 1
        # Idle when closed: ended by the disconnect, no drain.
        stats = pool.statistics()
        assert (stats.idle, stats.draining, stats.recycled) == (1, 0, 1)
        assert_capacity(pool)


class CancelAfterSteps(trio.abc.Instrument):
    """A trio instrument that cancels ``scope`` once ``task`` has run ``steps`` steps (every await it reaches)."""

    def __init__(self, steps: int, scope: trio.CancelScope) -> None:
        self.steps = steps
        self.scope = scope
        self.tasks: set[trio.lowlevel.Task] = set()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.tasks:
            self.steps -= 1
            if self.steps <= 0:
                self.scope.cancel()


#: Attempts of the deadline sweep, and the step between their deadlines (seconds).
SWEEP = 60
SWEEP_STEP = 0.0004


@pytest.mark.parametrize("ours", [True, False], ids=["recycling", "stock-httpx"])
@pytest.mark.parametrize("cancel", ["after-each-step", "deadline-sweep"])
@pytest.mark.filterwarnings(
    # httpcore's own HTTP/2 leaks (encode/httpcore 1022, 943) drop
    # connections; stock httpx's sockets then warn when collected.
    "ignore:unclosed <socket.socket:ResourceWarning",
    "ignore:Async generator .* was garbage collected:ResourceWarning",
    r"ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning",
)
async def test_http2_cancelled_anywhere(
    h2_server: H2Server, ours: bool, cancel: str, record_property: Callable[[str, object], None]
) -> None:
    """A fresh client's three requests cancelled at each step (or deadline): the next client is served in time.

    after-each-step cancels after every step the request tasks take, until
    they complete: every await. deadline-sweep cancels by time, which is
    what meets httpcore's own HTTP/2 bugs ("semaphore released too many
    times", encode/httpcore 1022 and 943). Ours: no socket is held by then
    and none is open after the pool exits. Stock httpx, the control, serves
    the next client too and leaks the connections (counted, not asserted:
    the timing decides how many).
    """
    port = int(h2_server.url.rsplit(":", 1)[1])
    errors: list[str] = []

    def make_transport() -> httpx.AsyncBaseTransport:
        if ours:
            return RecyclingTransport(pool, http2=True, verify=h2_server.context)
        return httpx.AsyncHTTPTransport(http2=True, verify=h2_server.context)

    async def get(client: httpx.AsyncClient, path: str) -> None:
        try:
            await client.get(f"{h2_server.url}{path}")
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: httpcore 1022
            errors.append(repr(exc))

    async with trio_recycle.open_socket_pool(capacity=4, eof_timeout=EOF_TIMEOUT) as pool:
        for attempt in range(1, 2000):
            async with httpx.AsyncClient(transport=make_transport()) as client:
                with trio.CancelScope() as scope:
                    instrument = CancelAfterSteps(attempt, scope)
                    if cancel == "deadline-sweep":
                        scope.deadline = trio.current_time() + attempt * SWEEP_STEP
                    else:
                        trio.lowlevel.add_instrument(instrument)
                    try:
                        async with trio.open_nursery() as nursery:
                            for i in range(3):
                                nursery.start_soon(get, client, f"/{i}?delay=0.01")
                            instrument.tasks.update(nursery.child_tasks)
                    finally:
                        if cancel != "deadline-sweep":
                            trio.lowlevel.remove_instrument(instrument)
                # The same client again: where httpcore's bugs show.
                with trio.move_on_after(4) as waited:
                    await get(client, "/same")
                if waited.cancelled_caught:
                    errors.append("timed out")
            # A fresh client on the same pool (httpcore's bug may break the
            # cancelled one's next request, with stock httpx too).
            async with httpx.AsyncClient(transport=make_transport()) as client:
                with trio.fail_after(4):  # under httpx's 5 s: no wait for a leaked socket
                    after = await client.get(f"{h2_server.url}/after")
                assert after.text == "/after"
            if (cancel == "deadline-sweep" and attempt == SWEEP) or not scope.cancelled_caught:
                break
        else:
            pytest.fail("the requests never completed")
        await drained(pool)
        # Every client is closed: a connection still open is a leak.
        leaked = client_sockets(port)
        assert pool.statistics().in_use == 0
        assert_capacity(pool)
    record_property("client_sockets_left", leaked)
    record_property("httpcore_errors", len(errors))
    if ours:
        assert leaked == 0


@pytest.mark.parametrize("ours", [True, False], ids=["recycling", "stock-httpx"])
async def test_http2_connection_closed_by_the_server(start_h2_server: StartH2Server, ours: bool) -> None:
    """hypercorn closes the idle connection: ours sends the next request on a fresh one, on the same socket, recycled.

    Stock httpx, the control, sends it on the closed connection and fails
    ("Server disconnected"): httpcore does not look at an idle HTTP/2
    connection before reusing it.
    """
    server = await start_h2_server(keep_alive_timeout=0.2)
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        transport = (
            RecyclingTransport(pool, http2=True, verify=server.context)
            if ours
            else httpx.AsyncHTTPTransport(http2=True, verify=server.context)
        )
        async with httpx.AsyncClient(transport=transport) as client:
            for i in range(3):
                if i and not ours:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.get(f"{server.url}/{i}")
                    break
                response = await client.get(f"{server.url}/{i}")
                assert (response.http_version, response.text) == ("HTTP/2", f"/{i}")
                # hypercorn's keep-alive timer runs out: no event to wait for.
                await trio.sleep(0.5)
        if ours:
            stats = pool.statistics()
            assert stats.created == 1
            assert stats.recycled == 3  # two closed by hypercorn, the last by the client's close
            assert_capacity(pool)
