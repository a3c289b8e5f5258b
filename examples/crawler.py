"""A crawler over many peers: one pool, one socket at a time per request, 50 hosts.

What it shows: how a pool behaves when its sockets serve many peers, the
case of crawlers and of proxies with several backends. It starts its own
HTTP servers on 127.0.0.2, 127.0.0.3, ... (the whole 127.0.0.0/8 is
loopback on Linux), one per peer, then crawls them: ``--requests`` GETs
spread round robin over the peers, ``--concurrency`` at a time, through one
``trio_recycle.open_socket_pool(capacity=...)``. Every answer names the
peer and path it answers, so a byte of another connection would show as
cross-talk. At the end it prints the ``socket()`` calls the pool made,
the opens served by an idle socket (``reused``) or by a parked live
connection (``kept_alive``), and the TIME_WAIT entries the run left on
the client's side and on the servers'.

Two kinds of server (``--servers``):

- ``close``: HTTP/1.0, the server closes after each answer. The pool
  reconnects a socket once the server's FIN has arrived: no TIME_WAIT on
  either side. Which peer an idle socket may serve next depends on
  ``SocketPool.fresh_isns``: where the pool resets each socket's initial
  sequence number (``CAP_NET_ADMIN``, root for example) any idle socket
  serves any peer; elsewhere (``peer_affinity`` "auto") only the peer it
  last talked to, and an open to another peer makes a new socket once the
  pool is full of sockets kept for others.
- ``keepalive``: HTTP/1.1, the server keeps connections open; the crawler
  gives each back with ``await stream.release()`` and takes it again for
  the same peer. With more peers than ``capacity``, parked connections
  are evicted to make room for other peers.

Run it (as root, ISNs are fresh; as another user, affinity is on)::

    python examples/crawler.py --peers 50 --requests 2000 --concurrency 32 --capacity 32
    python examples/crawler.py --servers keepalive
    python examples/crawler.py --peer-affinity on    # what affinity costs where ISNs are fresh

It exits with status 1 if a request failed or an answer was another's.
"""

from __future__ import annotations

import argparse
import functools
import socket
import struct
import sys
from collections import Counter
from typing import Final, Literal

import attrs
import trio

import trio_recycle

#: Longest response head accepted.
MAX_HEAD: Final = 65536
#: Seconds one request may take before it counts as failed.
REQUEST_TIMEOUT: Final = 10.0
#: Seconds a keep-alive server keeps an idle connection (uvicorn's default).
SERVER_IDLE_TIMEOUT: Final = 5.0
#: Stale kept-alive connections one request may meet before it fails.
MAX_STALE: Final = 8
#: --peer-affinity's choices, as open_socket_pool takes them.
AFFINITY: Final[dict[str, bool | Literal["auto"]]] = {"auto": "auto", "on": True, "off": False}
#: TCP state TIME_WAIT in /proc/net/tcp.
TIME_WAIT: Final = "06"


@attrs.frozen
class Args:
    peers: int
    requests: int
    concurrency: int
    capacity: int
    servers: Literal["close", "keepalive"]
    peer_affinity: bool | Literal["auto"]


Peer = tuple[str, int]


# ---------------------------------------------------------------------------
# The peers: one small HTTP server per loopback address


async def answer(keepalive: bool, stream: trio.SocketStream) -> None:
    """Answer each request with ``<host>:<port> <path>``; keep the connection if asked to."""
    host, port = stream.socket.getsockname()[:2]
    buffer = bytearray()
    async with stream:
        while True:
            with trio.move_on_after(SERVER_IDLE_TIMEOUT):
                while (end := buffer.find(b"\r\n\r\n")) < 0 and len(buffer) < MAX_HEAD:
                    try:
                        data = await stream.receive_some()
                    except trio.BrokenResourceError:
                        # A reset: the pool ended an idle keep-alive
                        # connection it had to evict by the disconnect.
                        return
                    if not data:
                        return
                    buffer += data
            if end < 0:
                return  # idle too long, or a head too long: close
            path = bytes(buffer[:end]).split(b" ")[1].decode("latin-1")
            del buffer[: end + 4]
            body = f"{host}:{port} {path}".encode()
            connection = b"keep-alive" if keepalive else b"close"
            version = b"HTTP/1.1" if keepalive else b"HTTP/1.0"
            head = b"%s 200 OK\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n" % (version, len(body), connection)
            try:
                await stream.send_all(head + body)
            except trio.BrokenResourceError:
                return
            if not keepalive:
                return


async def start_peers(nursery: trio.Nursery, args: Args) -> list[Peer]:
    """One server per address 127.0.0.2, 127.0.0.3, ..., each on a port of its own."""
    peers = []
    for number in range(args.peers):
        host = f"127.0.0.{2 + number}"
        serve = functools.partial(trio.serve_tcp, functools.partial(answer, args.servers == "keepalive"), 0, host=host)
        listeners: list[trio.SocketListener] = await nursery.start(serve)
        peers.append((host, listeners[0].socket.getsockname()[1]))
    return peers


# ---------------------------------------------------------------------------
# The crawler


class StaleConnection(Exception):
    """A kept-alive connection ended before any byte of the answer: the server closed it first."""


