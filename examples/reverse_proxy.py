"""An HTTP/1.1 reverse proxy whose upstream connections come from a trio-recycle pool.

What it shows: the upstream side of a reverse proxy, the case trio-recycle
is for. Each request is forwarded over a `RecyclingStream` from
``pool.open_tcp_stream``. By default the upstream connection is kept alive,
as nginx's ``keepalive`` does: after a response that ended cleanly and
allows it (HTTP/1.1, no ``Connection: close``, read to its end, nothing
after it) the proxy gives the connection back live with
``await stream.release()``, and the next request to that upstream takes it
from the pool without a ``connect()``. When the upstream closes (its
request limit, its idle timeout), the pool recycles the socket: no
``socket()``/``close()`` and no TIME_WAIT entry left on the upstream.

A kept-alive connection can be closed by the upstream just as a request
goes out on it. An idempotent request that meets that race (a reset or an
EOF before any byte of an answer, on a connection ``stream.kept_alive``
says was released before) is sent once more on another connection, as
urllib3 and aiohttp do; anything else gets 502. Clients may keep their
connection alive too. A malformed request gets 400, an unreachable or
broken upstream 502, an upstream slower than ``--timeout`` 504; whatever
happens, the upstream connection is released or closed, so none leaks.

Run it (h11 comes with the ``examples`` extra: ``pip install '.[examples]'``)::

    python -m http.server 8000 --bind 127.0.0.1 &
    python examples/reverse_proxy.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:8000
    curl -v http://127.0.0.1:8080/
    wrk -c 32 -d 10 http://127.0.0.1:8080/      # apt-get install wrk

It prints ``listening on HOST:PORT`` when ready (``--listen 127.0.0.1:0``
picks a free port) and, on Ctrl-C, the pool's statistics. ``--upstream``
may be given more than once: the upstreams are taken in turn, and
``--capacity-per-peer`` bounds the sockets toward each. The baselines
(``demo.py`` runs them): ``--no-keepalive`` forwards every request on a
connection of its own with ``Connection: close``, the upstream answers and
closes, and the socket is recycled (recycling only); ``--no-recycle``
opens the pool with ``recycle=False`` (sockets are closed, not reused:
with keep-alive, what nginx and httpx do); ``--plain`` uses
`trio.open_tcp_stream` with no pool at all, one connection per request.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import socket
import struct
from collections import Counter
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol, final

import attrs
import h11
import trio

import trio_recycle

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

#: Seconds a client may stay idle between requests on a kept-alive connection.
KEEPALIVE_TIMEOUT: Final = 30.0
#: Seconds a client gets for each read or write of ours before we hang up.
CLIENT_TIMEOUT: Final = 30.0
#: Bytes asked for per receive.
RECEIVE_SIZE: Final = 65536

# RFC 9110 section 7.6.1: these describe one connection, not the message, so
# a proxy must not forward them. Transfer-Encoding is among them because h11
# re-frames each side's body on its own.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Expect: 100-continue is answered by the proxy itself (h11 tells us when the
# client waits for it), so the upstream never sees it.
NOT_FORWARDED: Final = HOP_BY_HOP | {b"expect"}


# ---------------------------------------------------------------------------
# Upstream connections: from the pool, or from trio.open_tcp_stream

#: The proxy's ways of getting upstream connections: (pool's recycle=, keep-alive).
#: None for recycle= means no pool at all: `trio.open_tcp_stream`.
MODES: Final[dict[str, tuple[bool | None, bool]]] = {
    "keepalive": (True, True),
    "keepalive-no-recycle": (False, True),
    "recycle": (True, False),
    "no-recycle": (False, False),
    "plain": (None, False),
}


class Upstream(Protocol):
    """Where the proxy gets a connection to an upstream for each request.

    ``keepalive`` says whether connections are given back live (with
    ``release()``) for the next request, or closed after every response.
    """

    @property
    def keepalive(self) -> bool: ...

    async def connect(self) -> trio.abc.HalfCloseableStream: ...

    def report(self) -> list[str]: ...


@final
@attrs.define(eq=False)
class RoundRobin:
    """The upstream servers, taken in turn."""

    peers: tuple[tuple[str, int], ...]
    _next: int = 0

    def take(self) -> tuple[str, int]:
        peer = self.peers[self._next]
        self._next = (self._next + 1) % len(self.peers)
        return peer


@final
@attrs.define(eq=False)
class PooledUpstream:
    """Upstream connections from a `trio_recycle.SocketPool`."""

    pool: trio_recycle.SocketPool
    peers: RoundRobin
    keepalive: bool = True

    async def connect(self) -> trio.abc.HalfCloseableStream:
        return await self.pool.open_tcp_stream(*self.peers.take())

    def report(self) -> list[str]:
        stats = self.pool.statistics()
        mode = next(name for name, how in MODES.items() if how == (self.pool.recycling, self.keepalive))
        return [f"upstream ({mode}): {stats}", f"upstream socket() calls: {stats.created}"]


@final
class CountingSocketFactory(trio.abc.SocketFactory):
    """Makes trio's sockets exactly as trio does, counting the ``socket()`` calls."""

    def __init__(self) -> None:
        self.count = 0

    def socket(
        self,
        family: socket.AddressFamily | int = socket.AF_INET,
        type: socket.SocketKind | int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> trio.socket.SocketType:
        self.count += 1
        return trio.socket.from_stdlib_socket(socket.socket(family, type, proto))


@final
@attrs.define(eq=False)
class PlainUpstream:
    """Upstream connections from `trio.open_tcp_stream`, one per request: the baseline."""

    peers: RoundRobin
    sockets: CountingSocketFactory

    @property
    def keepalive(self) -> bool:
        return False

    async def connect(self) -> trio.abc.HalfCloseableStream:
        return await trio.open_tcp_stream(*self.peers.take())

    def report(self) -> list[str]:
        return ["upstream (plain): trio.open_tcp_stream", f"upstream socket() calls: {self.sockets.count}"]


@asynccontextmanager
async def open_upstream(
    peers: Iterable[tuple[str, int]], *, mode: str, capacity: int, capacity_per_peer: int | None = None
) -> AsyncIterator[Upstream]:
    """Yield an `Upstream` for one of `MODES`, over ``peers`` in turn.

    Open it after the proxy's listeners: in "plain" mode every trio socket
    made from here on is counted as an upstream ``socket()`` call.
    """
    recycle, keepalive = MODES[mode]
    turns = RoundRobin(tuple(peers))
    if recycle is None:
        factory = CountingSocketFactory()
        trio.socket.set_custom_socket_factory(factory)
        try:
            yield PlainUpstream(turns, factory)
        finally:
            trio.socket.set_custom_socket_factory(None)
        return
    async with trio_recycle.open_socket_pool(
        capacity=capacity, recycle=recycle, capacity_per_peer=capacity_per_peer
    ) as pool:
        yield PooledUpstream(pool, turns, keepalive)


# ---------------------------------------------------------------------------
# The proxy


class UpstreamError(Exception):
    """The upstream failed before a response was started: answer ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class BadRequest(Exception):
    """The client's request body is malformed (the cause is h11's error)."""


class Abort(Exception):
    """A response was started and cannot be finished: reset the client connection."""


@attrs.define
class ProxyStats:
    requests: int = 0
    statuses: Counter[int] = attrs.field(factory=Counter)
    aborted: int = 0
    #: Requests sent again after a kept-alive upstream connection failed before answering.
    retried: int = 0

    def report(self) -> str:
        statuses = " ".join(f"{status}={count}" for status, count in sorted(self.statuses.items()))
        return (
            f"proxy: {self.requests} requests, responses {statuses or 'none'}, {self.aborted} aborted,"
            f" {self.retried} retried"
        )


@attrs.define
class Attempt:
    """What one try of sending a request upstream did: whether it may be tried again."""

    #: The h11 events sent upstream, to replay them on another connection.
    sent: list[h11.Event] = attrs.field(factory=list)
    #: False once part of the request went out before the rest came from the client.
    whole: bool = True
    #: Bytes of the answer received.
    received: int = 0


def forward_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, including those the Connection header names."""
    pairs = list(headers)
    drop = set(NOT_FORWARDED)
    for name, value in pairs:
        if name == b"connection":
            drop.update(token.strip().lower() for token in value.split(b","))
    return [(name, value) for name, value in pairs if name not in drop]


