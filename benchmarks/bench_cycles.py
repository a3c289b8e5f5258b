"""Short connections three ways: a raw trio socket loop, trio.open_tcp_stream, and the pool.

What it shows: the cost of one request/response/close cycle against a server
that answers and closes first (the case recycling is for), measured in one
run, interleaved, three ways:

* ``raw``  -- ``trio.socket.socket()``, ``connect``, ``send``, ``recv`` until
  ``b""``, ``close``: the floor for any trio code.
* ``trio`` -- `trio.open_tcp_stream` and `trio.SocketStream` (``send_all``,
  ``receive_some`` until ``b""``, ``aclose``): what users write today.
* ``pool`` -- ``pool.open_tcp_stream`` and `trio_recycle.RecyclingStream`,
  the same operations, the socket recycled with ``connect(AF_UNSPEC)``.

Each runs at concurrency 1 and 32 (the targets) and in a sweep over 8, 64
and 256 tasks; the pool's capacity equals the concurrency, except at 256
tasks where it is 32 (224 tasks queue for a socket). Per measurement, on a
fresh server port (``cycle_server.py``, its own process): cycles/s,
``socket()`` calls per 1000 cycles (the harness's audit hook, for the pool
cross-checked with ``statistics().created``), TIME_WAIT entries left on
the port, the client's peak descriptors and its CPU time per cycle.

Run it with ``nox -s bench`` or::

    python benchmarks/bench_cycles.py                 # the full run, a few minutes
    python benchmarks/bench_cycles.py --quick         # a smoke run, seconds
    python benchmarks/bench_cycles.py --cycles 5000 --repeats 5 --out /tmp/bench
    python benchmarks/bench_cycles.py --profile       # where the time goes, per variant
    python benchmarks/bench_cycles.py --from-json benchmarks/results/cycles.json  # re-report, no measuring

Results: ``cycles.md``, ``cycles.json`` and ``sweep.png`` in
``benchmarks/results`` (``--out``). Linux only.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs
import trio
from harness import cli, counters, report, runs, servers
from harness.machine import load_average, machine
from harness.targets import judge, target

import trio_recycle

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

HOST: Final = "127.0.0.1"
REQUEST: Final = b"GET /cycle\n"
RESPONSE_BYTES: Final = 64
Variant = Literal["raw", "trio", "pool"]
VARIANTS: Final[tuple[Variant, ...]] = ("raw", "trio", "pool")
LABELS: Final[dict[str, str]] = {
    "raw": "raw trio socket",
    "trio": "trio.open_tcp_stream",
    "pool": "pool.open_tcp_stream",
}
#: (concurrency, pool capacity), in the order they are measured.
CONFIGS: Final = ((1, 1), (32, 32), (8, 8), (64, 64), (256, 32))
HEADLINE: Final = (1, 32)
SWEEP: Final = tuple(sorted(concurrency for concurrency, _ in CONFIGS))
#: Time for the last FINs/RSTs to be processed before TIME_WAIT is counted.
SETTLE: Final = 0.05
#: A measurement still running this long after its time limit is stuck.
STUCK_GRACE: Final = 10.0
#: Warm-up cycles per task, so that every task has connected a few times and the pool is in its steady state.
WARMUP_PER_TASK: Final = 4
BACKLOG: Final = 4096
SERVER: Final = Path(__file__).resolve().parent / "cycle_server.py"


class BenchmarkError(RuntimeError):
    """The benchmark could not measure what it claims to (a stuck loop, lost bytes)."""


@attrs.frozen
class Settings:
    cycles: int
    warmup: int
    repeats: int
    time_limit: float
    quick: bool


def make_cycle(variant: Variant, port: int, pool: trio_recycle.SocketPool | None) -> Callable[[], Awaitable[int]]:
    """One request/response/close cycle; it returns the bytes received."""
    if variant == "raw":

        async def raw_cycle() -> int:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with sock:
                await sock.connect((HOST, port))
                if await sock.send(REQUEST) != len(REQUEST):
                    raise BenchmarkError("short send of an 11-byte request")
                received = 0
                while data := await sock.recv(65536):
                    received += len(data)
            return received

        return raw_cycle

    # The trio and pool variants are one loop: only where the stream comes from differs.
    open_stream: Callable[[str, int], Awaitable[trio.abc.HalfCloseableStream]] = trio.open_tcp_stream
    if pool is not None:
        open_stream = pool.open_tcp_stream

    async def stream_cycle() -> int:
        async with await open_stream(HOST, port) as stream:
            await stream.send_all(REQUEST)
            received = 0
            while data := await stream.receive_some():
                received += len(data)
        return received

    return stream_cycle


async def drive(
    cycle: Callable[[], Awaitable[int]], concurrency: int, cycles: int, time_limit: float
) -> tuple[int, float, bool]:
    """(cycles done, seconds, time-limited): ``cycles`` over ``concurrency`` tasks, or stop after ``time_limit``."""
    start = time.perf_counter()
    deadline = start + time_limit
    left, done, received = cycles, 0, 0

    async def worker() -> None:
        nonlocal left, done, received
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            got = await cycle()
            received += got
            done += 1

    with trio.move_on_after(time_limit + STUCK_GRACE) as guard:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    if guard.cancelled_caught:
        raise BenchmarkError(f"{done} cycles done, still running {STUCK_GRACE} s past the time limit")
    if received != done * RESPONSE_BYTES:
        raise BenchmarkError(f"{received} bytes received in {done} cycles of {RESPONSE_BYTES}")
    return done, time.perf_counter() - start, left > 0


@attrs.frozen
class Sample:
    variant: Variant
    concurrency: int
    capacity: int | None
    repeat: int
    cycles: int
    seconds: float
    time_limited: bool
    #: socket() calls during the measured cycles (audit hook); for the pool also statistics().created.
    sockets: int
    created: int | None
    time_wait: int
    time_wait_everywhere: int
    baseline_fds: int
    peak_fds: int
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds if self.seconds > 0 else 0.0


async def measure_one(
    server: servers.ChildServer, variant: Variant, concurrency: int, capacity: int, settings: Settings, repeat: int
) -> Sample:
    """Warm up, then measure ``settings.cycles`` cycles of ``variant`` on a fresh server port."""
    port = int(server.ask("listen").split()[1])
    counter = counters.socket_counter()
    baseline_fds = counters.count_fds()
    fds = counters.FdPeak()
    async with contextlib.AsyncExitStack() as stack:
        pool = None
        if variant == "pool":
            pool = await stack.enter_async_context(trio_recycle.open_socket_pool(capacity=capacity))
        cycle = make_cycle(variant, port, pool)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fds.watch, time.perf_counter() + 2 * (settings.time_limit + STUCK_GRACE))
            await drive(cycle, concurrency, max(settings.warmup, WARMUP_PER_TASK * concurrency), settings.time_limit)
            tw_before = counters.TimeWait.for_port(port)
            created = pool.statistics().created if pool is not None else 0
            sockets, cpu = counter.count, time.process_time()
            done, seconds, limited = await drive(cycle, concurrency, settings.cycles, settings.time_limit)
            cpu, sockets = time.process_time() - cpu, counter.count - sockets
            created = pool.statistics().created - created if pool is not None else 0
            fds.sample()
            nursery.cancel_scope.cancel()
    await trio.sleep(SETTLE)
    tw_after = counters.TimeWait.for_port(port)
    served = int(server.ask(f"close {port}").split()[1])
    if served < done:
        raise BenchmarkError(f"the server answered {served} connections on port {port}, the client counted {done}")
    return Sample(
        variant,
        concurrency,
        capacity if variant == "pool" else None,
        repeat,
        done,
        seconds,
        limited,
        sockets,
        created if variant == "pool" else None,
        tw_after.total - tw_before.total,
        tw_after.everywhere,
        baseline_fds,
        fds.peak,
        cpu,
    )


async def run_benchmark(settings: Settings) -> tuple[list[Sample], list[str]]:
    warnings = [] if trio_recycle.can_recycle() else ["can_recycle() is False: the pool closes instead of recycling"]
    tcp_before = counters.tcp_counters()
    samples = []
    capacities = dict(CONFIGS)
    argv = servers.python_server(SERVER, f"--response-bytes={RESPONSE_BYTES}", f"--backlog={BACKLOG}")
    with servers.child_server(argv, ready=False) as server:
        for variant in VARIANTS:  # the first measurement of each is no slower for being first
            await measure_one(server, variant, 1, 1, attrs.evolve(settings, cycles=settings.warmup), -1)
        steps = runs.plan(settings.repeats, [c for c, _ in CONFIGS], VARIANTS)
        for number, (repeat, concurrency, variant) in enumerate(steps, 1):
            if not settings.quick:
                await counters.wait_for_time_wait_room(
                    settings.cycles + WARMUP_PER_TASK * concurrency + settings.warmup
                )
            sample = await measure_one(server, variant, concurrency, capacities[concurrency], settings, repeat)
            samples.append(sample)
            print(
                f"[{number:>3}/{len(steps)}] {LABELS[variant]:<21} tasks {concurrency:>3} {sample.rate:>9,.0f} cycles/s"
                f"  socket() {sample.sockets:>5}  TIME_WAIT {sample.time_wait:>5}  fds {sample.peak_fds:>4}",
                flush=True,
            )
    warnings += counters.counter_warnings(tcp_before, counters.tcp_counters())
    if any(s.created is not None and s.created != s.sockets for s in samples):
        warnings.append("audited socket() calls and statistics().created disagree in some pool measurement")
    if any(s.time_limited for s in samples):
        warnings.append("some measurements hit the time limit: fewer cycles than asked")
    return samples, warnings


def measure(settings: Settings) -> report.Document:
    info = machine()
    started, start = report.now(), time.perf_counter()
    samples, warnings = trio.run(run_benchmark, settings)
    info["loadavg_end"] = load_average()
    return report.document(
        "cycles", settings, info, started, time.perf_counter() - start, samples=samples, run_warnings=warnings
    )


# ----------------------------------------------------------------------
# The report


def render(doc: report.Document) -> report.Report:
    samples = [Sample(**s) for s in doc["samples"]]
    s = doc["settings"]
    out = report.Report("Short-connection cycles: raw trio socket vs trio.open_tcp_stream vs the pool")
    out.warnings = list(doc.get("run_warnings", []))
    out.add(
        f"Every cycle: connect to 127.0.0.1, send an 11-byte request, read the {RESPONSE_BYTES}-byte answer until"
        " the server's FIN (it closes first, in its own process), close."
        f" {s['cycles']} measured cycles per measurement after max({s['warmup']}, {WARMUP_PER_TASK} x tasks),"
        f" median of {s['repeats']} interleaved repeats, time limit {s['time_limit']:g} s. Ratios: of the medians,"
        " and in brackets paired within repeats. TIME_WAIT: entries on the measurement's own fresh server port."
    )
    headers = ["tasks", "variant", "capacity", "cycles/s (min-max)", "pool/trio", "pool/raw", "socket()/1000"]
    headers += ["TIME_WAIT/1000", "peak fds (+over baseline)", "client CPU us/cycle"]
    cells, sweep = [], []
    for concurrency in SWEEP:
        group = {v: [x for x in samples if (x.variant, x.concurrency) == (v, concurrency)] for v in VARIANTS}
        rate = {v: runs.median(x.rate for x in group[v]) for v in VARIANTS}
        pairs = [(x.repeat, x.variant, x.rate) for x in samples if x.concurrency == concurrency]
        ratios: dict[str, tuple[float, float]] = {
            versus: (
                rate["pool"] / rate[versus] if rate[versus] else 0.0,
                runs.paired_ratio(pairs, "pool", versus) or 0.0,
            )
            for versus in ("trio", "raw")
        }
        shown = {k: f"{a:.2f}x ({b:.2f}x)" for k, (a, b) in ratios.items()}
        for variant in VARIANTS:
            g = group[variant]
            n = sum(x.cycles for x in g) or 1
            low, high = runs.spread(x.rate for x in g)
            calls = max(sum(x.sockets for x in g), sum(x.created or 0 for x in g)) * 1000 / n
            cells.append(
                [
                    str(concurrency),
                    LABELS[variant],
                    str(g[0].capacity) if g and g[0].capacity else "-",
                    f"{rate[variant]:,.0f} ({low:,.0f}-{high:,.0f})",
                    shown["trio"] if variant == "pool" else "",
                    shown["raw"] if variant == "pool" else "",
                    f"{calls:.1f}",
                    f"{sum(x.time_wait for x in g) * 1000 / n:.1f}",
                    f"{max((x.peak_fds for x in g), default=0)}"
                    f" (+{max((x.peak_fds - x.baseline_fds for x in g), default=0)})",
                    f"{runs.median(x.cpu_seconds / x.cycles * 1e6 for x in g if x.cycles):.0f}",
                ]
            )
        sweep.append([str(concurrency), *(f"{rate[v]:,.0f}" for v in VARIANTS), shown["trio"], shown["raw"]])
        if concurrency in HEADLINE and group["pool"]:
            pool = group["pool"]
            for versus in ("trio", "raw"):
                out.verdicts.append(judge(target("cycles", f"pool/{versus}@{concurrency}"), *ratios[versus]))
            n = sum(x.cycles for x in pool)
            calls = max(sum(x.sockets for x in pool), sum(x.created or 0 for x in pool))
            out.verdicts.append(
                judge(
                    target("cycles", "socket_per_1000"),
                    calls * 1000 / n,
                    measured=f"{calls} in {n} cycles ({concurrency} tasks)",
                )
            )
            tw = sum(x.time_wait for x in pool)
            out.verdicts.append(
                judge(target("cycles", "time_wait"), tw, measured=f"{tw} in {n} cycles ({concurrency} tasks)")
            )
            over = max(x.peak_fds - x.baseline_fds - (x.capacity or 0) for x in pool)
            out.verdicts.append(
                judge(target("cycles", "fds_over_capacity"), over, measured=f"{over:+d} ({concurrency} tasks)")
            )
    out.table(headers, [c for c in cells if int(c[0]) in HEADLINE], "Concurrency 1 and 32 (the targets):")
    out.table(headers, [c for c in cells if int(c[0]) not in HEADLINE], "The sweep (pool capacity = tasks, 32 at 256):")
    out.table(["tasks", *(LABELS[v] for v in VARIANTS), "pool/trio", "pool/raw"], sweep, "cycles/s by concurrency:")
    return out


def plot_sweep(doc: report.Document, path: Path) -> str:
    """Plot cycles/s against concurrency; return what was done, for the log."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return f"matplotlib is not installed: {path.name} not drawn"
    samples = [Sample(**s) for s in doc["samples"]]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (variant, marker) in enumerate(zip(VARIANTS, "osD", strict=True)):
        xs, ys, low, high = [], [], [], []
        for concurrency in SWEEP:
            rates = [x.rate for x in samples if (x.variant, x.concurrency) == (variant, concurrency)]
            if rates:
                # Nudged sideways so that the three error bars do not hide each other.
                xs.append(concurrency * 1.06 ** (index - 1))
                ys.append(runs.median(rates))
                low.append(ys[-1] - min(rates))
                high.append(max(rates) - ys[-1])
        axes.errorbar(xs, ys, yerr=[low, high], marker=marker, capsize=3, label=LABELS[variant])
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(SWEEP), [str(c) for c in SWEEP])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("concurrent tasks (pool capacity = tasks, 32 at 256)")
    axes.set_ylabel("cycles/s (median, bars: min-max)")
    axes.set_title(f"connect/request/response/close, server closes first ({doc['machine']['nproc']} CPUs)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"wrote {path}"


# ----------------------------------------------------------------------
# --profile


async def profile_variants(settings: Settings) -> str:
    """cProfile of each variant at concurrency 1 and 32, own time grouped by where it is spent."""
    parts = []
    argv = servers.python_server(SERVER, f"--response-bytes={RESPONSE_BYTES}", f"--backlog={BACKLOG}")
    with servers.child_server(argv, ready=False) as server:
        for concurrency in HEADLINE:
            for variant in VARIANTS:
                port = int(server.ask("listen").split()[1])
                async with contextlib.AsyncExitStack() as stack:
                    pool = None
                    if variant == "pool":
                        pool = await stack.enter_async_context(trio_recycle.open_socket_pool(capacity=concurrency))
                    cycle = make_cycle(variant, port, pool)
                    await drive(
                        cycle, concurrency, max(settings.warmup, WARMUP_PER_TASK * concurrency), settings.time_limit
                    )
                    profiler = cProfile.Profile()
                    profiler.enable()
                    done, seconds, _ = await drive(cycle, concurrency, settings.cycles, settings.time_limit)
                    profiler.disable()
                server.ask(f"close {port}")
                parts.append(_profile_text(profiler, f"{LABELS[variant]}, {concurrency} tasks", done, seconds))
    return "\n".join(parts)


def _profile_text(profiler: cProfile.Profile, title: str, cycles: int, seconds: float) -> str:
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    entries = stats.stats.items()  # type: ignore[attr-defined]
    total = sum(entry[2] for _, entry in entries) or 1.0
    groups: dict[str, float] = {}
    for (filename, _, name), entry in entries:
        if "trio_recycle" in filename:
            group = "trio_recycle/" + (Path(filename).name if filename.endswith(".py") else "(attrs-generated methods)")
        elif f"{os.sep}trio{os.sep}" in filename:
            group = "trio (core, sockets, streams)"
        elif filename == "~" and ("socket" in name or "select" in name or "epoll" in name):
            group = "system calls (socket methods, epoll)"
        elif Path(filename).name == Path(__file__).name:
            group = "the benchmark's own loop"
        else:
            group = "other (stdlib, attrs, builtins)"
        groups[group] = groups.get(group, 0.0) + entry[2]
    lines = [
        f"== {title}: {cycles} cycles in {seconds:.2f} s under the profiler"
        f" ({seconds / max(cycles, 1) * 1e6:.0f} us/cycle)"
    ]
    lines += [f"  {100 * t / total:5.1f}%  {g}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    for (filename, line, name), entry in sorted(entries, key=lambda kv: -kv[1][3]):
        if "trio_recycle" in filename and filename.endswith(".py"):
            lines.append(
                f"  cum {100 * entry[3] / total:5.1f}% {entry[3] / max(cycles, 1) * 1e6:6.1f} us"
                f"  own {100 * entry[2] / total:5.1f}%"
                f"  calls/cycle {entry[1] / max(cycles, 1):4.1f}  {Path(filename).name}:{line}({name})"
            )
    stats.sort_stats("tottime").print_stats(25)
    return "\n".join([*lines, buffer.getvalue()])


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = cli.parser(__doc__, quick="100 cycles, 1 repeat, 3 s limit", repeats="default 5")
    parser.add_argument("--cycles", type=int, help="measured cycles per measurement (default 4000; --quick: 100)")
    parser.add_argument("--time-limit", type=float, help="seconds after which a batch stops by itself (default 20)")
    parser.add_argument("--profile", action="store_true", help="cProfile each variant instead of measuring")
    args = parser.parse_args(argv)
    cycles = args.cycles if args.cycles is not None else (100 if args.quick else 4000)
    time_limit = args.time_limit if args.time_limit is not None else (3.0 if args.quick else 20.0)
    if cycles < 1 or time_limit <= 0:
        parser.error("--cycles must be >= 1, --time-limit > 0")
    warmup = 20 if args.quick else max(100, cycles // 10)
    return args, Settings(cycles, warmup, cli.repeats(args, 5), time_limit, args.quick)


def main() -> int:
    args, settings = parse_args()
    if args.profile:
        text = trio.run(profile_variants, settings)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text(text)
        print(text)
        return 0
    status = cli.main("cycles", args, settings, measure, render)
    if status == 0:
        print(plot_sweep(report.load(args.out / "cycles.json"), args.out / "sweep.png"))
    return status


if __name__ == "__main__":
    sys.exit(main())
