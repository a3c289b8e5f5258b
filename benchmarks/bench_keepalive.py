"""Keep-alive exchanges: a held raw trio socket, a held trio.SocketStream, and the pool's release() and take.

What it shows: the cost of one request/response exchange on a connection
kept alive, against a server (its own process) that answers every request
line with a fixed answer and never closes, measured in one run,
interleaved, three ways:

* ``raw``    -- each task holds one ``trio.socket`` socket for the whole run:
  ``send``, ``recv`` until the answer is complete. The floor for trio code.
* ``stream`` -- each task holds one `trio.SocketStream` (``send_all``,
  ``receive_some``): what a trio user writes today for a keep-alive upstream.
* ``pool``   -- every exchange is ``pool.open_tcp_stream`` (which takes the
  parked connection: no DNS, no connect, one liveness check),
  ``send_all``, ``receive_some`` until the answer is complete, and
  ``stream.release()``.

The targets (benchmarks/harness/targets.py): pool/held stream exchange rate
>= 0.9x at 1 task and >= 1.0x at 32 (pool capacity = tasks), of the
medians and paired within repeats. ``pool - raw`` (us per exchange) is
reported beside them.

``--breakdown`` measures instead where an exchange's cost goes, per
variant at 1 and 32 tasks: system calls per exchange (``strace -f -c``
of a child process running the loop, minus the same child with no
measured exchanges), scheduler passes per exchange (a trio Instrument
counting task steps and run-loop I/O waits) and microseconds per call of
``open_tcp_stream``, ``send_all``, ``receive_some`` and ``release`` (wall
time at 1 task, ``time.perf_counter_ns``): the before/after figures for
work on the fast path. It writes ``keepalive_breakdown.md``/``.json``.

Run it with ``nox -s bench`` or::

    python benchmarks/bench_keepalive.py                # the full run, about a minute
    python benchmarks/bench_keepalive.py --quick        # a smoke run, seconds
    python benchmarks/bench_keepalive.py --exchanges 20000 --repeats 7
    python benchmarks/bench_keepalive.py --breakdown [--quick]

Results: ``keepalive.md`` and ``keepalive.json`` in ``benchmarks/results``
(``--out``). Linux only (the pool's watch is epoll).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs
import trio
from harness import cli, report, runs, servers
from harness.machine import load_average, machine
from harness.targets import judge, target

import trio_recycle

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

HOST: Final = "127.0.0.1"
REQUEST: Final = b"GET /keep-alive\n"
RESPONSE_BYTES: Final = 64
Variant = Literal["raw", "stream", "pool"]
VARIANTS: Final[tuple[Variant, ...]] = ("raw", "stream", "pool")
LABELS: Final[dict[str, str]] = {
    "raw": "raw trio socket, held",
    "stream": "trio.SocketStream, held",
    "pool": "pool open + release()",
}
CONCURRENCY: Final = (1, 32)
WARMUP: Final = 4
#: The system calls the breakdown counts (strace -e trace=...).
TRACED: Final = "%network,epoll_wait,epoll_ctl,epoll_pwait,poll,ppoll"

#: The server (its own process): a fixed answer per request line, never closing first.
SERVER: Final = Path(__file__).resolve().parent / "line_server.py"


@attrs.frozen
class Settings:
    exchanges: int
    repeats: int
    breakdown: bool


@attrs.frozen
class Sample:
    variant: Variant
    tasks: int
    repeat: int
    exchanges: int
    seconds: float
    cpu_seconds: float


# ----------------------------------------------------------------------
# The three exchanges


@attrs.define
class Timings:
    """Nanoseconds per call of each operation, when asked for (the breakdown)."""

    ns: dict[str, list[int]] = attrs.field(factory=dict)

    def add(self, name: str, start: int) -> None:
        self.ns.setdefault(name, []).append(time.perf_counter_ns() - start)


async def _receive_answer(receive: Callable[[], Awaitable[bytes]]) -> None:
    got = 0
    while got < RESPONSE_BYTES:
        chunk = await receive()
        if not chunk:
            raise RuntimeError("the server closed")
        got += len(chunk)


async def _raw_worker(port: int, count: int, timings: Timings | None) -> None:
    sock = trio.socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        await sock.connect((HOST, port))
        for _ in range(count):
            await sock.send(REQUEST)
            await _receive_answer(lambda: sock.recv(65536))


async def _stream_worker(port: int, count: int, timings: Timings | None) -> None:
    async with await trio.open_tcp_stream(HOST, port) as stream:
        for _ in range(count):
            if timings is None:
                await stream.send_all(REQUEST)
                await _receive_answer(stream.receive_some)
                continue
            start = time.perf_counter_ns()
            await stream.send_all(REQUEST)
            timings.add("send_all", start)
            start = time.perf_counter_ns()
            await _receive_answer(stream.receive_some)
            timings.add("receive_some (whole answer)", start)


def _pool_worker(pool: trio_recycle.SocketPool) -> Callable[[int, int, Timings | None], Awaitable[None]]:
    async def worker(port: int, count: int, timings: Timings | None) -> None:
        for _ in range(count):
            if timings is None:
                stream = await pool.open_tcp_stream(HOST, port)
                await stream.send_all(REQUEST)
                await _receive_answer(stream.receive_some)
                await stream.release()
                continue
            start = time.perf_counter_ns()
            stream = await pool.open_tcp_stream(HOST, port)
            timings.add("open_tcp_stream (take)", start)
            start = time.perf_counter_ns()
            await stream.send_all(REQUEST)
            timings.add("send_all", start)
            start = time.perf_counter_ns()
            await _receive_answer(stream.receive_some)
            timings.add("receive_some (whole answer)", start)
            start = time.perf_counter_ns()
            await stream.release()
            timings.add("release", start)

    return worker


@attrs.define(eq=False)
class Passes(trio.abc.Instrument):
    """Scheduler passes: task steps and run-loop waits for I/O."""

    steps: int = 0
    io_waits: int = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


@attrs.frozen
class Run:
    seconds: float
    cpu_seconds: float
    exchanges: int
    steps: int = 0
    io_waits: int = 0


async def run_variant(
    variant: Variant,
    port: int,
    tasks: int,
    exchanges: int,
    *,
    timings: Timings | None = None,
    count_passes: bool = False,
) -> Run:
    """``exchanges`` exchanges over ``tasks`` tasks after a warm-up of WARMUP per task (pool capacity = tasks)."""
    per_task = max(0, exchanges // tasks)
    async with trio_recycle.open_socket_pool(capacity=tasks) as pool:
        worker = {"raw": _raw_worker, "stream": _stream_worker, "pool": _pool_worker(pool)}[variant]

        async def run(count: int, record: Timings | None) -> float:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(worker, port, count, record)
            return time.perf_counter() - start

        await run(WARMUP, None)  # connections made, the pool's sockets parked
        passes = Passes()
        if count_passes:
            trio.lowlevel.add_instrument(passes)
        cpu = time.process_time()
        seconds = await run(per_task, timings)
        cpu = time.process_time() - cpu
        if count_passes:
            trio.lowlevel.remove_instrument(passes)
        if variant == "pool" and pool.statistics().created > tasks:
            raise RuntimeError(f"the pool made {pool.statistics().created} sockets for {tasks} tasks: not kept alive")
    return Run(seconds, cpu, per_task * tasks, passes.steps, passes.io_waits)


# ----------------------------------------------------------------------
# The measurement


def measure(settings: Settings) -> report.Document:
    info = machine()
    started = report.now()
    start = time.perf_counter()
    with servers.child_server(servers.python_server(SERVER, f"--response-bytes={RESPONSE_BYTES}")) as server:
        if settings.breakdown:
            data = trio.run(breakdown, settings, server.port)
        else:
            data = {"samples": trio.run(run_all, settings, server.port)}
    info["loadavg_end"] = load_average()
    return report.document("keepalive", settings, info, started, time.perf_counter() - start, **data)


async def run_all(settings: Settings, port: int) -> list[Sample]:
    samples: list[Sample] = []
    for repeat, tasks, variant in runs.plan(settings.repeats, CONCURRENCY, VARIANTS):
        run = await run_variant(variant, port, tasks, settings.exchanges)
        samples.append(Sample(variant, tasks, repeat, run.exchanges, run.seconds, run.cpu_seconds))
    return samples


def render(doc: report.Document) -> report.Report:
    if "breakdown" in doc:
        return render_breakdown(doc)
    samples = [Sample(**s) for s in doc["samples"]]
    settings = doc["settings"]
    out = report.Report("Keep-alive exchanges: held raw socket, held trio.SocketStream, pool open + release()")
    out.add(
        f"{settings['exchanges']} exchanges per measurement after {WARMUP} per task, median of {settings['repeats']}"
        " interleaved repeats (variants rotating). Every exchange: send a 16-byte request line, read the"
        f" {RESPONSE_BYTES}-byte answer, on a connection the server (its own process) never closes."
        " Ratios: of the medians, and in brackets paired within repeats."
    )
    cells = []
    for tasks in CONCURRENCY:
        us: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for variant in VARIANTS:
            group = [s for s in samples if (s.variant, s.tasks) == (variant, tasks)]
            us[variant] = runs.median(s.seconds / s.exchanges * 1e6 for s in group)
            cpu[variant] = runs.median(s.cpu_seconds / s.exchanges * 1e6 for s in group)
        rates = [(s.repeat, s.variant, s.exchanges / s.seconds) for s in samples if s.tasks == tasks]
        ratio = us["stream"] / us["pool"] if us["pool"] else 0.0
        paired = runs.paired_ratio(rates, "pool", "stream") or 0.0
        for variant in VARIANTS:
            shown = f"{ratio:.2f}x ({paired:.2f}x)" if variant == "pool" else ""
            cells.append(
                [
                    str(tasks),
                    LABELS[variant],
                    f"{1e6 / us[variant]:,.0f}" if us[variant] else "",
                    f"{us[variant]:.1f}",
                    f"{cpu[variant]:.1f}",
                    f"{us[variant] - us['raw']:+.1f}",
                    shown,
                ]
            )
        out.verdicts.append(judge(target("keepalive", f"pool/stream@{tasks}"), ratio, paired))
    headers = ["tasks", "variant", "exchanges/s", "us/exchange", "client CPU us/exchange", "- raw, us", "pool/stream"]
    out.table(headers, cells)
    return out


# ----------------------------------------------------------------------
# The breakdown: system calls, scheduler passes, microseconds per call


def strace_counts(port: int, variant: Variant, tasks: int, exchanges: int) -> Counter[str] | None:
    """System calls by name of a child running the loop (``strace -f -c``), None without strace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    with tempfile.NamedTemporaryFile(prefix="bench-keepalive-strace-") as out:
        argv = [strace, "-f", "-c", "-o", out.name, "-e", f"trace={TRACED}", sys.executable, __file__]
        argv += ["--child", f"{variant},{tasks},{exchanges},{port}"]
        traced = subprocess.run(argv, check=False, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if traced.returncode != 0:
            # strace present but not allowed to trace (a container without ptrace): no counts, said so.
            print(f"strace failed ({traced.returncode}): {traced.stderr.decode(errors='replace')[-300:]}", flush=True)
            return None
        counts: Counter[str] = Counter()
        for line in Path(out.name).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] += int(parts[3])
        return counts


