"""Many short HTTP requests, through a trio-recycle pool and through trio.open_tcp_stream.

What it shows: a client that opens one connection per request (a crawler,
a health checker, a load generator) against a server that closes after
each response. The same fetch loop runs twice, the only difference being
where the connection comes from::

    stream = await pool.open_tcp_stream(host, port)   # recycled sockets
    stream = await trio.open_tcp_stream(host, port)   # a new socket each time

and for each it prints requests per second, ``socket()`` calls, and the
TIME_WAIT entries the run left on the server (visible only when the server
runs on this machine). Each request is ``GET <path> HTTP/1.0``, read to the
server's FIN, which is what lets the pool recycle the socket. It needs
nothing but trio.

Run it::

    python examples/upstream_server.py --listen 127.0.0.1:8000 &
    python examples/fetcher.py --upstream 127.0.0.1:8000 --requests 5000 --concurrency 16

or against any HTTP server that closes after each response, such as
``python -m http.server 8000 --bind 127.0.0.1``. It exits with status 1 if
a request failed.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections import Counter
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

import trio_recycle

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

#: Responses longer than this count as failures (we only want the status).
MAX_RESPONSE: Final = 1 << 20
#: Seconds one request may take before it counts as failed.
REQUEST_TIMEOUT: Final = 10.0


@attrs.frozen
class Args:
    host: str
    port: int
    path: str
    requests: int
    concurrency: int
    capacity: int


@attrs.define
class Result:
    name: str
    seconds: float = 0.0
    ok: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    sockets: int = 0
    time_wait: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


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


def time_wait_ports(port: int) -> set[int]:
    """The remote ports of the TIME_WAIT entries whose local port is ``port`` (state 06), IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split(maxsplit=4)
                    if fields[3] == "06" and int(fields[1].rpartition(":")[2], 16) == port:
                        found.add(int(fields[2].rpartition(":")[2], 16))
        except OSError:
            pass
    return found


def count_time_wait(port: int, client_ports: set[int] | None = None, before: set[int] | None = None) -> int:
    """The server's TIME_WAIT entries for our own connections: never negative, never more than we made.

    Only ours: each of our connections is known by its local port, which
    is the entry's remote port, and entries already there ``before`` the
    run (an earlier client's, on a port the kernel handed us again) are
    not counted. None counts every entry on ``port`` (a server of the
    caller's own, on a port nobody else used).
    """
    found = time_wait_ports(port) - (before or set())
    return len(found if client_ports is None else found & client_ports)


def local_port(stream: trio.abc.HalfCloseableStream) -> int | None:
    """The local port of a pool's stream or of a `trio.SocketStream`."""
    if isinstance(stream, trio_recycle.RecyclingStream):
        name = stream.getsockname()
    elif isinstance(stream, trio.SocketStream):
        name = stream.socket.getsockname()
    else:
        return None
    return int(name[1])


async def fetch(
    open_stream: Callable[[str, int], Awaitable[trio.abc.HalfCloseableStream]], args: Args, ports: set[int]
) -> bytes:
    """One request on its own connection; return the status line. Adds the connection's local port to ``ports``."""
    request = f"GET {args.path} HTTP/1.0\r\nHost: {args.host}:{args.port}\r\n\r\n".encode()
    async with await open_stream(args.host, args.port) as stream:
        port = local_port(stream)
        if port is not None:
            ports.add(port)
        await stream.send_all(request)
        response = bytearray()
        # Read to the server's FIN: the pool recycles a socket at once when
        # the peer has closed first, which HTTP/1.0 servers do.
        async for chunk in stream:
            response += chunk
            if len(response) > MAX_RESPONSE:
                raise ValueError("response too long")
    return bytes(response[: response.find(b"\r\n")])


async def run(
    name: str,
    open_stream: Callable[[str, int], Awaitable[trio.abc.HalfCloseableStream]],
    args: Args,
) -> Result:
    result = Result(name)
    todo = iter(range(args.requests))
    ports: set[int] = set()
    before = time_wait_ports(args.port)

    async def worker() -> None:
        for _ in todo:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    status = await fetch(open_stream, args, ports)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError) as exc:
                result.failures[type(exc).__name__] += 1
                continue
            if status.split(b" ")[1:2] == [b"200"]:
                result.ok += 1
            else:
                result.failures[status.decode(errors="replace") or "no status line"] += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(args.concurrency):
            nursery.start_soon(worker)
    result.seconds = trio.current_time() - start
    # Give the last FINs a moment to cross loopback before counting.
    await trio.sleep(0.1)
    result.time_wait = count_time_wait(args.port, ports, before)
    return result


def print_table(results: list[Result]) -> None:
    rows = {
        "requests/s": [f"{r.rate:,.0f}" for r in results],
        "requests ok": [f"{r.ok:,}" for r in results],
        "failed": [f"{sum(r.failures.values()):,}" for r in results],
        "socket() calls": [f"{r.sockets:,}" for r in results],
        "TIME_WAIT left on server": [f"{r.time_wait:,}" for r in results],
    }
    width = max(len(r.name) for r in results) + 2
    print(f"{'':26}" + "".join(f"{r.name:>{width}}" for r in results))
    for label, cells in rows.items():
        print(f"{label:26}" + "".join(f"{cell:>{width}}" for cell in cells))
    if results[1].rate:
        print(f"\npool / trio.open_tcp_stream: {results[0].rate / results[1].rate:.2f}x the requests per second")
    for result in results:
        for reason, count in result.failures.items():
            print(f"{result.name}: {count} failed: {reason}")


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description="Compare a trio-recycle pool with trio.open_tcp_stream.")
    parser.add_argument("--upstream", default="127.0.0.1:8000", help="HOST:PORT of an HTTP server")
    parser.add_argument("--path", default="/", help="path to request (default /)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per run (default 5000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--capacity", type=int, default=64, help="pool capacity (default 64)")
    args = parser.parse_args(argv)
    host, sep, port = args.upstream.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"--upstream: expected HOST:PORT, not {args.upstream!r}")
    if args.requests < 1 or args.concurrency < 1 or args.capacity < 1:
        parser.error("--requests, --concurrency and --capacity must be >= 1")
    return Args(host.strip("[]"), int(port), args.path, args.requests, args.concurrency, args.capacity)


async def main(args: Args) -> None:
    print(f"{args.requests} requests to {args.host}:{args.port}{args.path}, {args.concurrency} at a time", flush=True)
    async with trio_recycle.open_socket_pool(capacity=args.capacity) as pool:
        pooled = await run("pool", pool.open_tcp_stream, args)
        stats = pool.statistics()
        pooled.sockets = stats.created
    print(f"pool: {stats}", flush=True)

    factory = CountingSocketFactory()
    trio.socket.set_custom_socket_factory(factory)
    try:
        plain = await run("trio.open_tcp_stream", trio.open_tcp_stream, args)
    finally:
        trio.socket.set_custom_socket_factory(None)
    plain.sockets = factory.count

    print()
    print_table([pooled, plain])
    if pooled.failures or plain.failures:
        sys.exit(1)


if __name__ == "__main__":
    trio.run(main, parse_args())
