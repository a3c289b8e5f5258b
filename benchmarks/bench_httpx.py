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
for ``--repeats`` rounds, so that a slowdown of the (shared) machine hits
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
    python benchmarks/bench_httpx.py --upstream python --slice 2 --repeats 15

Results: a table on stdout, and ``httpx.md`` and ``httpx.json`` in
``benchmarks/results`` (``--out``). It needs the ``httpx`` extra and Linux
(/proc). The exit status is 1 if a request failed.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx
import trio
from harness import cli, counters, report, runs, servers
from harness.machine import load_average, machine
from harness.targets import judge, target

import trio_recycle
from trio_recycle.httpx import RecyclingTransport

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

HERE: Final = Path(__file__).resolve().parent
MODES: Final = ("close", "keep-alive")
TASKS: Final = (1, 16)
VARIANTS: Final = ("stock", "pool")
LABELS: Final = {"stock": "httpx.AsyncClient()", "pool": "RecyclingTransport(pool)"}


@attrs.frozen
class Settings:
    slice: float
    slices: int
    warmup: float
    size: int
    upstream: str
    round_trips: int


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
        return runs.median(s.rate for s in self.slices)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        fields = {f.name for f in attrs.fields(cls)}
        kept = {k: v for k, v in data.items() if k in fields and k != "slices"}
        return cls(**kept, slices=[Slice(**s) for s in data["slices"]])


# ----------------------------------------------------------------------
# Upstreams, each in its own process


@contextlib.contextmanager
def upstream(kind: str, mode: str, size: int) -> Iterator[int]:
    """Start an upstream (nginx, or http_upstream.py) in its own process; yield its port."""
    if kind == "nginx":
        # keepalive_timeout 0: nginx answers with Connection: close and closes.
        argv = servers.nginx_server(
            "--fixed-body",
            f"--size={size}",
            f"--keepalive-timeout={0 if mode == 'close' else 300}",
            "--keepalive-requests=10000000",
            "--worker-connections=8192",
        )
    else:
        argv = servers.python_server(HERE / "http_upstream.py", "--mode", mode, "--size", str(size))
    with servers.child_server(argv) as server:
        yield server.port


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


async def run_pair(settings: Settings, ports: dict[str, int], mode: str, tasks: int) -> list[Cell]:
    """Both variants side by side: alternating slices of ``settings.slice`` seconds each."""
    counter = counters.socket_counter()
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
            for c in runs.rotated(clients, index):
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
            counters.time_wait_count(c.port),
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
            for name in runs.rotated(VARIANTS, index):
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
            runs.median(r for r, _ in samples[name]) * 1e6,
            runs.median(i for _, i in samples[name]) * 1e6,
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