def as_bytes(data: bytes | bytearray) -> bytes:
    # trio's streams may return a bytearray; h11 is typed for bytes only.
    return data if isinstance(data, bytes) else bytes(data)


async def next_event(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> h11.Event:
    """The next h11 event, reading from ``stream`` as needed."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(as_bytes(await stream.receive_some(RECEIVE_SIZE)))
        elif isinstance(event, h11.Event):
            return event
        else:
            # PAUSED: the other side switched protocols (an answer to CONNECT
            # or Upgrade), which this proxy does not relay.
            raise Abort(f"h11 paused in state {conn.states}")


async def response_head(up: h11.Connection, upstream: trio.abc.ReceiveStream, attempt: Attempt) -> h11.Response:
    """Read the head of the upstream's response, skipping 1xx, counting the bytes received."""
    while True:
        event = up.next_event()
        if event is h11.NEED_DATA:
            data = await upstream.receive_some(RECEIVE_SIZE)
            attempt.received += len(data)
            up.receive_data(as_bytes(data))
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):
            raise UpstreamError(502, f"upstream sent {type(event).__name__} instead of a response")


#: Stale kept-alive connections one request may meet before it fails: a bound
#: for an upstream that closes every kept-alive connection as it is used.
MAX_STALE: Final = 8
#: Methods whose request may be sent twice with the effect of once (RFC 9110 section 9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})