@attrs.frozen
class Response:
    body: bytes
    keep_alive: bool


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
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    body = bytearray(head[end + 4 :])
    length = int(fields["content-length"])
    while len(body) < length:
        data = await stream.receive_some(length - len(body))
        if not data:
            raise ValueError("connection closed in a response body")
        body += data
    keep_alive = lines[0].startswith("HTTP/1.1 ") and fields.get("connection", "").lower() != "close"
    return Response(bytes(body[:length]), keep_alive and len(body) == length)


async def fetch(pool: trio_recycle.SocketPool, peer: Peer, path: str) -> bytes:
    """GET ``path`` from ``peer``: release the connection live when allowed, else read to the server's FIN."""
    host, port = peer
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    for _ in range(MAX_STALE):
        stream = await pool.open_tcp_stream(host, port)
        async with stream:
            try:
                await stream.send_all(request)
                response = await read_response(stream)
            except (StaleConnection, trio.BrokenResourceError):
                if stream.kept_alive:
                    continue  # the server closed it as the GET went out: send it again
                raise
            if response.keep_alive:
                await stream.release()
            else:
                # Reading the FIN before closing is what lets the pool
                # reconnect the socket at once, leaving no TIME_WAIT.
                while await stream.receive_some():
                    pass
            return response.body
    raise StaleConnection(f"{MAX_STALE} kept-alive connections in a row were stale")


def time_wait_entries(peers: list[Peer]) -> tuple[int, int]:
    """TIME_WAIT entries now toward the peers: (on the client's side, on the servers' side)."""
    wanted = {(socket.inet_aton(host), port) for host, port in peers}
    client = server = 0
    try:
        with open("/proc/net/tcp") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if fields[3] != TIME_WAIT:
                    continue
                local, remote = (_address(field) for field in fields[1:3])
                client += remote in wanted
                server += local in wanted
    except OSError:
        pass  # not Linux: nothing to count
    return client, server


def _address(field: str) -> tuple[bytes, int]:
    address, _, port = field.partition(":")
    return struct.pack("<I", int(address, 16)), int(port, 16)  # /proc/net/tcp: host byte order


async def crawl(args: Args, peers: list[Peer]) -> int:
    failures: Counter[str] = Counter()
    todo = iter(range(args.requests))
    before = time_wait_entries(peers)
    async with trio_recycle.open_socket_pool(capacity=args.capacity, peer_affinity=args.peer_affinity) as pool:

        async def worker() -> None:
            for number in todo:
                peer = peers[number % len(peers)]
                path = f"/page/{number}"
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        body = await fetch(pool, peer, path)
                except (OSError, trio.BrokenResourceError, trio.TooSlowError, StaleConnection, ValueError) as exc:
                    failures[f"failed: {type(exc).__name__}: {exc}"] += 1
                    continue
                if body != f"{peer[0]}:{peer[1]} {path}".encode():
                    failures["cross-talk: the answer of another connection"] += 1

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(worker)
        seconds = trio.current_time() - start
        fresh = pool.fresh_isns
        stats = pool.statistics()
    # A FIN sent at the pool's exit needs a moment to cross loopback.
    await trio.sleep(0.2)
    after = time_wait_entries(peers)
    ok = args.requests - sum(failures.values())
    print(f"{ok} of {args.requests} requests ok in {seconds:.2f} s ({args.requests / seconds:,.0f}/s)")
    print(f"fresh ISNs: {'yes' if fresh else 'no'}, peer_affinity={args.peer_affinity!r}")
    print(f"socket() calls: {stats.created}, reused: {stats.reused}, kept alive: {stats.kept_alive}")
    print(f"TIME_WAIT left: client {after[0] - before[0]}, servers {after[1] - before[1]}")
    print(f"pool: {stats}")
    for reason, count in failures.most_common():
        print(f"{count} x {reason}")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description="Crawl many local peers through one trio-recycle pool.")
    parser.add_argument("--peers", type=int, default=50, help="servers on 127.0.0.2 and up (default 50, at most 250)")
    parser.add_argument("--requests", type=int, default=2000, help="requests in all (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--capacity", type=int, default=32, help="pool capacity (default 32)")
    parser.add_argument(
        "--servers",
        choices=["close", "keepalive"],
        default="close",
        help="close: the server closes after each answer (default); keepalive: it keeps the connection",
    )
    parser.add_argument(
        "--peer-affinity",
        choices=list(AFFINITY),
        default="auto",
        help="the pool's peer_affinity: auto (the default: only where ISNs are not fresh), on, off",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.peers <= 250:
        parser.error("--peers must be between 1 and 250")
    if args.requests < 1 or args.concurrency < 1 or args.capacity < 1:
        parser.error("--requests, --concurrency and --capacity must be >= 1")
    return Args(args.peers, args.requests, args.concurrency, args.capacity, args.servers, AFFINITY[args.peer_affinity])


async def main(args: Args) -> None:
    print(
        f"{args.requests} requests over {args.peers} peers ({args.servers} servers),"
        f" {args.concurrency} at a time, capacity {args.capacity}",
        flush=True,
    )
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, args)
        status = await crawl(args, peers)
        nursery.cancel_scope.cancel()
    sys.exit(status)


if __name__ == "__main__":
    trio.run(main, parse_args())
