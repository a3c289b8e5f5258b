"""The stale-connection race: an upstream whose idle timeout equals the client's pause, four clients.

What it measures: failed requests, not speed. A keep-alive upstream
(``examples/upstream_server.py --keepalive-timeout T``, its own process)
closes a connection that stayed idle for T seconds; the clients pause T
seconds between two requests on a connection. So the upstream's close and
the next request cross on the wire, again and again: the request meets a
closed connection, and the client gets "Server disconnected without
sending a response" or a reset. Four clients make the same requests:

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

import importlib
import random
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from harness import cli, report, runs, servers
from harness.machine import load_average, machine
from harness.targets import judge, target

import trio_recycle

HERE: Final = Path(__file__).resolve().parent
EXAMPLES: Final = HERE.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import keepalive_client  # noqa: E402

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

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
    argv = servers.python_server(
        EXAMPLES / "upstream_server.py",
        "--listen=127.0.0.1:0",
        "--keepalive-requests=1000000",
        f"--keepalive-timeout={settings.gap}",
    )
    result = Result(name)
    host = "127.0.0.1"
    with servers.child_server(argv, stop_signal=signal.SIGINT) as server:
        port = server.port
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
                        response: keepalive_client.Response = await keepalive_client.fetch(pool, host, port, path)
                        return response.body

                else:

                    async def fetch(path: str) -> bytes:
                        return await fetch_without_retry(pool, host, port, path)

                await load(result, settings, fetch)
        output = server.stop(signal.SIGINT)
    closed = re.search(rb"closed (\d+) idle connections", output)
    result.idle_closed = int(closed[1]) if closed else 0
    return result


async def run_all(settings: Settings) -> dict[str, list[Result]]:
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
        for name in runs.rotated(names, repeat):
            result = await run_one(name, settings, httpx)
            results[name].append(result)
            print(
                f"  run {repeat + 1}: {name:15} {sum(result.failures.values()):4} failed of {result.requests},"
                f" upstream closed {result.idle_closed} idle connections",
                flush=True,
            )
    return results


def measure(settings: Settings) -> report.Document:
    info = machine()
    started, start = report.now(), time.perf_counter()
    results = trio.run(run_all, settings)
    info["loadavg_end"] = load_average()
    return report.document("stale", settings, info, started, time.perf_counter() - start, runs=results)


def render(doc: report.Document) -> report.Report:
    s = doc["settings"]
    results = {
        name: [Result(**{**r, "failures": Counter(r["failures"])}) for r in runs] for name, runs in doc["runs"].items()
    }
    out = report.Report("The stale-connection race: failed requests")
    out.add(
        f"An upstream (`examples/upstream_server.py`, its own process) that closes a connection idle for"
        f" {s['gap']:g} s, and {s['clients']} clients that pause {s['gap']:g} s (+-{100 * s['jitter']:g} %) after"
        f" every answer; {s['requests']} requests per run, {s['repeats']} run(s) per client, the order rotating."
    )
    cells = []
    reasons = []
    for name, client_runs in results.items():
        requests = sum(r.requests for r in client_runs)
        failed = sum(sum(r.failures.values()) for r in client_runs)
        closes = sum(r.idle_closed for r in client_runs)
        cells.append([name, f"{requests:,}", f"{failed:,}", f"{1000 * failed / max(requests, 1):.1f}", f"{closes:,}"])
        total: Counter[str] = Counter()
        for run in client_runs:
            total.update(run.failures)
        reasons += [f"- {name}: {count} x {reason}" for reason, count in total.most_common(3)]
    out.table(["client", "requests", "failed", "failed per 1000", "idle closes by the upstream"], cells)
    out.add("Most frequent failures:\n\n" + "\n".join(reasons) if reasons else "No failures.")
    # The two clients that retry the race: neither may lose a request.
    lost = sum(
        sum(r.failures.values()) for name in ("pool + retry", "RecyclingTransport") for r in results.get(name, [])
    )
    out.verdicts.append(judge(target("stale", "lost"), lost, measured=str(lost)))
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = cli.parser(__doc__, quick="200 requests, 1 run per client", repeats="runs per client; default 3")
    parser.add_argument("--requests", type=int, help="requests per run (default 1000; --quick: 200)")
    parser.add_argument("--clients", type=int, default=10, help="client tasks (default 10)")
    parser.add_argument(
        "--gap", type=float, default=0.02, help="the pause and the idle timeout, seconds (default 0.02)"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.1, help="each pause is gap x (1 +- jitter), uniform (default 0.1)"
    )
    args = parser.parse_args(argv)
    requests = args.requests if args.requests is not None else 200 if args.quick else 1000
    if requests < args.clients or args.clients < 1 or not args.gap > 0 or not 0 <= args.jitter < 1:
        parser.error("--requests must be >= --clients >= 1, --gap > 0, --jitter in [0, 1)")
    return args, Settings(requests, args.clients, args.gap, args.jitter, cli.repeats(args, 3))


if __name__ == "__main__":
    arguments, settings = parse_args()
    # The exit status is 1 if ``pool + retry`` lost a request.
    sys.exit(cli.main("stale", arguments, settings, measure, render, fail_on=lambda r: bool(r.missed)))
