"""A tiny HTTP upstream that closes the connection after every response, or keeps it alive.

What it shows: the kind of backend trio-recycle is for. By default, like an
HTTP/1.0 server, it answers one request per connection with
``Connection: close`` and closes first, so a client that reads the response
to its end (the server's FIN) can recycle its socket, and nobody is left
with a TIME_WAIT entry. With ``--keepalive-requests K`` it keeps a
connection alive for up to K requests, as nginx does (``keepalive_requests``):
the K-th answer says ``Connection: close``, and a connection idle for
``--keepalive-timeout`` seconds is closed without a word
(``keepalive_timeout``). A request with ``Connection: close``, or an
HTTP/1.0 one, is answered and closed. The other examples
(``reverse_proxy.py``, ``fetcher.py``, ``demo.py``) run against it; it
needs nothing but trio.

Each response body is ``"<METHOD> <target>\\n"`` followed by the request
body, padded with ``.`` to ``--size`` bytes, so a client can check that it
got the answer to its own request.

Run it::

    python examples/upstream_server.py --listen 127.0.0.1:8000
    curl -i http://127.0.0.1:8000/hello

``--delay 5`` makes it a slow upstream (it waits before answering);
``--keepalive-requests 100 --keepalive-timeout 5`` a keep-alive one;
``--listen 127.0.0.1:0`` picks a free port. It prints
``listening on HOST:PORT`` once it accepts connections and, on Ctrl-C,
how many requests it served.
"""

from __future__ import annotations

import argparse
import signal
import socket
from typing import Final

import attrs
import trio

#: Longest request head accepted; bigger ones get 431.
MAX_HEAD: Final = 65536
#: Longest request body accepted; bigger ones get 413.
MAX_BODY: Final = 1 << 20
#: Seconds a client gets to send its whole request, once its first byte came.
REQUEST_TIMEOUT: Final = 10.0


@attrs.define
class Config:
    host: str
    port: int
    size: int
    delay: float
    #: Requests served per connection; the last answer says Connection: close.
    keepalive_requests: int = 1
    #: Seconds a kept-alive connection may wait for its next request.
    keepalive_timeout: float = 5.0


