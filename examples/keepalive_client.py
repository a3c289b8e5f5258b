"""HTTP/1.1 requests over kept-alive connections from a trio-recycle pool, with ``release()``.

What it shows: a client of a server that keeps connections alive (nginx,
uvicorn, most HTTP/1.1 servers). After each complete response that allows
it, the connection goes back to the pool live, with
``await stream.release()``, and the next ``pool.open_tcp_stream`` to the
same host and port takes it: no ``connect()``, no ``socket()``. When the
server closes a connection (its request limit, its idle timeout) the pool
recycles the socket. A request that meets the stale-connection race (the
server closed a kept-alive connection just as the request went out) is sent
again on the next connection, which ``stream.kept_alive`` makes safe to
decide. It prints the
pool's statistics: ``created`` (sockets made) stays small, ``kept_alive``
counts the requests that took a live connection. It needs nothing but
trio; responses must carry a ``Content-Length``.

Run it::

    python examples/upstream_server.py --listen 127.0.0.1:8000 --keepalive-requests 100 &
    python examples/keepalive_client.py --upstream 127.0.0.1:8000 --requests 2000 --concurrency 8

It exits with status 1 if a request failed.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Final

import attrs
import trio

import trio_recycle

#: Longest response head accepted.
MAX_HEAD: Final = 65536
#: Seconds one request may take before it counts as failed.
REQUEST_TIMEOUT: Final = 10.0
#: Stale kept-alive connections one request may meet before it fails. The
#: server's idle timer closes every connection that waited as long at once,
#: so a request can meet several in a row; each is closed as it is met.
MAX_STALE: Final = 8


@attrs.frozen
class Args:
    host: str
    port: int
    requests: int
    concurrency: int
    capacity: int


@attrs.frozen
class Response:
    status: int
    body: bytes
    #: The server allows another request on this connection.
    keep_alive: bool


class StaleConnection(Exception):
    """The connection ended before any byte of the answer: the server closed it first."""


async def read_response(stream: trio.abc.ReceiveStream) -> Response:
    """Read one response framed by ``Content-Length``, and not a byte further."""
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > MAX_HEAD:
            raise ValueError("response head too long")
        data = await stream.receive_some(MAX_HEAD)
        if not data:
            if not head:
                raise StaleConnection
            raise ValueError("connection closed in a response head")
        head += data
    lines = bytes(head[:end]).decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ")
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    body = bytearray(head[end + 4 :])
    length = int(fields["content-length"])
    while len(body) < length:
        data = await stream.receive_some(length - len(body))
        if not data:
            raise ValueError("connection closed in a response body")
        body += data
    keep_alive = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    # Bytes past the end of the response mean a server out of step with us:
    # such a connection must never carry another request.
    return Response(int(status), bytes(body[:length]), keep_alive and len(body) == length)


async def fetch(pool: trio_recycle.SocketPool, host: str, port: int, path: str) -> Response:
    """GET ``path``; give the connection back live when the response allows it."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    for _ in range(MAX_STALE):
        stream = await pool.open_tcp_stream(host, port)
        async with stream:  # closes on any exception: never parks a broken connection
            try:
                await stream.send_all(request)
                response = await read_response(stream)
            except (StaleConnection, trio.BrokenResourceError):
                # The server closed a kept-alive connection as our request
                # went out: it never saw the request, so a GET may be sent
                # again, on the next connection. A connection made for this
                # request cannot be stale: its failure is a real one.
                if stream.kept_alive:
                    continue
                raise
            if response.keep_alive:
                await stream.release()
            return response
    raise StaleConnection(f"{MAX_STALE} kept-alive connections in a row were stale")


async def main(args: Args) -> None:
    print(f"{args.requests} requests to {args.host}:{args.port}, {args.concurrency} at a time", flush=True)
    failures: Counter[str] = Counter()
    todo = iter(range(args.requests))
    async with trio_recycle.open_socket_pool(capacity=args.capacity) as pool:

        async def worker() -> None:
            for number in todo:
                path = f"/keepalive/{number}"
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        response = await fetch(pool, args.host, args.port, path)
                except (OSError, trio.BrokenResourceError, trio.TooSlowError, StaleConnection, ValueError) as exc:
                    failures[f"{type(exc).__name__}: {exc}"] += 1
                    continue
                if response.status != 200:
                    failures[f"status {response.status}"] += 1
                elif not response.body.startswith(f"GET {path}\n".encode()):
                    failures["the answer to another request"] += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(worker)
        seconds = trio.current_time() - start
        stats = pool.statistics()
    print(f"{args.requests / seconds:,.0f} requests/s, {sum(failures.values())} failed")
    print(f"pool: {stats}")
    print(f"socket() calls: {stats.created}, requests on a kept-alive connection: {stats.kept_alive}")
    for reason, count in failures.most_common():
        print(f"failed {count} x {reason}")
    if failures:
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description="HTTP/1.1 requests over kept-alive connections from a pool.")
    parser.add_argument("--upstream", default="127.0.0.1:8000", help="HOST:PORT of an HTTP/1.1 server")
    parser.add_argument("--requests", type=int, default=2000, help="requests in all (default 2000)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--capacity", type=int, default=16, help="pool capacity (default 16)")
    args = parser.parse_args(argv)
    host, sep, port = args.upstream.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"--upstream: expected HOST:PORT, not {args.upstream!r}")
    if args.requests < 1 or args.concurrency < 1 or args.capacity < 1:
        parser.error("--requests, --concurrency and --capacity must be >= 1")
    return Args(host.strip("[]"), int(port), args.requests, args.concurrency, args.capacity)


if __name__ == "__main__":
    trio.run(main, parse_args())