def is_stale(upstream: trio.abc.HalfCloseableStream, request: h11.Request, attempt: Attempt) -> bool:
    """Whether a failed try may be sent again: the stale-connection race, and nothing else.

    Only a connection that an earlier request released can have been closed
    by an idle timeout under our feet; a fresh connection that fails is the
    upstream's failure. And only a request that got no byte of an answer
    was surely not answered.
    """
    kept_alive = isinstance(upstream, trio_recycle.RecyclingStream) and upstream.kept_alive
    return kept_alive and attempt.received == 0 and attempt.whole and request.method in IDEMPOTENT


def may_keep(up: h11.Connection) -> bool:
    """Whether the upstream connection may carry another request, as nginx's ``keepalive`` decides.

    Both sides must be DONE: h11 puts them in MUST_CLOSE for
    ``Connection: close`` or HTTP/1.0, and leaves them elsewhere when the
    request or the response did not end cleanly. And h11 must hold no byte
    beyond the response's end: an upstream that sent more than it was asked
    for (a second, unsolicited response) is out of step with us, and what it
    sent must never reach the next client (response-queue poisoning). Bytes
    that come later are the pool's to find: ``release()`` and the watch
    close a connection with anything unread.
    """
    return up.our_state is h11.DONE and up.their_state is h11.DONE and up.trailing_data == (b"", False)


async def give_back(upstream: trio.abc.HalfCloseableStream, *, reusable: bool) -> None:
    """Park the upstream connection in the pool for the next request, or close it."""
    if reusable and isinstance(upstream, trio_recycle.RecyclingStream):
        await upstream.release()
    else:
        await upstream.aclose()