@attrs.define
class Counters:
    served: int = 0
    rejected: int = 0
    #: Connections closed because they were idle for ``keepalive_timeout``.
    idle_closed: int = 0


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--size", type=int, default=0, help="pad each response body to this many bytes")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering")
    parser.add_argument(
        "--keepalive-requests",
        type=int,
        default=1,
        metavar="K",
        help="requests per connection; the K-th answer says Connection: close (default 1: close after every answer)",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=5.0,
        metavar="T",
        help="seconds a kept-alive connection may stay idle before it is closed (default 5)",
    )
    args = parser.parse_args(argv)
    host, port = split_host_port(args.listen)
    if args.size < 0 or args.size > MAX_BODY or args.delay < 0:
        parser.error("--size must be in 0..1048576 and --delay >= 0")
    if args.keepalive_requests < 1 or not args.keepalive_timeout > 0:
        parser.error("--keepalive-requests must be >= 1 and --keepalive-timeout > 0")
    return Config(
        host=host,
        port=port,
        size=args.size,
        delay=args.delay,
        keepalive_requests=args.keepalive_requests,
        keepalive_timeout=args.keepalive_timeout,
    )


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6HOST]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SystemExit(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def response(status: str, body: bytes, *, head_only: bool = False, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n{connection}\r\n"
    ).encode()
    return head if head_only else head + body


# The server works on stdlib sockets with trio.lowlevel.wait_readable and
# wait_writable instead of trio's socket objects, for one reason: trio's
# `send` ends with a checkpoint, so other tasks run between the last byte of
# a response and the close. Here the last send and the close happen in one
# step, as in an event-loop server such as nginx, and the FIN follows the
# response at once; a client that reads to EOF finds it without a second
# wait. The accept loop takes every pending connection per wake-up.


async def receive(sock: socket.socket, buffer: bytearray) -> bool:
    """Append what arrives to ``buffer``; False at the client's EOF."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        else:
            buffer += data
            return bool(data)


@attrs.frozen
class Request:
    line: bytes
    body: bytes
    #: The client asked to close after this request (Connection: close, or HTTP/1.0).
    close: bool


async def read_request(sock: socket.socket, buffer: bytearray) -> Request | bytes | None:
    """Return the next request, an error response, or None if the client left.

    ``buffer`` holds what was received beyond the previous request.
    """
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            return response("431 Request Header Fields Too Large", b"request head too large\n")
        if not await receive(sock, buffer):
            return None
    line, *fields = bytes(buffer[:end]).split(b"\r\n")
    length = 0
    close = not line.endswith(b"HTTP/1.1")
    for field in fields:
        name, _, value = field.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return response("411 Length Required", b"send a Content-Length\n")
        if name == b"content-length":
            if not value.strip().isdigit():
                return response("400 Bad Request", b"bad Content-Length\n")
            length = int(value)
        if name == b"connection" and b"close" in value.lower():
            close = True
    if length > MAX_BODY:
        return response("413 Content Too Large", b"request body too large\n")
    del buffer[: end + 4]
    while len(buffer) < length:
        if not await receive(sock, buffer):
            return None
    body = bytes(buffer[:length])
    del buffer[:length]
    return Request(line, body, close)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send everything; return without a checkpoint after the last byte."""
    with memoryview(data) as view:
        sent = 0
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


async def handle(sock: socket.socket, config: Config, counters: Counters) -> None:
    with sock:
        buffer = bytearray()
        try:
            for number in range(1, config.keepalive_requests + 1):
                if number > 1 and not buffer:
                    # Idle between requests: close after keepalive_timeout,
                    # without a word, as nginx does. A request that crosses
                    # our close on the wire meets a closed socket: that is
                    # the race a client of a keep-alive server must handle.
                    with trio.move_on_after(config.keepalive_timeout):
                        if not await receive(sock, buffer):
                            return
                    if not buffer:
                        counters.idle_closed += 1
                        return
                with trio.fail_after(REQUEST_TIMEOUT):
                    request = await read_request(sock, buffer)
                if request is None:
                    return
                if isinstance(request, bytes):
                    counters.rejected += 1
                    await send_all(sock, request)
                    return
                method, _, rest = request.line.partition(b" ")
                target = rest.rpartition(b" ")[0] or rest
                payload = method + b" " + target + b"\n" + request.body
                payload += b"." * (config.size - len(payload))
                if config.delay:
                    await trio.sleep(config.delay)
                close = request.close or number == config.keepalive_requests
                await send_all(sock, response("200 OK", payload, head_only=method == b"HEAD", close=close))
                counters.served += 1
                if close:
                    return
        except (OSError, trio.TooSlowError):
            # The client reset or stalled: nothing to answer.
            return


async def serve(
    config: Config,
    counters: Counters,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever; report the bound (host, port) when ready."""
    info = await trio.socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)
    family, type, proto, _, address = info[0]
    with socket.socket(family, type, proto) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setblocking(False)
        listener.bind(address)
        listener.listen(4096)
        host, port = listener.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            task_status.started((host, port))
            while True:
                await trio.lowlevel.wait_readable(listener)
                for _ in range(64):
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError:
                        # ECONNABORTED, EMFILE, ...: pause rather than spin.
                        await trio.sleep(0.01)
                        break
                    sock.setblocking(False)
                    nursery.start_soon(handle, sock, config, counters)


async def main(config: Config) -> None:
    counters = Counters()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve, config, counters)
            print(f"listening on {format_host_port(host, port)}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(
        f"served {counters.served} requests, rejected {counters.rejected},"
        f" closed {counters.idle_closed} idle connections",
        flush=True,
    )


if __name__ == "__main__":
    trio.run(main, parse_args())
