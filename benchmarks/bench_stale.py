"""The stale-connection race: an upstream whose idle timeout equals the client's pause, three clients.

What it measures: failed requests, not speed. A keep-alive upstream
(``examples/upstream_server.py --keepalive-timeout T``, its own process)
closes a connection that stayed idle for T seconds; the clients pause T
seconds between two requests on a connection. So the upstream's close and
the next request cross on the wire, again and again: the request meets a
closed connection, and the client gets "Server disconnected without
sending a response" or a reset. Three clients make the same requests:

* ``httpx``          -- ``httpx.AsyncClient()`` with its defaults (keep-alive, no retry);
* ``RecyclingTransport`` -- ``httpx.AsyncClient(transport=RecyclingTransport(pool))``,
  which resends an idempotent request that failed that way;
* ``pool, no retry`` -- ``pool.open_tcp_stream`` and ``stream.release()``, failing as httpx does;
* ``pool + retry``   -- the same, and a request that failed before any byte
  of the answer on a connection that ``stream.kept_alive`` says was
  released before is sent once more (``examples/keepalive_client.py``'s
  ``fetch``, the rule of ``examples/reverse_proxy.py``).

Every request is a GET whose answer names its path; anything else counts
as a failure. Each client gets a fresh upstream, ``--clients`` tasks each
sending ``--requests / --clients`` requests in turn, pausing ``--gap``
seconds after each answer, give or take ``--jitter`` (10 % by default):
without it, which client loses the race depends on how fast it answers
(a client whose next request always lands just after the server's FIN
never meets the race), and the jitter sweeps every client across the
moment of the close alike. ``--repeats`` runs each, the order rotating.

Run it with::

    python benchmarks/bench_stale.py                 # 3 x 1000 requests per client, about 20 s
    python benchmarks/bench_stale.py --quick
    python benchmarks/bench_stale.py --gap 0.1 --requests 2000

It needs httpx (``nox -s bench`` installs it; the httpx client is skipped
with a message without it). Results: a table on stdout, and ``stale.md``
and ``stale.json`` in ``benchmarks/results`` (``--out``). The exit status
is 1 if ``pool + retry`` or ``RecyclingTransport`` lost a request.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

import trio_recycle

HERE: Final = Path(__file__).resolve().parent
EXAMPLES: Final = HERE.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import keepalive_client  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

DEFAULT_OUT: Final = HERE / "results"
#: Seconds one request may take before it counts as failed.
REQUEST_TIMEOUT: Final = 10.0
CLIENTS: Final = ("httpx", "RecyclingTransport", "pool, no retry", "pool + retry")


@attrs.frozen
class Settings:
    requests: int
    clients: int
    gap: float
    jitter: float
    repeats: int
    out: Path


@attrs.define
class Result:
    client: str
    requests: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    seconds: float = 0.0
    idle_closed: int = 0


async def fetch_without_retry(pool: trio_recycle.SocketPool, host: str, port: int, path: str) -> bytes:
    """`keepalive_client.fetch` without its retry: a stale connection fails the request."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    async with await pool.open_tcp_stream(host, port) as stream:
        await stream.send_all(request)
        response = await keepalive_client.read_response(stream)
        if response.keep_alive:
            await stream.release()
    return response.body