@attrs.define(eq=False)
class Proxy:
    """Forwards the requests of each client connection to the upstream.

    Attributes:
      upstream: Where upstream connections come from.
      authority: The Host header for clients that sent none (HTTP/1.0).
      timeout: Seconds the upstream gets to connect, take the request and
          start its answer (504 after), and then for each read of the body.
      retry_stale: Send an idempotent request again when a kept-alive
          upstream connection fails before answering (see `Proxy.start`).
    """

    upstream: Upstream
    authority: bytes
    timeout: float
    retry_stale: bool = True
    stats: ProxyStats = attrs.field(factory=ProxyStats)

    async def handle(self, client: trio.abc.Stream) -> None:
        """Serve one client connection: its requests, one after the other."""
        conn = h11.Connection(h11.SERVER)
        graceful = True
        try:
            try:
                await self.serve_requests(conn, client)
            except (h11.RemoteProtocolError, BadRequest) as exc:
                error = exc.__cause__ if isinstance(exc, BadRequest) else exc
                assert isinstance(error, h11.RemoteProtocolError)
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self.send_error(conn, client, error.error_status_hint, str(error))
        except (Abort, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.stats.aborted += 1
            graceful = False
        finally:
            if graceful:
                await close_gracefully(client)
            else:
                await reset(client)

    async def serve_requests(self, conn: h11.Connection, client: trio.abc.Stream) -> None:
        while True:
            with trio.CancelScope(deadline=trio.current_time() + KEEPALIVE_TIMEOUT) as idle:
                event = await next_event(conn, client)
            if idle.cancelled_caught or not isinstance(event, h11.Request):
                return
            await self.forward(conn, client, event)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def forward(self, conn: h11.Connection, client: trio.abc.Stream, request: h11.Request) -> None:
        """Forward ``request`` and stream the upstream's response back.

        The upstream gets ``timeout`` seconds to accept the connection, take
        the request and send the head of its response (time spent waiting
        for the client's request body does not count); 504 after that, 502
        if it fails or talks nonsense. Once the response has started, errors
        can only cut the client connection. The upstream connection is given
        back live (``release()``) only after a response that ended cleanly
        and allows it; otherwise it is closed.
        """
        self.stats.requests += 1
        if request.method == b"CONNECT":
            await self.send_error(conn, client, 405, "this reverse proxy does not open tunnels")
            return
        held: list[trio.abc.HalfCloseableStream] = []
        reusable = False
        try:
            try:
                with trio.CancelScope(deadline=trio.current_time() + self.timeout) as deadline:
                    response, up = await self.start(conn, client, request, deadline, held)
                if deadline.cancelled_caught:
                    raise UpstreamError(504, f"upstream did not answer within {self.timeout} s")
            except OSError as exc:
                raise UpstreamError(502, f"upstream unreachable: {exc}") from exc
            except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                raise UpstreamError(502, f"upstream failed: {exc}") from exc
            self.stats.statuses[response.status_code] += 1
            reusable = await self.relay(conn, client, response, up, held[-1])
        except UpstreamError as exc:
            await self.send_error(conn, client, exc.status, str(exc))
        finally:
            if held:
                await give_back(held[-1], reusable=reusable and self.upstream.keepalive)

    async def start(
        self,
        conn: h11.Connection,
        client: trio.abc.Stream,
        request: h11.Request,
        deadline: trio.CancelScope,
        held: list[trio.abc.HalfCloseableStream],
    ) -> tuple[h11.Response, h11.Connection]:
        """Connect, send the request and read the response head, sending it again if the connection was stale.

        A kept-alive connection can be closed by the upstream (its idle
        timeout) while our request is on the wire: the request then meets a
        reset or an EOF, and the upstream has not acted on it. When that
        happens before any byte of an answer came back, an idempotent
        request (RFC 9110 section 9.2.2) whose every byte we still hold is
        sent again on the next connection, as urllib3 and aiohttp do.
        Anything else fails (502). Several kept-alive connections may have
        gone stale at once (the upstream's idle timer closes all that
        waited as long): each one met is closed, and the request goes on to
        the next, until one that was not kept alive, which cannot be stale,
        or `MAX_STALE` of them. The connection in use is appended to
        ``held``, so that the caller gives it back whatever happens.
        """
        attempt = Attempt()
        stale = 0
        while True:
            held.append(await self.upstream.connect())
            try:
                if stale == 0:
                    return await self.exchange(conn, client, request, held[-1], deadline, attempt)
                return await self.replay(attempt.sent, held[-1], attempt)
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                if not (self.retry_stale and stale < MAX_STALE and is_stale(held[-1], request, attempt)):
                    raise
            stale += 1
            self.stats.retried += 1
            await held.pop().aclose()

    async def exchange(
        self,
        conn: h11.Connection,
        client: trio.abc.Stream,
        request: h11.Request,
        upstream: trio.abc.HalfCloseableStream,
        deadline: trio.CancelScope,
        attempt: Attempt,
    ) -> tuple[h11.Response, h11.Connection]:
        """Send the request, head and body, upstream and read the response head.

        Bytes for the upstream are collected and sent only when the next
        step needs data from the client: a request without a body goes out
        in a single ``send_all``. Errors of the client come out as
        `BadRequest` or `Abort`, so that whatever else is raised here is the
        upstream's fault.
        """
        up = h11.Connection(h11.CLIENT)
        headers = forward_headers(request.headers)
        if not any(name == b"host" for name, _ in headers):
            headers.append((b"host", self.authority))
        if any(name == b"transfer-encoding" for name, _ in request.headers):
            headers.append((b"transfer-encoding", b"chunked"))
        if not self.upstream.keepalive:
            headers.append((b"connection", b"close"))
        head = h11.Request(method=request.method, target=request.target, headers=headers)
        attempt.sent.append(head)
        pending = bytearray(up.send(head))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                attempt.whole = False
                await upstream.send_all(pending)
                pending.clear()
                # The client's slowness is not the upstream's: stop the
                # upstream's clock while we wait for the request body.
                remaining = deadline.deadline - trio.current_time()
                deadline.deadline = math.inf
                event = await self.request_body_event(conn, client)
                deadline.deadline = trio.current_time() + remaining
            if isinstance(event, h11.Data):
                body = h11.Data(data=event.data)
                attempt.sent.append(body)
                pending += up.send(body)
            elif isinstance(event, h11.EndOfMessage):
                attempt.sent.append(h11.EndOfMessage())
                pending += up.send(h11.EndOfMessage())
                break
        await upstream.send_all(pending)
        return await response_head(up, upstream, attempt), up

    async def replay(
        self, sent: list[h11.Event], upstream: trio.abc.HalfCloseableStream, attempt: Attempt
    ) -> tuple[h11.Response, h11.Connection]:
        """Send a whole request again, on ``upstream``, and read the response head."""
        up = h11.Connection(h11.CLIENT)
        await upstream.send_all(b"".join(up.send(event) or b"" for event in sent))
        return await response_head(up, upstream, attempt), up

    async def request_body_event(self, conn: h11.Connection, client: trio.abc.Stream) -> h11.Event:
        """Read on in the client's request body, within ``CLIENT_TIMEOUT``."""
        try:
            with trio.fail_after(CLIENT_TIMEOUT):
                if conn.they_are_waiting_for_100_continue:
                    await client.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                return await next_event(conn, client)
        except h11.RemoteProtocolError as exc:
            raise BadRequest from exc
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Abort(f"client failed during its request body: {exc!r}") from exc

    async def relay(
        self,
        conn: h11.Connection,
        client: trio.abc.Stream,
        response: h11.Response,
        up: h11.Connection,
        upstream: trio.abc.HalfCloseableStream,
    ) -> bool:
        """Stream the response to the client; return whether the upstream connection may serve another request.

        As in `exchange`, bytes for the client are sent only when the next
        event needs data from the upstream: a small response goes out in a
        single ``send_all``. One cancel scope serves every wait; its
        deadline is set before each: ``timeout`` for the upstream,
        ``CLIENT_TIMEOUT`` for the client.

        When the upstream closes next (``Connection: close``, HTTP/1.0), it
        reads on to the upstream's FIN, so that closing the stream recycles
        the socket at once, in this task, instead of in a background drain.
        """
        headers = forward_headers(response.headers)
        head = h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        out = bytearray(conn.send(head))
        eof = False
        waiting_for = "upstream"
        with trio.CancelScope() as timer:
            try:
                while True:
                    event = up.next_event()
                    if event is h11.NEED_DATA:
                        if out:
                            waiting_for, timer.deadline = "client", trio.current_time() + CLIENT_TIMEOUT
                            await client.send_all(out)
                            out.clear()
                        waiting_for, timer.deadline = "upstream", trio.current_time() + self.timeout
                        data = await upstream.receive_some(RECEIVE_SIZE)
                        eof = not data
                        up.receive_data(as_bytes(data))
                    elif isinstance(event, h11.Data):
                        out += conn.send(h11.Data(data=event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        out += conn.send(h11.EndOfMessage())
                        break
                    else:
                        raise Abort(f"upstream sent {type(event).__name__} in a response body")
            except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
                if waiting_for == "client":
                    raise
                raise Abort(f"upstream failed during the response: {exc}") from exc
            waiting_for, timer.deadline = "client", trio.current_time() + CLIENT_TIMEOUT
            await client.send_all(out)
            reusable = may_keep(up)
            if not eof and not reusable and up.their_state is h11.MUST_CLOSE and not up.trailing_data[0]:
                # The upstream said it closes next. Anything else (bytes
                # after the response, a reset, silence) is left to the
                # pool, which closes instead.
                waiting_for, timer.deadline = "upstream FIN", trio.current_time() + self.timeout
                with contextlib.suppress(trio.BrokenResourceError):
                    await upstream.receive_some(RECEIVE_SIZE)
        if timer.cancelled_caught and waiting_for != "upstream FIN":
            raise Abort(f"{waiting_for} too slow during the response")
        return reusable

    async def send_error(self, conn: h11.Connection, client: trio.abc.Stream, status: int, message: str) -> None:
        """Answer with a short text/plain error page."""
        self.stats.statuses[status] += 1
        # Discard what is left of a request body already received, so that
        # a client whose request is complete keeps its connection.
        while conn.their_state is h11.SEND_BODY and conn.next_event() is not h11.NEED_DATA:
            pass
        phrase = status_phrase(status)
        body = f"{status} {phrase}: {message}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if conn.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=phrase.encode()))
        data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await send_client(client, data)


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def send_client(client: trio.abc.Stream, data: bytes | bytearray) -> None:
    with trio.fail_after(CLIENT_TIMEOUT):
        await client.send_all(data)


async def close_gracefully(stream: trio.abc.Stream) -> None:
    """Close a client connection without resetting it while it still sends.

    Closing a socket with unread input makes the kernel send an RST, which
    can destroy an error response the client has not read yet; so we send
    our FIN first and read what is left for a moment (Apache's lingering
    close).
    """
    try:
        with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            for _ in range(16):
                if not await stream.receive_some(RECEIVE_SIZE):
                    break
    finally:
        await stream.aclose()


async def reset(stream: trio.abc.Stream) -> None:
    """Close a client connection with an RST, so that a cut response looks cut."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


# ---------------------------------------------------------------------------
# Command line


@attrs.frozen
class Args:
    listen_host: str
    listen_port: int
    upstreams: tuple[tuple[str, int], ...]
    capacity: int
    capacity_per_peer: int | None
    timeout: float
    mode: str


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6HOST]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(
        description="An HTTP/1.1 reverse proxy whose upstream connections come from a trio-recycle pool."
    )
    parser.add_argument(
        "--listen",
        type=split_host_port,
        default=("127.0.0.1", 8080),
        help="HOST:PORT to serve on (default 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--upstream",
        type=split_host_port,
        action="append",
        required=True,
        help="HOST:PORT of an upstream server; give it again for more, taken in turn (round robin)",
    )
    parser.add_argument("--capacity", type=int, default=64, help="most upstream sockets at once (default 64)")
    parser.add_argument(
        "--capacity-per-peer",
        type=int,
        default=None,
        help="most upstream sockets toward one upstream (default: no limit)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds the upstream gets to answer (504 after)")
    parser.add_argument(
        "--no-keepalive",
        action="store_true",
        help="one upstream connection per request, with Connection: close (the old behaviour)",
    )
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--no-recycle", action="store_true", help="close upstream sockets instead of recycling them")
    baseline.add_argument(
        "--plain", action="store_true", help="use trio.open_tcp_stream instead of a pool (implies --no-keepalive)"
    )
    args = parser.parse_args(argv)
    if args.capacity < 1 or not args.timeout > 0 or (args.capacity_per_peer is not None and args.capacity_per_peer < 1):
        parser.error("--capacity and --capacity-per-peer must be >= 1 and --timeout > 0")
    if args.plain:
        mode = "plain"
    else:
        mode = ("recycle" if args.no_keepalive else "keepalive") + ("-no-recycle" if args.no_recycle else "")
        mode = mode.replace("recycle-no-recycle", "no-recycle")
    listen_host, listen_port = args.listen
    return Args(
        listen_host, listen_port, tuple(args.upstream), args.capacity, args.capacity_per_peer, args.timeout, mode
    )


async def main(args: Args) -> None:
    listeners = await trio.open_tcp_listeners(args.listen_port, host=args.listen_host)
    async with open_upstream(
        args.upstreams, mode=args.mode, capacity=args.capacity, capacity_per_peer=args.capacity_per_peer
    ) as upstream:
        proxy = Proxy(upstream, format_host_port(*args.upstreams[0]).encode(), args.timeout)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, proxy.handle, listeners)
                for listener in listeners:
                    host, port = listener.socket.getsockname()[:2]
                    print(f"listening on {format_host_port(host, port)}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        print(proxy.stats.report())
        for line in upstream.report():
            print(line)


if __name__ == "__main__":
    trio.run(main, parse_args())
