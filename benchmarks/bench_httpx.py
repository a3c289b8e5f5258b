"""httpx over recycled sockets: stock httpx.AsyncClient vs AsyncClient(transport=RecyclingTransport(pool)).

What it measures: requests/s of one ``httpx.AsyncClient`` making GET
requests as fast as it can from 1 and from 16 tasks, against two upstreams
in their own process: one that closes after every response (``Connection:
close``) and one that keeps connections alive. Each client runs two ways:

* ``stock`` -- ``httpx.AsyncClient()``: httpcore's trio backend, a new
  socket per connection;
* ``pool``  -- ``httpx.AsyncClient(transport=RecyclingTransport(pool))``,
  with a pool of capacity 2 x tasks.

Side by side: for each upstream and concurrency, both clients are open
at once, each against its own fresh upstream process, and they take turns:
one slice of ``--slice`` seconds each per round, the order alternating,
for ``--rounds`` rounds, so that a slowdown of the (shared) machine hits
both alike. Per variant: requests/s (median over its slices, min-max), the
client's CPU time per request (user + system, from getrusage: the steadier
figure when the machine is shared), ``socket()`` calls (an audit hook) and
TIME_WAIT entries left on its upstream. The ratios pool/stock, of the
medians and paired (the median of the per-round ratios), are checked
against the targets of docs/benchmarks.md (>= 1.3x at 1 task and >= 1.15x at 16
tasks against the closing upstream, >= 0.95x against keep-alive, no
TIME_WAIT on the upstream, ``socket()`` calls within the pool's capacity).

The upstream is nginx when it is installed (``--upstream auto``, the
default), else ``benchmarks/http_upstream.py``. Run it with::

    python benchmarks/bench_httpx.py                 # 10 rounds of 1 s per variant, about 1.5 minutes
    python benchmarks/bench_httpx.py --quick         # a smoke run, seconds
    python benchmarks/bench_httpx.py --upstream python --slice 2 --rounds 15

Results: a table on stdout, and ``httpx.md`` and ``httpx.json`` in
``benchmarks/results`` (``--out``). It needs the ``httpx`` extra and Linux
(/proc). The exit status is 1 if a request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import httpx
import trio

import trio_recycle
from trio_recycle.httpx import RecyclingTransport

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE: Final = Path(__file__).resolve().parent
DEFAULT_OUT: Final = HERE / "results"
MODES: Final = ("close", "keep-alive")
TASKS: Final = (1, 16)
VARIANTS: Final = ("stock", "pool")
LABELS: Final = {"stock": "httpx.AsyncClient()", "pool": "RecyclingTransport(pool)"}
#: Targets: pool/stock requests/s, per (upstream mode, tasks).
TARGETS: Final = {("close", 1): 1.3, ("close", 16): 1.15, ("keep-alive", 1): 0.95, ("keep-alive", 16): 0.95}
TCP_TIME_WAIT: Final = 6


@attrs.frozen
class Settings:
    slice: float
    slices: int
    warmup: float
    size: int
    upstream: str
    round_trips: int
    out: Path


@attrs.frozen
class Slice:
    """One variant's share of one round: requests done in ``seconds``."""

    requests: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@attrs.frozen
class Cell:
    """One variant against one upstream at one concurrency."""

    mode: str
    tasks: int
    variant: str
    slices: list[Slice]
    failed: int
    socket_calls: int
    time_wait: int
    capacity: int
    pool_stats: str

    @property
    def rate(self) -> float:
        return statistics.median(s.rate for s in self.slices)


@attrs.define
class SocketCounter:
    """Counts ``socket.socket()`` constructions through the ``socket.__new__`` audit event."""

    count: int = 0

    def hook(self, event: str, args: tuple[object, ...]) -> None:
        if event == "socket.__new__":
            self.count += 1


# ----------------------------------------------------------------------
# Upstreams, each in its own process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


NGINX_CONF: Final = """
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_timeout {keepalive};
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "{body}"; }}
    }}
}}
"""


