"""Real loopback servers, kernel probes and Hypothesis profiles for the tests."""

from __future__ import annotations

import gc
import math
import os
import socket
import struct
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

from .checks import fd_inodes

# The benchmarks' harness (benchmarks/harness/counters.py) holds the one TIME_WAIT counter,
# on sys.path here, so that the subprocesses importing this module (tests/rlimit_cases.py) find it too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from harness.counters import time_wait_count as time_wait_count

if TYPE_CHECKING:
    from trio_recycle._pool import SocketPool


settings.register_profile("default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TCP_ESTABLISHED = 1
TCP_CLOSE = 7


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


LOOPBACKS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback"))]


@pytest.fixture(params=LOOPBACKS)
def loopback(request: pytest.FixtureRequest) -> str:
    """Each loopback address this machine has."""
    host: str = request.param
    return host


# ----------------------------------------------------------------------
# Servers: real listening sockets served by tasks in the test's nursery.

Handler = Callable[[trio.SocketStream, "Server"], Awaitable[None]]


@attrs.define(eq=False)
class Server:
    """A listening loopback server and what it saw."""

    host: str
    port: int
    accepted: int = 0
    received: list[bytes] = attrs.field(factory=list)
    #: Errors the server's side of a connection saw (e.g. a reset).
    errors: list[BaseException] = attrs.field(factory=list)
    finished: int = 0
    last_id: int = 0
    finished_event: trio.Event = attrs.field(factory=trio.Event)

    def new_id(self) -> int:
        """A number unique to one connection of this server."""
        self.last_id += 1
        return self.last_id

    def note_finished(self) -> None:
        self.finished += 1
        self.finished_event.set()
        self.finished_event = trio.Event()


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> StartServer:
    """Start a server running ``handler(stream, server)`` per connection."""

    async def start(handler: Handler, host: str = "127.0.0.1") -> Server:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        await sock.bind((host, 0))
        sock.listen(1024)
        server = Server(host, sock.getsockname()[1])
        listener = trio.SocketListener(sock)

        async def run_one(stream: trio.SocketStream) -> None:
            try:
                await handler(stream, server)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                server.errors.append(exc)
            finally:
                await trio.aclose_forcefully(stream)
                server.note_finished()

        async def accept_loop() -> None:
            async with listener:
                while True:
                    stream = await listener.accept()
                    server.accepted += 1
                    nursery.start_soon(run_one, stream)

        nursery.start_soon(accept_loop)
        return server

    return start


async def read_until_eof(stream: trio.abc.ReceiveStream, limit: int = 1 << 22) -> bytes:
    """Read everything up to EOF (at most ``limit`` bytes)."""
    chunks = bytearray()
    while len(chunks) < limit:
        chunk = await stream.receive_some()
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


async def answer_then_close(stream: trio.SocketStream, server: Server) -> None:
    """Read one request, answer ``ok:<request>``, close first (the common case)."""
    data = await stream.receive_some()
    server.received.append(data)
    await stream.send_all(b"ok:" + data)
    await stream.aclose()


async def echo_tagged(stream: trio.SocketStream, server: Server) -> None:
    """Prefix the connection with its number, echo until EOF, then close."""
    tag = b"<%d>" % server.new_id()
    await stream.send_all(tag)
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.aclose()


async def answer_then_reset(stream: trio.SocketStream, server: Server) -> None:
    """Answer, then close with SO_LINGER 0: the client gets an RST."""
    await stream.receive_some()
    await stream.send_all(b"bye")
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def never_close(stream: trio.SocketStream, server: Server) -> None:
    """Answer, then keep the connection open and read (recording EOF) forever."""
    data = await stream.receive_some()
    await stream.send_all(b"ok:" + data)
    while True:
        chunk = await stream.receive_some()
        server.received.append(chunk)
        if not chunk:
            await trio.sleep_forever()


async def flood(stream: trio.SocketStream, server: Server) -> None:
    """Answer with far more than any drain_limit, never close."""
    await stream.receive_some()
    block = b"f" * 65536
    while True:
        await stream.send_all(block)


async def half_close(stream: trio.SocketStream, server: Server) -> None:
    """Answer, send FIN, keep reading: such a peer sees the recycle's RST."""
    data = await stream.receive_some()
    await stream.send_all(b"ok:" + data)
    await stream.send_eof()
    while await stream.receive_some():
        pass
    server.received.append(b"<eof>")


@attrs.define(eq=False)
class KeepAlive:
    """How `keep_alive` serves: answers per connection, idle timeout, extra bytes."""

    #: Close after this many answers (None: never).
    requests: int | None = None
    #: Close a connection idle this long, in seconds (None: never).
    idle: float | None = None
    #: Sent right after every answer, in the same write: bytes past the
    #: end of the answer (a buggy or hostile upstream).
    trailer: bytes = b""
    #: Sent when the event is set, after the first answer (unsolicited bytes
    #: while the client holds the connection idle).
    late: tuple[trio.Event, bytes] | None = None
    #: Each answer: (connection number, exchange number, request).
    answers: list[tuple[int, int, bytes]] = attrs.field(factory=list)


def keep_alive(config: KeepAlive) -> Handler:
    """A line protocol server that keeps connections alive: ``<conn>.<n>:<request line>`` per request line."""

    async def handler(stream: trio.SocketStream, server: Server) -> None:
        conn = server.new_id()
        buffer = b""
        exchange = 0
        while config.requests is None or exchange < config.requests:
            while b"\n" not in buffer:
                with trio.move_on_after(math.inf if config.idle is None else config.idle) as idle:
                    data = await stream.receive_some()
                if idle.cancelled_caught or not data:
                    return
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            exchange += 1
            server.received.append(line)
            config.answers.append((conn, exchange, line))
            await stream.send_all(b"%d.%d:%s\n" % (conn, exchange, line) + config.trailer)
            if config.late is not None and exchange == 1:
                event, late = config.late
                await event.wait()
                await stream.send_all(late)

    return handler


async def exchange(stream: trio.abc.Stream, request: bytes) -> tuple[int, int, bytes]:
    """Send one request line and read exactly its answer line: (conn, exchange, echoed request)."""
    await stream.send_all(request + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        # One byte at a time: never read past the end of the answer.
        chunk = await stream.receive_some(1)
        if not chunk:
            raise EOFError(f"the server closed after {answer!r}")
        answer += chunk
    head, _, echoed = answer[:-1].partition(b":")
    conn, _, number = head.partition(b".")
    return int(conn), int(number), echoed


UDPPeer = Callable[..., Awaitable[trio.socket.SocketType]]


@pytest.fixture
async def udp_peer() -> AsyncIterator[UDPPeer]:
    """Make UDP sockets bound to port 0 on a loopback (``await udp_peer(host)``), closed after the test."""
    opened: list[trio.socket.SocketType] = []

    async def make(host: str = "127.0.0.1") -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        opened.append(sock)
        await sock.bind((host, 0))
        return sock

    yield make
    for sock in opened:
        sock.close()


# ----------------------------------------------------------------------
# Names: trio's official resolver hook, so that a name can resolve to
# several loopback addresses without touching /etc/hosts or DNS.

AddrInfo = tuple[int, int, int, str, tuple[object, ...]]


@attrs.define
class LocalResolver(trio.abc.HostnameResolver):
    """Resolves the names in ``table``; anything else is unknown."""

    table: dict[str, list[tuple[str, int]]]

    async def getaddrinfo(  # type: ignore[override]  # trio's per-family literal types
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[AddrInfo]:
        await trio.lowlevel.checkpoint()
        name = host.decode() if host is not None else ""
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        assert isinstance(port, (bytes, str, int))
        result: list[AddrInfo] = []
        for address, address_family in self.table[name]:
            sockaddr: tuple[object, ...] = (
                (address, int(port), 0, 0) if address_family == socket.AF_INET6 else (address, int(port))
            )
            kind = type or socket.SOCK_STREAM
            protocol = socket.IPPROTO_UDP if kind == socket.SOCK_DGRAM else socket.IPPROTO_TCP
            result.append((address_family, kind, protocol, "", sockaddr))
        return result

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int) -> tuple[str, str]:
        raise NotImplementedError  # pragma: no cover


ResolveNames = Callable[[dict[str, list[tuple[str, int]]]], None]


@pytest.fixture
def resolve_names() -> ResolveNames:
    """Install a LocalResolver for this test's trio run (it ends with the test)."""

    def install(table: dict[str, list[tuple[str, int]]]) -> None:
        trio.socket.set_custom_hostname_resolver(LocalResolver(table))

    return install


# ----------------------------------------------------------------------
# Kernel probes


def wait_for_time_wait(
    port: int, expected: int, timeout: float = 5.0, remote_ports: Collection[int] | None = None
) -> int:
    """Poll (bounded) until ``expected`` TIME_WAIT entries for ``port`` exist.

    The kernel offers no event for a state change of a socket we no longer
    hold, and on loopback the last FIN may still be in the softirq backlog
    when close() returns: polling /proc is the only honest way to wait.
    Returns the last count seen, so the caller asserts on it.
    """
    deadline = time.monotonic() + timeout
    while True:
        count = time_wait_count(port, remote_ports)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.005)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@pytest.fixture
def collect_stock_httpx_leaks() -> Iterator[None]:
    """After the test, collect what stock httpx (a control) dropped, its ResourceWarnings ignored.

    httpcore's own leaks (encode/httpcore 1022, 943) leave stock sockets in
    reference cycles; collected in some later test, their ResourceWarning
    (an error under filterwarnings) would fail that test.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def fd_baseline() -> set[str]:
    """The socket inodes open before the test."""
    return {v for v in fd_inodes().values() if v.startswith("socket:")}


@pytest.fixture(params=[True, False], ids=["recycle", "fallback"])
def recycle(request: pytest.FixtureRequest) -> bool:
    """Run a test with recycling on and in the close-instead fallback."""
    value: bool = request.param
    return value


async def drained(pool: SocketPool) -> None:
    """Wait until no socket of ``pool`` is draining (bounded)."""
    # Polled, not wait_all_tasks_blocked(): a drain may be waiting on a timer
    # (the grace before our FIN, the poll for its ACK), and a task in
    # wait_all_tasks_blocked() keeps an autojump clock from jumping.
    for _ in range(10_000):
        if not pool.statistics().draining:
            return
        await trio.sleep(0.001)
    raise AssertionError(f"still draining after 10 s: {pool.statistics()}")


async def cycle(pool: SocketPool, server: Server, payload: bytes = b"ping") -> bytes:
    """One request/response/close cycle through the pool."""
    async with await pool.open_tcp_stream(server.host, server.port) as stream:
        await stream.send_all(payload)
        return await read_until_eof(stream)