async def breakdown(settings: Settings, port: int) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    for tasks in CONCURRENCY:
        for variant in VARIANTS:
            timings = Timings() if tasks == 1 else None
            run = await run_variant(variant, port, tasks, settings.exchanges, timings=timings, count_passes=True)
            full = await trio.to_thread.run_sync(strace_counts, port, variant, tasks, settings.exchanges)
            empty = await trio.to_thread.run_sync(strace_counts, port, variant, tasks, 0)
            calls = None
            if full is not None and empty is not None:
                calls = {name: (full[name] - empty[name]) / run.exchanges for name in sorted(full | empty)}
            rows.append(
                {
                    "variant": variant,
                    "tasks": tasks,
                    "exchanges": run.exchanges,
                    "us_per_exchange": run.seconds / run.exchanges * 1e6,
                    "task_steps_per_exchange": run.steps / run.exchanges,
                    "io_waits_per_exchange": run.io_waits / run.exchanges,
                    "syscalls_per_exchange": calls,
                    "us_per_call": {k: runs.median(v) / 1000 for k, v in timings.ns.items()} if timings else None,
                }
            )
    return {"breakdown": rows}


def render_breakdown(doc: report.Document) -> report.Report:
    out = report.Report("Keep-alive exchanges: where the time goes (system calls, scheduler passes, us per call)")
    out.add(
        f"{doc['settings']['exchanges']} exchanges per variant and concurrency. System calls: `strace -f -c -e"
        f" trace={TRACED}` of a child process running the loop, minus the same child with no measured exchanges"
        " (so start-up and warm-up cancel), per exchange. Scheduler passes: trio task steps and run-loop I/O waits"
        " (an Instrument), per exchange. us per call: median wall time at 1 task (time.perf_counter_ns, so a"
        " checkpoint's trip through the scheduler is in it)."
    )
    rows = doc["breakdown"]
    # Only the calls an exchange makes: connect, socket and the like cancel out (start-up, warm-up).
    names = sorted(
        {name for row in rows for name, n in (row["syscalls_per_exchange"] or {}).items() if abs(n) >= 0.005}
    )
    headers = ["tasks", "variant", "us/exchange", "task steps", "I/O waits", "system calls", *names]
    cells = []
    for row in rows:
        calls = row["syscalls_per_exchange"] or {}
        cells.append(
            [
                str(row["tasks"]),
                LABELS[row["variant"]],
                f"{row['us_per_exchange']:.1f}",
                f"{row['task_steps_per_exchange']:.2f}",
                f"{row['io_waits_per_exchange']:.2f}",
                f"{sum(calls.values()):.2f}" if calls else "(no strace, or it could not trace)",
                *(f"{calls.get(name, 0.0):.2f}" for name in names),
            ]
        )
    out.table(headers, cells, "Per exchange:")
    calls_cells = [
        [LABELS[row["variant"]], name, f"{us:.1f}"]
        for row in rows
        if row["us_per_call"]
        for name, us in row["us_per_call"].items()
    ]
    out.table(["variant", "call", "us (median, 1 task)"], calls_cells, "Per call:")
    return out


async def child(spec: str) -> None:
    """The loop alone, for strace: ``variant,tasks,exchanges,port``."""
    variant, tasks, exchanges, port = spec.split(",")
    assert variant in VARIANTS
    await run_variant(variant, int(port), int(tasks), int(exchanges))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = cli.parser(__doc__, quick="300 exchanges, 1 repeat", repeats="default 5")
    parser.add_argument(
        "--exchanges", type=int, help="measured exchanges per measurement (default 10000; --quick: 300)"
    )
    parser.add_argument("--breakdown", action="store_true", help="system calls, scheduler passes and us per call")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    exchanges = args.exchanges or (300 if args.quick else 10000)
    if exchanges < 1:
        parser.error("--exchanges must be >= 1")
    return args, Settings(exchanges, cli.repeats(args, 5), args.breakdown)


if __name__ == "__main__":
    arguments, settings = parse_args()
    if arguments.child:
        trio.run(child, arguments.child)
        sys.exit(0)
    name = "keepalive_breakdown" if settings.breakdown else "keepalive"
    sys.exit(cli.main(name, arguments, settings, measure, render))