@contextlib.contextmanager
def upstream(kind: str, mode: str, size: int) -> Iterator[int]:
    """Start an upstream in its own process; yield its port."""
    with tempfile.TemporaryDirectory(prefix="bench-httpx-") as root:
        if kind == "nginx":
            port = free_port()
            conf = Path(root, "nginx.conf")
            # keepalive_timeout 0: nginx answers with Connection: close and closes.
            keepalive = "0" if mode == "close" else "300s"
            conf.write_text(NGINX_CONF.format(root=root, port=port, keepalive=keepalive, body="x" * size))
            argv = ["nginx", "-e", f"{root}/error.log", "-p", root, "-c", str(conf)]
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not _listening(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {Path(root, 'error.log').read_text()}")
                time.sleep(0.01)
        else:
            argv = [sys.executable, str(HERE / "http_upstream.py"), "--mode", mode, "--size", str(size)]
            process = subprocess.Popen(argv, stdout=subprocess.PIPE)
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 10)
            line = process.stdout.readline().decode() if ready else ""
            if not line.startswith("listening on "):
                raise RuntimeError(f"http_upstream.py did not start: {line!r}")
            port = int(line.rsplit(":", 1)[1])
        try:
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def time_wait_count(port: int) -> int:
    """TIME_WAIT entries whose local port is ``port`` (the upstream's side)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[3], 16) == TCP_TIME_WAIT and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


# ----------------------------------------------------------------------
# One cell: one client, one upstream, some tasks, a fixed duration


@attrs.define
class Tally:
    requests: int = 0
    failed: int = 0


async def load(client: httpx.AsyncClient, url: str, tasks: int, seconds: float, size: int) -> Tally:
    """``tasks`` workers make requests until ``seconds`` have passed, each finishing the one it is in.

    No request is cancelled half way: a cancelled request makes httpcore
    close its connection (and can leave httpcore's pool with connections
    nobody owns, httpcore issue 1093), which is not what is measured here.
    """
    tally = Tally()
    deadline = trio.current_time() + seconds
    with trio.fail_after(seconds + 30):
        async with trio.open_nursery() as nursery:

            async def worker() -> None:
                while trio.current_time() < deadline:
                    try:
                        response = await client.get(url)
                    except httpx.HTTPError:
                        tally.failed += 1
                        continue
                    if response.status_code == 200 and len(response.content) == size:
                        tally.requests += 1
                    else:
                        tally.failed += 1

            for _ in range(tasks):
                nursery.start_soon(worker)
    return tally


@attrs.define
class Client:
    """One variant's client, its upstream's port, and what it did so far."""

    variant: str
    client: httpx.AsyncClient
    port: int
    capacity: int
    pool: trio_recycle.SocketPool | None
    slices: list[Slice] = attrs.field(factory=list)
    failed: int = 0
    socket_calls: int = 0


async def run_pair(
    settings: Settings, counter: SocketCounter, ports: dict[str, int], mode: str, tasks: int
) -> list[Cell]:
    """Both variants side by side: alternating slices of ``settings.slice`` seconds each."""
    capacity = 2 * tasks
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for variant in VARIANTS:
            pool = None
            transport: httpx.AsyncBaseTransport
            if variant == "pool":
                pool = await stack.enter_async_context(trio_recycle.open_socket_pool(capacity=capacity))
                transport = RecyclingTransport(pool)
            else:
                transport = httpx.AsyncHTTPTransport()
            client = await stack.enter_async_context(httpx.AsyncClient(transport=transport))
            clients.append(Client(variant, client, ports[variant], capacity if pool else 0, pool))

        async def run_slice(c: Client, seconds: float, *, record: bool) -> None:
            url = f"http://127.0.0.1:{c.port}/"
            sockets = counter.count
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            tally = await load(c.client, url, tasks, seconds, settings.size)
            elapsed = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            c.socket_calls += counter.count - sockets
            c.failed += tally.failed
            if record:
                cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
                c.slices.append(Slice(tally.requests, elapsed, cpu))

        for c in clients:
            await run_slice(c, settings.warmup, record=False)
        for index in range(settings.slices):
            for c in clients if index % 2 == 0 else clients[::-1]:
                await run_slice(c, settings.slice, record=True)
        for c in clients:
            await c.client.aclose()
    # The last FINs are handled in the kernel's softirq: a moment to settle.
    await trio.sleep(0.2)
    return [
        Cell(
            mode,
            tasks,
            c.variant,
            c.slices,
            c.failed,
            c.socket_calls,
            time_wait_count(c.port),
            c.capacity,
            repr(c.pool.statistics()) if c.pool is not None else "",
        )
        for c in clients
    ]


# ----------------------------------------------------------------------
# The network streams alone: httpcore's trio backend vs RecyclingBackend

REQUEST: Final = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@attrs.frozen
class StreamCost:
    backend: str
    round_trip_us: float
    is_readable_us: float


async def stream_costs(port: int, size: int, round_trips: int, repeats: int) -> list[StreamCost]:
    """CPU per request/response round trip and per ``is_readable`` on one kept-alive connection.

    The httpcore network stream without httpx or httpcore's pool around
    it, so that the difference between the two backends is not lost in the
    ~1 ms httpx spends per request. The stock backend is httpcore's own
    ``TrioBackend``, what httpx uses under trio.
    """
    from httpcore._backends.trio import TrioBackend

    from trio_recycle.httpx import RecyclingBackend

    samples: dict[str, list[tuple[float, float]]] = {"stock": [], "pool": []}
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        backends = {"stock": TrioBackend(), "pool": RecyclingBackend(pool)}
        for index in range(repeats):
            for name in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
                stream = await backends[name].connect_tcp("127.0.0.1", port, timeout=10)
                start = time.process_time()
                for _ in range(round_trips):
                    await stream.write(REQUEST, timeout=10)
                    received = 0
                    while received < size:
                        received += len(await stream.read(65536, timeout=10))
                round_trip = (time.process_time() - start) / round_trips
                start = time.process_time()
                for _ in range(round_trips * 10):
                    stream.get_extra_info("is_readable")
                readable = (time.process_time() - start) / (round_trips * 10)
                await stream.aclose()
                samples[name].append((round_trip, readable))
    return [
        StreamCost(
            name,
            statistics.median(r for r, _ in samples[name]) * 1e6,
            statistics.median(i for _, i in samples[name]) * 1e6,
        )
        for name in VARIANTS
    ]


def stream_table(costs: list[StreamCost]) -> str:
    stock, pool = costs
    return "\n".join(
        [
            "| network stream | CPU us per round trip | CPU us per is_readable |",
            "|---|---:|---:|",
            f"| httpcore TrioBackend (stock) | {stock.round_trip_us:.1f} | {stock.is_readable_us:.2f} |",
            f"| RecyclingBackend | {pool.round_trip_us:.1f} ({pool.round_trip_us / stock.round_trip_us:.2f}x)"
            f" | {pool.is_readable_us:.2f} ({pool.is_readable_us / stock.is_readable_us:.2f}x) |",
        ]
    )


# ----------------------------------------------------------------------
# Summary and report


def ratios(cells: list[Cell]) -> dict[tuple[str, int], tuple[float, float, list[float]]]:
    """pool/stock per (mode, tasks): of the median rates, of CPU per request, and per round."""
    result = {}
    for mode in MODES:
        for tasks in TASKS:
            pair = {c.variant: c for c in cells if (c.mode, c.tasks) == (mode, tasks)}
            if set(pair) != set(VARIANTS):
                continue
            stock, pool = pair["stock"], pair["pool"]
            rounds = [p.rate / s.rate for s, p in zip(stock.slices, pool.slices, strict=True) if s.requests]
            cpu = cpu_per_request(stock) / cpu_per_request(pool)
            result[mode, tasks] = (pool.rate / stock.rate, cpu, rounds)
    return result


def cpu_per_request(cell: Cell) -> float:
    """Seconds of this process's CPU per request, over all rounds."""
    return sum(s.cpu_seconds for s in cell.slices) / max(1, sum(s.requests for s in cell.slices))


