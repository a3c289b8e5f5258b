"""Fetch many URLs with httpx, over sockets recycled by a trio-recycle pool.

What it shows: the one-line switch for an httpx program. Everything is
ordinary httpx, except where the client gets its connections::

    async with trio_recycle.open_socket_pool(capacity=16) as pool:
        async with httpx.AsyncClient(transport=RecyclingTransport(pool)) as client:
            ...

Some tasks share one client and fetch ``--requests`` URLs of the form
``http://HOST:PORT/item/<n>``, checking that each answer is for its own
URL (``upstream_server.py`` echoes the request line in its body). At the
end it prints how many succeeded and the pool's statistics: against a
server that closes after each response, ``created`` stays at most the
number of tasks however many URLs were fetched, because every connection
reuses a recycled socket.

Run it (it needs the ``httpx`` extra, ``pip install 'trio-recycle[httpx]'``)::

    python examples/upstream_server.py --listen 127.0.0.1:8000 &
    python examples/httpx_fetch.py --upstream 127.0.0.1:8000 --requests 1000 --tasks 8

It exits with status 1 if a request failed.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import attrs
import httpx
import trio

import trio_recycle
from trio_recycle.httpx import RecyclingTransport


@attrs.frozen
class Args:
    base_url: str
    requests: int
    tasks: int
    capacity: int


async def fetch_all(client: httpx.AsyncClient, args: Args) -> Counter[str]:
    """Fetch every URL with ``args.tasks`` tasks; count the outcomes."""
    outcomes: Counter[str] = Counter()
    todo = iter(range(args.requests))

    async def worker() -> None:
        for n in todo:
            path = f"/item/{n}"
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                continue
            if response.status_code == 200 and response.text.startswith(f"GET {path}\n"):
                outcomes["ok"] += 1
            else:
                outcomes[f"unexpected answer {response.status_code}"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(args.tasks):
            nursery.start_soon(worker)
    return outcomes


async def main(args: Args) -> None:
    async with trio_recycle.open_socket_pool(capacity=args.capacity) as pool:
        transport = RecyclingTransport(pool)
        async with httpx.AsyncClient(transport=transport, base_url=args.base_url) as client:
            start = trio.current_time()
            outcomes = await fetch_all(client, args)
            seconds = trio.current_time() - start
        stats = pool.statistics()
    ok = outcomes.pop("ok", 0)
    print(f"fetched {ok} of {args.requests} URLs in {seconds:.2f} s with {args.tasks} tasks")
    for reason, count in outcomes.items():
        print(f"failed: {count} x {reason}")
    print(f"pool: {stats}")
    print(f"socket() calls: {stats.created} for {args.requests} requests (pool capacity {stats.capacity})")
    if outcomes:
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upstream", default="127.0.0.1:8000", help="HOST:PORT of an HTTP server")
    parser.add_argument("--requests", type=int, default=1000, help="URLs to fetch (default 1000)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks fetching at once (default 8)")
    parser.add_argument("--capacity", type=int, default=16, help="pool capacity (default 16)")
    args = parser.parse_args(argv)
    _, sep, port = args.upstream.rpartition(":")
    if not sep or not port.isdigit():
        parser.error(f"--upstream: expected HOST:PORT, not {args.upstream!r}")
    if args.requests < 1 or args.tasks < 1 or args.capacity < 1:
        parser.error("--requests, --tasks and --capacity must be >= 1")
    return Args(f"http://{args.upstream}", args.requests, args.tasks, args.capacity)


if __name__ == "__main__":
    trio.run(main, parse_args())
