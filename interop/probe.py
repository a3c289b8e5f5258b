"""Measure a server's keep-alive defaults with a bare socket: idle timeout, request limit, answer to a FIN.

* idle timeout: seconds from the end of an answer to the server's FIN on a
  connection left idle;
* request limit: answers on one connection before the server closes it
  (or says ``Connection: close``);
* answer to a client's FIN: seconds from our FIN (``shutdown(SHUT_WR)``),
  sent on an idle connection right after an answer, to the server's FIN.
  A server that waits out its idle timeout instead leaves its socket in
  CLOSE_WAIT and ours in FIN_WAIT2 until then.

Each wait is bounded by the profile's ``limit``; a figure past it is
reported as such.
"""

from __future__ import annotations

import contextlib

import attrs
import h11
import trio

from interop.content import path_for

RECEIVE: int = 65536


@attrs.frozen
class Defaults:
    """What one server does by default; None where the bound was reached first."""

    #: The Connection and Keep-Alive headers of the first answer.
    advertised: str
    #: True when the server closes after every answer.
    closes: bool
    idle_timeout: float | None
    max_requests: int | None
    fin_answer: float | None
    #: The bounds used: seconds and requests.
    limit: float
    request_limit: int


class Closed(Exception):
    """The server closed (or reset) the connection before an answer."""


async def exchange(stream: trio.SocketStream, conn: h11.Connection, number: int) -> h11.Response:
    """One GET on ``stream``; returns the response once its body is read."""
    request = h11.Request(method="GET", target=path_for(number, 1024), headers=[("Host", "127.0.0.1")])
    await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(RECEIVE)
            except trio.BrokenResourceError as exc:
                raise Closed from exc
            if not data and response is None:
                raise Closed
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response
        elif isinstance(event, h11.ConnectionClosed):
            raise Closed


async def wait_eof(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        while await stream.receive_some(RECEIVE):
            pass


def _header(response: h11.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key == name:
            return value.decode()
    return None


async def _timed_close(port: int, *, our_fin: bool, limit: float) -> tuple[h11.Response, float | None]:
    """Seconds from the end of an answer (and our FIN, with ``our_fin``) to the server's FIN."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        response = await exchange(stream, h11.Connection(h11.CLIENT), 0)
        start = trio.current_time()
        if our_fin:
            await stream.send_eof()
        with trio.move_on_after(limit):
            await wait_eof(stream)
            return response, trio.current_time() - start
        return response, None


async def _max_requests(port: int, limit: int) -> int | None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        for number in range(limit):
            try:
                await exchange(stream, conn, number)
            except Closed:
                return number
            if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
                return number + 1
            conn.start_next_cycle()
    return None


async def measure(port: int, *, limit: float, request_limit: int) -> Defaults:
    """The three figures, measured at the same time on three connections."""
    idle: list[tuple[h11.Response, float | None]] = []
    fin: list[tuple[h11.Response, float | None]] = []
    most: list[int | None] = []

    async def timed(into: list[tuple[h11.Response, float | None]], our_fin: bool) -> None:
        into.append(await _timed_close(port, our_fin=our_fin, limit=limit))

    async def count() -> None:
        most.append(await _max_requests(port, request_limit))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timed, idle, False)
        nursery.start_soon(timed, fin, True)
        nursery.start_soon(count)
    response, idle_timeout = idle[0]
    connection = _header(response, b"connection")
    keep_alive = _header(response, b"keep-alive")
    advertised = [f"Connection: {connection}"] if connection else []
    advertised += [f"Keep-Alive: {keep_alive}"] if keep_alive else []
    return Defaults(
        ", ".join(advertised) or "-",
        (connection or "").lower() == "close",
        idle_timeout,
        most[0],
        fin[0][1],
        limit,
        request_limit,
    )