async def load(result: Result, settings: Settings, fetch: Callable[[str], Awaitable[bytes]]) -> None:
    """``settings.clients`` tasks, each sending its requests in turn, pausing ``gap`` after each answer."""

    async def client(number: int) -> None:
        for sequence in range(settings.requests // settings.clients):
            path = f"/stale/{number}/{sequence}"
            result.requests += 1
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    body = await fetch(path)
            except Exception as exc:
                # Whatever the client raises is a lost request: count it by kind.
                result.failures[f"{type(exc).__name__}: {exc}"[:120]] += 1
            else:
                if not body.startswith(f"GET {path}\n".encode()):
                    result.failures["the answer to another request"] += 1
            await trio.sleep(settings.gap * (1 + settings.jitter * (2 * random.random() - 1)))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for number in range(settings.clients):
            nursery.start_soon(client, number)
    result.seconds = trio.current_time() - start


async def run_one(name: str, settings: Settings, httpx: Any) -> Result:
    """One client against a fresh upstream whose idle timeout is the gap."""
    argv = [
        sys.executable,
        str(EXAMPLES / "upstream_server.py"),
        "--listen",
        "127.0.0.1:0",
        "--keepalive-requests",
        "1000000",
        "--keepalive-timeout",
        str(settings.gap),
    ]
    result = Result(name)
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        output = bytearray()
        with trio.fail_after(10):
            while (match := re.search(rb"listening on (\S+):(\d+)\n", output)) is None:
                data = await process.stdout.receive_some()
                if not data:
                    raise RuntimeError(f"the upstream exited: {output.decode(errors='replace')}")
                output += data
        host, port = match[1].decode(), int(match[2])
        if name == "httpx":
            async with httpx.AsyncClient() as client:

                async def fetch(path: str) -> bytes:
                    response = await client.get(f"http://{host}:{port}{path}")
                    body: bytes = response.content
                    return body

                await load(result, settings, fetch)
        elif name == "RecyclingTransport":
            from trio_recycle.httpx import RecyclingTransport

            async with (
                trio_recycle.open_socket_pool(capacity=settings.clients) as pool,
                httpx.AsyncClient(transport=RecyclingTransport(pool)) as client,
            ):

                async def fetch(path: str) -> bytes:
                    response = await client.get(f"http://{host}:{port}{path}")
                    body: bytes = response.content
                    return body

                await load(result, settings, fetch)
        else:
            async with trio_recycle.open_socket_pool(capacity=settings.clients) as pool:
                if name == "pool + retry":

                    async def fetch(path: str) -> bytes:
                        return (await keepalive_client.fetch(pool, host, port, path)).body

                else:

                    async def fetch(path: str) -> bytes:
                        return await fetch_without_retry(pool, host, port, path)

                await load(result, settings, fetch)
        process.send_signal(2)
        with trio.fail_after(10):
            async for data in process.stdout:
                output += data
            await process.wait()
        closed = re.search(rb"closed (\d+) idle connections", output)
        result.idle_closed = int(closed[1]) if closed else 0
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    return result


async def main(settings: Settings) -> int:
    try:
        httpx = importlib.import_module("httpx")
    except ImportError:
        httpx = None
        print("httpx is not installed: its client is skipped (pip install httpx; nox -s bench installs it)")
    names = [name for name in CLIENTS if not name.endswith(("httpx", "Transport")) or httpx is not None]
    print(
        f"the stale-connection race: upstream idle timeout = client pause = {settings.gap:g} s"
        f" (+-{100 * settings.jitter:g} %);"
        f" {settings.requests} requests per run from {settings.clients} clients, {settings.repeats} run(s) each",
        flush=True,
    )
    results: dict[str, list[Result]] = {name: [] for name in names}
    for repeat in range(settings.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            result = await run_one(name, settings, httpx)
            results[name].append(result)
            print(
                f"  run {repeat + 1}: {name:15} {sum(result.failures.values()):4} failed of {result.requests},"
                f" upstream closed {result.idle_closed} idle connections",
                flush=True,
            )
    lines = [
        "| client | requests | failed | failed per 1000 | idle closes by the upstream |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        requests = sum(r.requests for r in runs)
        failed = sum(sum(r.failures.values()) for r in runs)
        closes = sum(r.idle_closed for r in runs)
        lines.append(f"| {name} | {requests:,} | {failed:,} | {1000 * failed / requests:.1f} | {closes:,} |")
    reasons = []
    for name, runs in results.items():
        total: Counter[str] = Counter()
        for run in runs:
            total.update(run.failures)
        reasons += [f"- {name}: {count} x {reason}" for reason, count in total.most_common(3)]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# The stale-connection race: failed requests",
            "",
            f"Measured {when} with `python benchmarks/bench_stale.py --gap {settings.gap:g}"
            f" --jitter {settings.jitter:g}"
            f" --requests {settings.requests} --clients {settings.clients} --repeats {settings.repeats}`:"
            f" an upstream (`examples/upstream_server.py`, its own process) that closes a connection idle for"
            f" {settings.gap:g} s, and clients that pause {settings.gap:g} s (+-{100 * settings.jitter:g} %)"
            " after every answer.",
            "",
            *lines,
            "",
            "Most frequent failures:" if reasons else "No failures.",
            "",
            *reasons,
            "",
        ]
    )
    print()
    print(text)
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "stale.md").write_text(text)
    document = {
        "settings": {**attrs.asdict(settings), "out": str(settings.out)},
        "when": when,
        "runs": {name: [attrs.asdict(r) for r in runs] for name, runs in results.items()},
    }
    (settings.out / "stale.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {settings.out / 'stale.md'} and {settings.out / 'stale.json'}")
    retrying = [name for name in ("pool + retry", "RecyclingTransport") if name in results]
    return 1 if any(sum(r.failures.values()) for name in retrying for r in results[name]) else 0


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description="The stale-connection race: httpx's default client and the pool.")
    parser.add_argument("--requests", type=int, help="requests per run (default 1000; --quick: 200)")
    parser.add_argument("--clients", type=int, default=10, help="client tasks (default 10)")
    parser.add_argument(
        "--gap", type=float, default=0.02, help="the pause and the idle timeout, seconds (default 0.02)"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.1, help="each pause is gap x (1 +- jitter), uniform (default 0.1)"
    )
    parser.add_argument("--repeats", type=int, help="runs per client (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    requests = args.requests if args.requests is not None else 200 if args.quick else 1000
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else 3
    if requests < args.clients or args.clients < 1 or not args.gap > 0 or repeats < 1 or not 0 <= args.jitter < 1:
        parser.error("--requests must be >= --clients >= 1, --gap > 0, --jitter in [0, 1), --repeats >= 1")
    return Settings(requests, args.clients, args.gap, args.jitter, repeats, args.out)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