def render(doc: report.Document) -> report.Report:
    cells = [Cell.from_dict(c) for c in doc["cells"]]
    costs = [StreamCost(**c) for c in doc["streams"]]
    s = doc["settings"]
    out = report.Report("httpx: stock httpx.AsyncClient vs RecyclingTransport(pool)")
    out.add(
        f"Upstream: {s['upstream']}; {s['slices']} rounds of {s['slice']} s per variant, alternating; response body"
        f" {s['size']} bytes. Ratios pool/stock: of the median rates, and in brackets paired within rounds;"
        " the spread is the per-round ratios' min-max."
    )
    ratio = ratios(cells)
    rows = []
    for cell in cells:
        rates = [x.rate for x in cell.slices]
        shown = ["", "", ""]
        if cell.variant == "pool" and (cell.mode, cell.tasks) in ratio:
            overall, cpu, rounds = ratio[cell.mode, cell.tasks]
            shown = [
                f"**{overall:.2f}x** ({runs.median(rounds):.2f}x)",
                f"{min(rounds):.2f}-{max(rounds):.2f}x",
                f"{1 / cpu:.2f}x",
            ]
        rows.append(
            [
                cell.mode,
                str(cell.tasks),
                LABELS[cell.variant],
                f"{cell.rate:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})",
                f"{cpu_per_request(cell) * 1e6:,.0f}",
                f"{cell.socket_calls:,}",
                f"{cell.time_wait:,}",
                *shown,
            ]
        )
    headers = ["upstream", "tasks", "client", "requests/s (min-max)", "CPU us/request", "socket() calls"]
    headers += ["TIME_WAIT on upstream", "pool/stock requests/s (paired)", "spread of rounds", "pool/stock CPU"]
    out.table(headers, rows)
    stock, pool = costs
    out.table(
        ["network stream", "CPU us per round trip", "CPU us per is_readable"],
        [
            ["httpcore TrioBackend (stock)", f"{stock.round_trip_us:.1f}", f"{stock.is_readable_us:.2f}"],
            [
                "RecyclingBackend",
                f"{pool.round_trip_us:.1f} ({pool.round_trip_us / stock.round_trip_us:.2f}x)",
                f"{pool.is_readable_us:.2f} ({pool.is_readable_us / stock.is_readable_us:.2f}x)",
            ],
        ],
        "The network streams alone, on one kept-alive connection:",
    )
    for (mode, tasks), (overall, _, rounds) in ratio.items():
        paired = runs.median(rounds)
        out.verdicts.append(judge(target("httpx", f"{mode}@{tasks}"), overall, paired))
    for cell in cells:
        if cell.variant == "pool" and cell.mode == "close":
            measured = f"{cell.time_wait} ({cell.tasks} tasks)"
            out.verdicts.append(judge(target("httpx", "time_wait"), cell.time_wait, measured=measured))
        if cell.variant == "pool" and cell.socket_calls > cell.capacity:
            out.warnings.append(
                f"{cell.mode}, {cell.tasks} tasks: {cell.socket_calls} socket() calls, capacity {cell.capacity}"
            )
    failed = sum(cell.failed for cell in cells)
    out.verdicts.append(judge(target("httpx", "failed"), failed, measured=str(failed)))
    return out


def measure(settings: Settings) -> report.Document:
    counters.socket_counter()
    info = machine(httpx=httpx.__version__, httpcore=__import__("httpcore").__version__, upstream=settings.upstream)
    started, start = report.now(), time.perf_counter()
    cells: list[Cell] = []
    for mode in MODES:
        for tasks in TASKS:
            # A fresh upstream per variant: the TIME_WAIT entries on its port are that variant's own.
            with (
                upstream(settings.upstream, mode, settings.size) as stock_port,
                upstream(settings.upstream, mode, settings.size) as pool_port,
            ):
                pair = trio.run(run_pair, settings, {"stock": stock_port, "pool": pool_port}, mode, tasks)
            cells += pair
            for cell in pair:
                print(
                    f"{mode:10} {tasks:2} task(s) {cell.variant:5} {cell.rate:8,.0f} requests/s,"
                    f" {cpu_per_request(cell) * 1e6:6,.0f} us CPU/request, {cell.socket_calls} socket(),"
                    f" {cell.time_wait} TIME_WAIT {cell.pool_stats}",
                    flush=True,
                )
    with upstream(settings.upstream, "keep-alive", settings.size) as port:
        costs = trio.run(stream_costs, port, settings.size, settings.round_trips, 5 if settings.slices > 2 else 1)
    info["loadavg_end"] = load_average()
    # The rate and CPU per request beside each cell's slices, for readers of the JSON (rebuilt from the slices).
    shown = [{**attrs.asdict(c), "rate": c.rate, "cpu_us_per_request": cpu_per_request(c) * 1e6} for c in cells]
    return report.document("httpx", settings, info, started, time.perf_counter() - start, cells=shown, streams=costs)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = cli.parser(
        __doc__, quick="2 rounds of 0.2 s", repeats="rounds, each variant one slice per round; default 10"
    )
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per variant and round")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--round-trips", type=int, default=3000, help="per sample of the network streams alone")
    args = parser.parse_args(argv)
    kind = args.upstream
    if kind == "auto":
        kind = "nginx" if servers.find_nginx() else "python"
    rounds = cli.repeats(args, 10, quick=2)
    if args.quick:
        return args, Settings(0.2, rounds, 0.1, args.size, kind, 200)
    return args, Settings(args.slice, rounds, 0.5, args.size, kind, args.round_trips)


if __name__ == "__main__":
    arguments, settings = parse_args()
    sys.exit(
        cli.main(
            "httpx",
            arguments,
            settings,
            measure,
            render,
            fail_on=lambda r: any(v.key == "failed" and v.result != "met" for v in r.verdicts),
        )
    )
