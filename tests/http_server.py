"""An HTTP/1.1 server for tests/test_httpx.py, run in its own process.

    python tests/http_server.py --mode close|keep-alive [--idle-timeout S] [--tls CERT KEY]

It prints ``listening on HOST:PORT`` once it accepts connections and runs
until it gets SIGINT or SIGTERM (or its stdin closes).

* ``close``: one request per connection, answered with ``Connection:
  close``; the server closes first, right after the response.
* ``keep-alive``: any number of requests per connection; a connection idle
  for ``--idle-timeout`` seconds is closed by the server.

Every response body starts with ``<METHOD> <target>\\n`` and the request
body, so a client can check it got the answer to its own request. Query
parameters: ``size=N`` pads the body with ``.`` to N bytes, ``delay=S``
waits S seconds before answering, ``stall=1`` sends the head and half the
body, then waits forever.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from typing import Final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

#: Seconds a client gets to send a whole request.
REQUEST_TIMEOUT: Final = 10.0


@attrs.frozen
class Config:
    mode: str
    idle_timeout: float
    tls: tuple[str, str] | None


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("close", "keep-alive"), required=True)
    parser.add_argument("--idle-timeout", type=float, default=2.0, help="keep-alive: close after S idle seconds")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve https with this certificate")
    args = parser.parse_args(argv)
    return Config(args.mode, args.idle_timeout, tuple(args.tls) if args.tls else None)


async def next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(65536)))


async def send(conn: h11.Connection, stream: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def serve_one(stream: trio.abc.Stream, config: Config) -> None:
    conn = h11.Connection(h11.SERVER)
    keep_alive = config.mode == "keep-alive"
    first = True
    while True:
        # A kept-alive connection waits for its next request up to the idle
        # timeout, then the server closes it first.
        request = None
        with trio.move_on_after(REQUEST_TIMEOUT if first else config.idle_timeout):
            request = await next_event(conn, stream)
        first = False
        if not isinstance(request, h11.Request):
            return
        body = bytearray()
        with trio.fail_after(REQUEST_TIMEOUT):
            while isinstance(event := await next_event(conn, stream), h11.Data):
                body += event.data
        target = request.target
        query = parse_qs(urlsplit(target.decode()).query)
        payload = request.method + b" " + target + b"\n" + bytes(body)
        size = int(query.get("size", ["0"])[0])
        payload += b"." * (size - len(payload))
        if "delay" in query:
            await trio.sleep(float(query["delay"][0]))
        headers = [("Content-Length", str(len(payload))), ("Content-Type", "text/plain")]
        if not keep_alive:
            headers.append(("Connection", "close"))
        await send(conn, stream, h11.Response(status_code=200, headers=headers))
        if "stall" in query:
            await send(conn, stream, h11.Data(data=payload[: len(payload) // 2]))
            await trio.sleep_forever()
        await send(conn, stream, h11.Data(data=payload))
        await send(conn, stream, h11.EndOfMessage())
        if conn.our_state is h11.MUST_CLOSE or not keep_alive:
            return
        conn.start_next_cycle()


async def handle(stream: trio.SocketStream, config: Config, context: ssl.SSLContext | None) -> None:
    outer: trio.abc.Stream = stream
    if context is not None:
        outer = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    try:
        await serve_one(outer, config)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError):
        pass
    finally:
        # Close at once: the server closes first, the case recycling is for.
        await trio.aclose_forcefully(stream)


async def main(config: Config) -> None:
    context = None
    if config.tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*config.tls)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(stream: trio.SocketStream) -> None:
                await handle(stream, config, context)

            nursery.start_soon(trio.serve_listeners, serve, listeners)
            print(f"listening on 127.0.0.1:{port}", flush=True)

            async def stop_on_stdin_eof() -> None:
                # The test's process may die without a signal: follow it.
                stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
                while await stdin.receive_some():
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_stdin_eof)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main, parse_args())