def check_targets(cells: list[Cell]) -> list[str]:
    lines = []
    for (mode, tasks), (ratio, cpu, rounds) in ratios(cells).items():
        target = TARGETS[mode, tasks]
        paired = statistics.median(rounds) if rounds else 0.0
        mark = "ok" if ratio >= target and paired >= target else "MISS"
        lines.append(
            f"[{mark}] {mode} upstream, {tasks} task(s): {ratio:.2f}x stock requests/s (paired {paired:.2f}x;"
            f" target >= {target}x); CPU per request {1 / cpu:.2f}x stock's"
        )
    for cell in cells:
        if cell.variant != "pool":
            continue
        if cell.mode == "close":
            mark = "ok" if cell.time_wait == 0 else "MISS"
            lines.append(
                f"[{mark}] {cell.tasks} task(s): {cell.time_wait} TIME_WAIT on the closing upstream (target 0)"
            )
        mark = "ok" if cell.socket_calls <= cell.capacity else "MISS"
        lines.append(
            f"[{mark}] {cell.mode} upstream, {cell.tasks} task(s): {cell.socket_calls} socket() calls,"
            f" capacity {cell.capacity}"
        )
    failed = sum(cell.failed for cell in cells)
    lines.append(f"[{'ok' if failed == 0 else 'MISS'}] {failed} failed requests")
    return lines


def table(cells: list[Cell]) -> str:
    ratio = ratios(cells)
    out = [
        "| upstream | tasks | client | requests/s (min-max) | CPU us/request | socket() calls | TIME_WAIT on upstream |"
        " pool/stock: requests/s (paired) | pool/stock: CPU |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        rates = [s.rate for s in cell.slices]
        shown = ["", ""]
        if cell.variant == "pool" and (cell.mode, cell.tasks) in ratio:
            overall, cpu, rounds = ratio[cell.mode, cell.tasks]
            shown = [f"**{overall:.2f}x** ({statistics.median(rounds):.2f}x)", f"{1 / cpu:.2f}x"]
        out.append(
            f"| {cell.mode} | {cell.tasks} | {LABELS[cell.variant]} | {cell.rate:,.0f} ({min(rates):,.0f}-"
            f"{max(rates):,.0f}) | {cpu_per_request(cell) * 1e6:,.0f} | {cell.socket_calls:,} |"
            f" {cell.time_wait:,} | {shown[0]} | {shown[1]} |"
        )
    return "\n".join(out)


def machine(upstream_kind: str) -> dict[str, object]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "httpx": httpx.__version__,
        "httpcore": __import__("httpcore").__version__,
        "trio_recycle": trio_recycle.__version__,
        "can_recycle": trio_recycle.can_recycle(),
        "upstream": upstream_kind,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per variant and round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds: each variant runs one slice per round")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--round-trips", type=int, default=3000, help="per sample of the network streams alone")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 0.2 s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for httpx.md and httpx.json")
    args = parser.parse_args(argv)
    kind = args.upstream
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "python"
    if args.quick:
        return Settings(0.2, 2, 0.1, args.size, kind, 200, args.out)
    return Settings(args.slice, args.rounds, 0.5, args.size, kind, args.round_trips, args.out)


def main(settings: Settings) -> None:
    counter = SocketCounter()
    sys.addaudithook(counter.hook)
    info = machine(settings.upstream)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cells: list[Cell] = []
    for mode in MODES:
        for tasks in TASKS:
            # A fresh upstream per variant: the TIME_WAIT entries on its
            # port are that variant's own.
            with (
                upstream(settings.upstream, mode, settings.size) as stock_port,
                upstream(settings.upstream, mode, settings.size) as pool_port,
            ):
                pair = trio.run(run_pair, settings, counter, {"stock": stock_port, "pool": pool_port}, mode, tasks)
            cells += pair
            for cell in pair:
                print(
                    f"{mode:10} {tasks:2} task(s) {cell.variant:5} {cell.rate:8,.0f} requests/s,"
                    f" {cpu_per_request(cell) * 1e6:6,.0f} us CPU/request, {cell.socket_calls} socket(),"
                    f" {cell.time_wait} TIME_WAIT {cell.pool_stats}",
                    flush=True,
                )
    # The response body counts: the round trip reads the head too, so wait
    # for at least the body's bytes (the head is shorter than the margin).
    with upstream(settings.upstream, "keep-alive", settings.size) as port:
        costs = trio.run(stream_costs, port, settings.size, settings.round_trips, 5 if settings.slices > 2 else 1)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    checks = check_targets(cells)
    command = " ".join(["python", "benchmarks/bench_httpx.py", *sys.argv[1:]])
    text = table(cells) + "\n\nThe network streams alone, on one kept-alive connection:\n\n" + stream_table(costs)
    print()
    print(text)
    print()
    print("\n".join(checks))
    settings.out.mkdir(parents=True, exist_ok=True)
    report = [
        f"# httpx: stock vs RecyclingTransport ({started})",
        "",
        f"Command: `{command}`; upstream: {settings.upstream}; {settings.slices} rounds of {settings.slice} s"
        f" per variant, alternating; response body {settings.size} bytes.",
        "",
        text,
        "",
        *(f"- {line}" for line in checks),
        "",
        f"Machine: {json.dumps(info)}",
        "",
    ]
    (settings.out / "httpx.md").write_text("\n".join(report))
    document = {
        "command": command,
        "started": started,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in attrs.asdict(settings).items()},
        "machine": info,
        "cells": [
            {**attrs.asdict(cell), "rate": cell.rate, "cpu_us_per_request": cpu_per_request(cell) * 1e6}
            for cell in cells
        ],
        "streams": [attrs.asdict(cost) for cost in costs],
        "ratios": {f"{m}/{t}": {"requests": r, "cpu": c, "paired": rs} for (m, t), (r, c, rs) in ratios(cells).items()},
        "checks": checks,
    }
    (settings.out / "httpx.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {settings.out / 'httpx.md'} and {settings.out / 'httpx.json'}")
    if any(cell.failed for cell in cells):
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
