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

Each runs at concurrency 1 and 32 (the targets in docs/benchmarks.md) and in a sweep over
1, 8, 64 and 256 tasks; the pool's capacity equals the concurrency, except
at 256 tasks where it is 32 (224 tasks queue for a socket). For each
measurement: cycles/s; ``socket()`` calls per 1000 cycles (counted by an
audit hook on ``socket.__new__``, and for the pool cross-checked with
``statistics().created``), after a warm-up so that the pool's figure is the
steady state; TIME_WAIT entries the measured cycles left on the server's
port (each measurement gets a fresh port, read from /proc/net/tcp{,6}); the
client process's peak descriptor count (sampled every few ms); and its CPU
time per cycle, the steadiest figure when other jobs share the machine.

The server (``cycle_server.py``) runs in its own process. Every measurement
is repeated (``--repeats``) with the order of the variants rotated, and the
median is reported. Results: a table on stdout, and ``cycles.md``,
``cycles.json`` and ``sweep.png`` in ``benchmarks/results`` (``--out``).

Run it with ``nox -s bench`` or::

    python benchmarks/bench_cycles.py                 # the full run, a few minutes
    python benchmarks/bench_cycles.py --quick         # a smoke run, seconds
    python benchmarks/bench_cycles.py --cycles 5000 --repeats 5 --out /tmp/bench
    python benchmarks/bench_cycles.py --profile       # where the time goes, per variant
    python benchmarks/bench_cycles.py --from-json benchmarks/results/cycles.json  # re-report, no measuring

Linux only: the pool recycles only there, and the figures come from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import re
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final, Literal

import attrs
import trio

import trio_recycle

HOST: Final = "127.0.0.1"
REQUEST: Final = b"GET /cycle\n"
RESPONSE_BYTES: Final = 64
RECEIVE_SIZE: Final = 65536

Variant = Literal["raw", "trio", "pool"]
VARIANTS: Final[tuple[Variant, ...]] = ("raw", "trio", "pool")
LABELS: Final[dict[Variant, str]] = {
    "raw": "raw trio socket",
    "trio": "trio.open_tcp_stream",
    "pool": "pool.open_tcp_stream",
}
#: (concurrency, pool capacity), in the order they are measured.
CONFIGS: Final = ((1, 1), (32, 32), (8, 8), (64, 64), (256, 32))
#: The concurrencies the targets (docs/benchmarks.md) are set for.
HEADLINE: Final = (1, 32)
SWEEP: Final = tuple(sorted(concurrency for concurrency, _ in CONFIGS))

#: The targets of docs/benchmarks.md: minimum and aim, as ratios of cycle rates.
TARGET_VS_TRIO: Final = (1.5, 2.0)
TARGET_VS_RAW: Final = (0.85, 0.95)
#: Descriptors the pool's process may hold beyond its capacity: the peak is
#: compared with the count before the pool opened, so the constant only has
#: to cover trio's own lazily opened descriptors.
FD_SLACK: Final = 4

FD_DIR: Final = "/proc/self/fd"
FD_SAMPLE_INTERVAL: Final = 0.005
#: Time for the last FINs/RSTs to be processed before TIME_WAIT is counted.
SETTLE: Final = 0.05
#: A measurement still running this long after its time limit is stuck.
STUCK_GRACE: Final = 10.0
#: Warm-up cycles per task, so that at any concurrency every task has
#: connected a few times and the pool holds its steady-state sockets.
WARMUP_PER_TASK: Final = 4
#: The server's listen backlog: far more than the 256 concurrent connects.
BACKLOG: Final = 4096
#: Fraction of tcp_max_tw_buckets the run keeps TIME_WAIT entries under.
TW_ROOM: Final = 0.75
#: Seconds a TIME_WAIT entry lives on Linux (TCP_TIMEWAIT_LEN).
TW_LIFETIME: Final = 60.0

DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results"
SERVER_SCRIPT: Final = Path(__file__).resolve().parent / "cycle_server.py"


class BenchmarkError(RuntimeError):
    """The benchmark could not measure what it claims to (a stuck loop, lost bytes)."""


@attrs.frozen
class Settings:
    """How much to measure, from the command line."""

    cycles: int
    warmup: int
    repeats: int
    time_limit: float
    out: Path
    quick: bool
    profile: bool
    from_json: Path | None = None


# ----------------------------------------------------------------------
# The server process


@attrs.define(eq=False)
class CycleServer:
    """cycle_server.py in a child process, one command line at a time."""

    _process: subprocess.Popen[bytes]
    _buffer: bytes = b""

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[CycleServer]:
        """Start the server process; stop it (EOF on stdin, then kill) on exit."""
        command = [
            sys.executable,
            str(SERVER_SCRIPT),
            f"--response-bytes={RESPONSE_BYTES}",
            f"--backlog={BACKLOG}",
        ]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            yield cls(process)
        finally:
            assert process.stdin is not None
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def _ask(self, line: str, timeout: float = 10.0) -> str:
        # Blocking, but only between measurements and only for microseconds.
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise BenchmarkError(f"the server did not answer {line!r} within {timeout} s")
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                raise BenchmarkError(f"the server exited (code {self._process.poll()}) on {line!r}")
            self._buffer += chunk
        reply, self._buffer = self._buffer.split(b"\n", 1)
        return reply.decode()

    def listen(self) -> int:
        """A fresh listening port, so that TIME_WAIT counts start from zero."""
        reply = self._ask("listen")
        if not reply.startswith("port "):
            raise BenchmarkError(f"unexpected answer from the server: {reply!r}")
        return int(reply.split()[1])

    def close(self, port: int) -> int:
        """Stop listening on ``port``; return how many connections it answered."""
        reply = self._ask(f"close {port}")
        if not reply.startswith("served "):
            raise BenchmarkError(f"unexpected answer from the server: {reply!r}")
        return int(reply.split()[1])


# ----------------------------------------------------------------------
# What the kernel says: descriptors, TIME_WAIT, counters


def count_fds() -> int:
    """Descriptors open in this process (the listing's own included, always)."""
    return len(os.listdir(FD_DIR))


_TCP_LINE: Final = re.compile(rb"^ *\d+: [0-9A-F]+:([0-9A-F]{4}) [0-9A-F]+:([0-9A-F]{4}) ([0-9A-F]{2}) ", re.MULTILINE)


@attrs.frozen
class TimeWait:
    """TIME_WAIT entries whose local (server side) or remote (client side) port is a port."""

    server_side: int
    client_side: int
    everywhere: int

    @property
    def total(self) -> int:
        """Entries for the port on either side."""
        return self.server_side + self.client_side


def count_time_wait(port: int | None = None) -> TimeWait:
    """Count TIME_WAIT entries for ``port`` (and in all) in /proc/net/tcp and /proc/net/tcp6."""
    hexport = f"{port:04X}".encode() if port is not None else b""
    server_side = client_side = everywhere = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        for local, remote, state in _TCP_LINE.findall(data):
            if state != b"06":
                continue
            everywhere += 1
            if local == hexport:
                server_side += 1
            elif remote == hexport:
                client_side += 1
    return TimeWait(server_side, client_side, everywhere)


#: TcpExt counters whose increase makes some figure doubtful.
WATCHED_COUNTERS: Final = ("TCPTimeWaitOverflow", "ListenOverflows", "ListenDrops")


def tcp_counters() -> dict[str, int]:
    """The WATCHED_COUNTERS from /proc/net/netstat (empty when unreadable)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            pairs = zip(names.split()[1:], values.split()[1:], strict=False)
            found.update({name: int(value) for name, value in pairs if name in WATCHED_COUNTERS})
    return found


def tw_bucket_limit() -> int | None:
    """net.ipv4.tcp_max_tw_buckets: past it the kernel drops TIME_WAIT entries."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_max_tw_buckets").read_text())
    except (OSError, ValueError):
        return None


@attrs.define
class SocketCounter:
    """Counts ``socket.socket()`` constructions through the ``socket.__new__`` audit event.

    An audit hook cannot be removed, so it is installed once, before any
    measurement, and costs every variant the same: one Python call per
    audited event (``socket.__new__`` and ``socket.connect`` per cycle).
    """

    count: int = 0

    def hook(self, event: str, args: tuple[object, ...]) -> None:
        if event == "socket.__new__":
            self.count += 1


@attrs.define
class FdPeak:
    """The most descriptors seen open, sampled from a background task."""

    peak: int = 0

    def sample(self) -> None:
        self.peak = max(self.peak, count_fds())

    async def watch(self, deadline: float) -> None:
        """Sample every FD_SAMPLE_INTERVAL until cancelled or ``deadline``."""
        while time.perf_counter() < deadline:
            self.sample()
            await trio.sleep(FD_SAMPLE_INTERVAL)


def source_version() -> str:
    """The git commit of the trio_recycle being measured, and whether src/ differs from it."""
    src = Path(trio_recycle.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes in src" if dirty else commit


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "trio_recycle": trio_recycle.__version__,
        "can_recycle": trio_recycle.can_recycle(),
        "source": source_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------
# The three cycles

Cycle = Callable[[], Awaitable[int]]


def make_cycle(variant: Variant, port: int, pool: trio_recycle.SocketPool | None) -> Cycle:
    """One request/response/close cycle; it returns the bytes received."""
    if variant == "raw":
        address = (HOST, port)

        async def raw_cycle() -> int:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with sock:
                await sock.connect(address)
                if await sock.send(REQUEST) != len(REQUEST):
                    raise BenchmarkError("short send of an 11-byte request")
                received = 0
                while data := await sock.recv(RECEIVE_SIZE):
                    received += len(data)
            return received

        return raw_cycle

    # The trio and pool variants are one loop: only where the stream comes
    # from differs, which is the point of the comparison.
    open_stream: Callable[[str, int], Awaitable[trio.abc.HalfCloseableStream]]
    if variant == "trio":
        open_stream = trio.open_tcp_stream
    else:
        assert pool is not None
        open_stream = pool.open_tcp_stream

    async def stream_cycle() -> int:
        stream = await open_stream(HOST, port)
        async with stream:
            await stream.send_all(REQUEST)
            received = 0
            while data := await stream.receive_some():
                received += len(data)
        return received

    return stream_cycle


@attrs.define
class _Budget:
    left: int
    deadline: float
    done: int = 0
    received: int = 0


@attrs.frozen
class Drive:
    """What one batch of cycles did."""

    cycles: int
    received: int
    seconds: float
    time_limited: bool


async def _worker(cycle: Cycle, budget: _Budget) -> None:
    while budget.left > 0 and time.perf_counter() < budget.deadline:
        budget.left -= 1
        received = await cycle()  # not `+= await`: that reads the total before awaiting
        budget.received += received
        budget.done += 1


async def drive(cycle: Cycle, concurrency: int, cycles: int, time_limit: float) -> Drive:
    """Run ``cycles`` cycles in ``concurrency`` tasks, or stop after ``time_limit`` s.

    Each task stops by itself when the shared budget is spent or the time is
    up; the cancel scope is only a guard against a stuck cycle.
    """
    start = time.perf_counter()
    budget = _Budget(cycles, start + time_limit)
    with trio.move_on_after(time_limit + STUCK_GRACE) as guard:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(_worker, cycle, budget)
    seconds = time.perf_counter() - start
    if guard.cancelled_caught:
        raise BenchmarkError(f"{budget.done} cycles done, still running {STUCK_GRACE} s past the time limit")
    if budget.received != budget.done * RESPONSE_BYTES:
        raise BenchmarkError(f"{budget.received} bytes received in {budget.done} cycles of {RESPONSE_BYTES}")
    return Drive(budget.done, budget.received, seconds, time_limited=budget.left > 0)


# ----------------------------------------------------------------------
# One measurement


@attrs.frozen
class Sample:
    """One measurement of one variant at one concurrency."""

    variant: Variant
    concurrency: int
    capacity: int | None
    repeat: int
    cycles: int
    seconds: float
    rate: float
    time_limited: bool
    #: socket() calls during the measured cycles (audit hook).
    sockets: int
    #: The pool's statistics().created delta over the measured cycles.
    created: int | None
    pool_delta: dict[str, int] | None
    time_wait_server: int
    time_wait_client: int
    time_wait_everywhere: int
    baseline_fds: int
    peak_fds: int
    #: CPU time (user + system) of the client process during the measured
    #: cycles: unlike the rate, it barely moves when other jobs share the CPUs.
    cpu_seconds: float | None = None


async def measure(
    server: CycleServer,
    counter: SocketCounter,
    variant: Variant,
    concurrency: int,
    capacity: int,
    cycles: int,
    settings: Settings,
    repeat: int,
) -> Sample:
    """Warm up, then measure ``cycles`` cycles of ``variant`` on a fresh server port."""
    port = server.listen()
    warmup = max(settings.warmup, WARMUP_PER_TASK * concurrency)
    baseline_fds = count_fds()
    fds = FdPeak()
    counted = ("created", "reused", "recycled", "discarded")
    async with contextlib.AsyncExitStack() as stack:
        pool = None
        if variant == "pool":
            pool = await stack.enter_async_context(trio_recycle.open_socket_pool(capacity=capacity))
        cycle = make_cycle(variant, port, pool)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fds.watch, time.perf_counter() + 2 * (settings.time_limit + STUCK_GRACE))
            await drive(cycle, concurrency, warmup, settings.time_limit)
            tw_before = count_time_wait(port)
            stats_before = pool.statistics() if pool is not None else None
            sockets_before = counter.count
            cpu_before = time.process_time()
            run = await drive(cycle, concurrency, cycles, settings.time_limit)
            cpu_seconds = time.process_time() - cpu_before
            sockets = counter.count - sockets_before
            stats_after = pool.statistics() if pool is not None else None
            fds.sample()
            nursery.cancel_scope.cancel()
    pool_delta = None
    if stats_before is not None and stats_after is not None:
        pool_delta = {name: getattr(stats_after, name) - getattr(stats_before, name) for name in counted}
    await trio.sleep(SETTLE)
    tw_after = count_time_wait(port)
    served = server.close(port)
    if served < run.cycles:
        raise BenchmarkError(f"the server answered {served} connections on port {port}, the client counted more")
    return Sample(
        variant=variant,
        concurrency=concurrency,
        capacity=capacity if variant == "pool" else None,
        repeat=repeat,
        cycles=run.cycles,
        seconds=run.seconds,
        rate=run.cycles / run.seconds if run.seconds > 0 else 0.0,
        time_limited=run.time_limited,
        sockets=sockets,
        created=pool_delta["created"] if pool_delta is not None else None,
        pool_delta=pool_delta,
        time_wait_server=tw_after.server_side - tw_before.server_side,
        time_wait_client=tw_after.client_side - tw_before.client_side,
        time_wait_everywhere=tw_after.everywhere,
        baseline_fds=baseline_fds,
        peak_fds=fds.peak,
        cpu_seconds=cpu_seconds,
    )


# ----------------------------------------------------------------------
# Aggregation


@attrs.frozen
class Row:
    """The repeats of one variant at one concurrency, summarised."""

    variant: Variant
    concurrency: int
    capacity: int | None
    repeats: int
    rate: float  # median
    rate_min: float
    rate_max: float
    cycles: int  # over all repeats
    sockets_per_1000: float
    created_per_1000: float | None
    time_wait_per_1000: float
    time_wait_total: int
    peak_fds_over_baseline: int
    peak_fds: int
    time_limited: bool
    #: Pool rows only: the median over repeats of the pool's rate divided by
    #: the other variant's in the same repeat. The variants of one repeat run
    #: back to back, so drift that slows all three cancels out of this one.
    paired_vs_trio: float | None = None
    paired_vs_raw: float | None = None
    #: Median client CPU time per cycle, in microseconds (None for runs from
    #: before it was recorded).
    cpu_us_per_cycle: float | None = None

    @property
    def socket_calls_per_1000(self) -> float:
        """socket() calls per 1000 cycles: the audited count, and for the pool never below its own."""
        if self.created_per_1000 is None:
            return self.sockets_per_1000
        return max(self.sockets_per_1000, self.created_per_1000)


def summarise(samples: list[Sample]) -> list[Row]:
    """One Row per (variant, concurrency), in SWEEP then VARIANTS order."""
    rows = []
    for concurrency in SWEEP:
        for variant in VARIANTS:
            group = [s for s in samples if s.variant == variant and s.concurrency == concurrency]
            if not group:
                continue
            cycles = sum(s.cycles for s in group)
            per_1000 = 1000 / cycles if cycles else 0.0
            created = [s.created for s in group if s.created is not None]
            rows.append(
                Row(
                    variant=variant,
                    concurrency=concurrency,
                    capacity=group[0].capacity,
                    repeats=len(group),
                    rate=statistics.median(s.rate for s in group),
                    rate_min=min(s.rate for s in group),
                    rate_max=max(s.rate for s in group),
                    cycles=cycles,
                    sockets_per_1000=sum(s.sockets for s in group) * per_1000,
                    created_per_1000=sum(created) * per_1000 if created else None,
                    time_wait_per_1000=sum(s.time_wait_server + s.time_wait_client for s in group) * per_1000,
                    time_wait_total=sum(s.time_wait_server + s.time_wait_client for s in group),
                    peak_fds_over_baseline=max(s.peak_fds - s.baseline_fds for s in group),
                    peak_fds=max(s.peak_fds for s in group),
                    time_limited=any(s.time_limited for s in group),
                    paired_vs_trio=paired_ratio(samples, concurrency, "trio") if variant == "pool" else None,
                    paired_vs_raw=paired_ratio(samples, concurrency, "raw") if variant == "pool" else None,
                    cpu_us_per_cycle=_cpu_per_cycle(group),
                )
            )
    return rows


def _cpu_per_cycle(group: list[Sample]) -> float | None:
    values = [s.cpu_seconds / s.cycles * 1e6 for s in group if s.cpu_seconds is not None and s.cycles]
    return statistics.median(values) if values else None


def paired_ratio(samples: list[Sample], concurrency: int, versus: Variant) -> float | None:
    """Median over repeats of pool/``versus``, each from one repeat's back-to-back measurements."""
    by_repeat: dict[int, dict[Variant, float]] = {}
    for sample in samples:
        if sample.concurrency == concurrency:
            by_repeat.setdefault(sample.repeat, {})[sample.variant] = sample.rate
    ratios = [rates["pool"] / rates[versus] for rates in by_repeat.values() if "pool" in rates and rates.get(versus)]
    return statistics.median(ratios) if ratios else None


def find(rows: list[Row], variant: Variant, concurrency: int) -> Row | None:
    """The row for ``variant`` at ``concurrency``, if it was measured."""
    return next((r for r in rows if r.variant == variant and r.concurrency == concurrency), None)


def ratio(rows: list[Row], concurrency: int, versus: Variant) -> float | None:
    """The pool's median rate over ``versus``'s at ``concurrency``."""
    pool, other = find(rows, "pool", concurrency), find(rows, versus, concurrency)
    if pool is None or other is None or other.rate == 0:
        return None
    return pool.rate / other.rate


@attrs.frozen
class Check:
    """One target at one concurrency."""

    concurrency: int
    target: str
    measured: str
    #: "met", "MISSED", or "UNSURE" when the two estimates of a ratio disagree.
    result: str
    note: str = ""


def check_targets(rows: list[Row]) -> list[Check]:
    """Compare the pool's headline rows with the targets."""
    checks = []
    for concurrency in HEADLINE:
        pool = find(rows, "pool", concurrency)
        if pool is None:
            continue
        versus: Variant
        for versus, (minimum, aim) in (("trio", TARGET_VS_TRIO), ("raw", TARGET_VS_RAW)):
            value = ratio(rows, concurrency, versus)
            paired = pool.paired_vs_trio if versus == "trio" else pool.paired_vs_raw
            if value is None or paired is None:
                continue
            # Met only when both estimates say so: on a noisy machine they can disagree.
            passed = (value >= minimum) + (paired >= minimum)
            result = ("MISSED", "UNSURE", "met")[passed]
            note = "" if min(value, paired) >= aim else f"aim {aim:.2f}x not reached"
            measured = f"{value:.2f}x (paired {paired:.2f}x"
            other = find(rows, versus, concurrency)
            if other is not None and other.cpu_us_per_cycle and pool.cpu_us_per_cycle:
                # What the rate ratio would be if the client were CPU-bound and alone on its CPU.
                measured += f"; by client CPU {other.cpu_us_per_cycle / pool.cpu_us_per_cycle:.2f}x"
            measured += ")"
            checks.append(Check(concurrency, f"pool/{versus} >= {minimum:.2f}x", measured, result, note))
        calls = pool.socket_calls_per_1000
        checks.append(
            Check(concurrency, "no socket() in steady state", f"{calls:.1f} per 1000 cycles", _met(calls == 0))
        )
        checks.append(
            Check(
                concurrency,
                "no TIME_WAIT",
                f"{pool.time_wait_total} entries in {pool.cycles} cycles",
                _met(pool.time_wait_total == 0),
            )
        )
        capacity = pool.capacity or 0
        checks.append(
            Check(
                concurrency,
                f"peak fds <= capacity + {FD_SLACK}",
                f"+{pool.peak_fds_over_baseline} over baseline (capacity {capacity})",
                _met(pool.peak_fds_over_baseline <= capacity + FD_SLACK),
            )
        )
    return checks


def _met(condition: bool) -> str:
    return "met" if condition else "MISSED"


# ----------------------------------------------------------------------
# Reports


def _cell_ratio(value: float | None, paired: float | None = None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}x" + ("" if paired is None else f" ({paired:.2f}x)")


def table_rows(rows: list[Row], concurrencies: tuple[int, ...]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the main table for the given concurrencies."""
    headers = [
        "tasks",
        "variant",
        "capacity",
        "cycles/s (median)",
        "min-max",
        "pool/trio",
        "pool/raw",
        "socket()/1000",
        "TIME_WAIT/1000",
        "peak fds (+over baseline)",
    ]
    with_cpu = any(row.cpu_us_per_cycle is not None for row in rows)
    if with_cpu:
        headers.append("client CPU us/cycle")
    cells = []
    for row in rows:
        if row.concurrency not in concurrencies:
            continue
        is_pool = row.variant == "pool"
        cells.append(
            [
                str(row.concurrency),
                LABELS[row.variant],
                str(row.capacity) if row.capacity is not None else "-",
                f"{row.rate:,.0f}" + (" (time limit)" if row.time_limited else ""),
                f"{row.rate_min:,.0f}-{row.rate_max:,.0f}",
                _cell_ratio(ratio(rows, row.concurrency, "trio"), row.paired_vs_trio) if is_pool else "",
                _cell_ratio(ratio(rows, row.concurrency, "raw"), row.paired_vs_raw) if is_pool else "",
                f"{row.socket_calls_per_1000:.1f}",
                f"{row.time_wait_per_1000:.1f}",
                f"{row.peak_fds} (+{row.peak_fds_over_baseline})",
            ]
        )
        if with_cpu:
            cells[-1].append(f"{row.cpu_us_per_cycle:.0f}" if row.cpu_us_per_cycle is not None else "")
    return headers, cells


def sweep_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the sweep: cycles/s per variant per concurrency."""
    headers = ["tasks", "pool capacity", *(LABELS[v] for v in VARIANTS), "pool/trio", "pool/raw"]
    with_cpu = any(row.cpu_us_per_cycle is not None for row in rows)
    if with_cpu:
        headers.append("client CPU us/cycle (raw/trio/pool)")
    cells = []
    for concurrency in SWEEP:
        line = [str(concurrency)]
        pool = find(rows, "pool", concurrency)
        line.append(str(pool.capacity) if pool is not None else "-")
        for variant in VARIANTS:
            row = find(rows, variant, concurrency)
            line.append(f"{row.rate:,.0f}" if row is not None else "")
        line.append(_cell_ratio(ratio(rows, concurrency, "trio"), pool.paired_vs_trio if pool else None))
        line.append(_cell_ratio(ratio(rows, concurrency, "raw"), pool.paired_vs_raw if pool else None))
        if with_cpu:
            cpu = [find(rows, variant, concurrency) for variant in VARIANTS]
            line.append("/".join(f"{r.cpu_us_per_cycle:.0f}" if r and r.cpu_us_per_cycle else "?" for r in cpu))
        cells.append(line)
    return headers, cells


def check_rows(checks: list[Check]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the targets table."""
    headers = ["tasks", "target", "measured", "result"]
    cells = [[str(c.concurrency), c.target, c.measured, c.result + (f" ({c.note})" if c.note else "")] for c in checks]
    return headers, cells


def text_table(headers: list[str], cells: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)
    return "\n".join(lines)


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(line) + " |" for line in cells)
    return "\n".join(lines)


@attrs.frozen
class Results:
    """Everything one run measured."""

    settings: Settings
    command: str
    machine: dict[str, object]
    samples: list[Sample]
    rows: list[Row]
    checks: list[Check]
    warnings: list[str]
    started: str
    seconds: float


def render(results: Results, table: Callable[[list[str], list[list[str]]], str]) -> str:
    """The report body (tables and warnings) in text or markdown."""
    s = results.settings
    parts = [
        f"{s.cycles} measured cycles per measurement after a warm-up of max({s.warmup}, {WARMUP_PER_TASK} x tasks),"
        f" median of {s.repeats} interleaved repeats; time limit {s.time_limit:g} s per batch."
        " Ratios: of the medians, and in brackets the median of the ratios within each repeat (paired);"
        " in the targets also the inverse ratio of client CPU time per cycle.",
        "",
        "Concurrency 1 and 32 (the targets):",
        "",
        table(*table_rows(results.rows, HEADLINE)),
        "",
        "Sweep, cycles/s (pool capacity = tasks, except 32 at 256 tasks):",
        "",
        table(*sweep_rows(results.rows)),
        "",
        "Targets:",
        "",
        table(*check_rows(results.checks)),
    ]
    if results.warnings:
        parts += ["", "Warnings:", ""]
        parts += [f"- {w}" for w in results.warnings]
    return "\n".join(parts)


def write_markdown(results: Results, path: Path) -> None:
    m = results.machine
    header = [
        "# Short-connection cycles: raw trio socket vs trio.open_tcp_stream vs the pool",
        "",
        f"Measured {results.started} in {results.seconds:.0f} s with `{results.command}`"
        + (
            f" (tables rebuilt later from its samples with `--from-json {results.settings.from_json.name}`)."
            if results.settings.from_json is not None
            else "."
        ),
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']},"
        f" trio {m['trio']}, trio-recycle {m['trio_recycle']} ({m['source']});"
        f" load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.",
        "",
        "Every cycle: connect to 127.0.0.1, send an 11-byte request, read the"
        f" {RESPONSE_BYTES}-byte answer until the server's FIN, close. The server runs in"
        " its own process and closes first. `socket()/1000` counts `socket.socket()`"
        " calls through an audit hook (for the pool also `statistics().created`)"
        " during the measured cycles; `TIME_WAIT/1000` counts entries for the"
        " measurement's own fresh server port in /proc/net/tcp{,6} (the raw and trio"
        " figures are a little under 1000 because a client port that comes round"
        " again for the same server port takes over the earlier entry); peak fds are"
        " sampled every 5 ms, the baseline taken before the variant starts.",
        "",
    ]
    path.write_text("\n".join(header) + "\n" + render(results, markdown_table) + "\n")


def write_json(results: Results, path: Path) -> None:
    def encode(value: object) -> object:
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot encode {value!r}")

    document = {
        "command": results.command,
        "started": results.started,
        "seconds": round(results.seconds, 1),
        "machine": results.machine,
        "settings": attrs.asdict(results.settings),
        "rows": [
            {
                **attrs.asdict(row),
                "socket_calls_per_1000": row.socket_calls_per_1000,
                "pool_vs_trio": ratio(results.rows, row.concurrency, "trio") if row.variant == "pool" else None,
                "pool_vs_raw": ratio(results.rows, row.concurrency, "raw") if row.variant == "pool" else None,
            }
            for row in results.rows
        ],
        "targets": [attrs.asdict(c) for c in results.checks],
        "warnings": results.warnings,
        "samples": [attrs.asdict(s) for s in results.samples],
    }
    path.write_text(json.dumps(document, indent=2, default=encode) + "\n")


def plot_sweep(results: Results, path: Path) -> str:
    """Plot cycles/s against concurrency; return what was done, for the log."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return f"matplotlib is not installed: {path.name} not drawn"
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (variant, marker) in enumerate(zip(VARIANTS, "osD", strict=True)):
        rows = [r for r in results.rows if r.variant == variant]
        if not rows:
            continue
        # Nudged sideways a little so that the three error bars do not hide each other.
        xs = [r.concurrency * 1.06 ** (index - 1) for r in rows]
        ys = [r.rate for r in rows]
        errors = [[r.rate - r.rate_min for r in rows], [r.rate_max - r.rate for r in rows]]
        axes.errorbar(xs, ys, yerr=errors, marker=marker, capsize=3, label=LABELS[variant])
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(SWEEP), [str(c) for c in SWEEP])
    axes.set_ylim(bottom=0)
    axes.set_xlabel("concurrent tasks (pool capacity = tasks, 32 at 256)")
    axes.set_ylabel("cycles/s (median, bars: min-max)")
    axes.set_title(f"connect/request/response/close, server closes first ({results.machine['nproc']} CPUs)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"wrote {path}"


# ----------------------------------------------------------------------
# The run


def plan(settings: Settings) -> list[tuple[int, Variant, int, int]]:
    """(repeat, variant, concurrency, capacity) in measuring order.

    Repeats go round all configurations, and the variants' order rotates
    from one measurement group to the next, so that drift on a busy machine
    (another job starting, the CPU clocking down) hits all three alike.
    """
    order = []
    for repeat in range(settings.repeats):
        for index, (concurrency, capacity) in enumerate(CONFIGS):
            k = (repeat + index) % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                order.append((repeat, variant, concurrency, capacity))
    return order


async def wait_for_time_wait_room(expected: int, limit: int) -> None:
    """Wait until ``expected`` more TIME_WAIT entries fit under TW_ROOM of the kernel's limit.

    The raw and trio variants leave one entry per cycle for 60 s, several
    thousand a second, and past ``tcp_max_tw_buckets`` the kernel silently
    drops new ones: the counts would come out low. So a long run pauses
    between measurements (never inside one) while old entries expire.
    """
    deadline = time.perf_counter() + TW_LIFETIME + 5
    announced = False
    while time.perf_counter() < deadline:
        present = count_time_wait().everywhere
        if present + expected <= TW_ROOM * limit:
            return
        if not announced:
            print(f"      ({present} TIME_WAIT entries on this machine: pausing while they expire)", flush=True)
            announced = True
        await trio.sleep(1.0)


async def run_benchmark(settings: Settings, counter: SocketCounter) -> tuple[list[Sample], list[str]]:
    """Warm up every variant once, then take every measurement of plan()."""
    warnings = []
    if not trio_recycle.can_recycle():
        warnings.append("trio_recycle.can_recycle() is False: the pool closes instead of recycling")
    limit = tw_bucket_limit()
    counters_before = tcp_counters()
    samples = []
    with CycleServer.running() as server:
        for variant in VARIANTS:
            await measure(server, counter, variant, 1, 1, settings.warmup, settings, -1)
        steps = plan(settings)
        for number, (repeat, variant, concurrency, capacity) in enumerate(steps, 1):
            if limit is not None and not settings.quick:
                expected = settings.cycles + max(settings.warmup, WARMUP_PER_TASK * concurrency)
                await wait_for_time_wait_room(expected, limit)
            sample = await measure(server, counter, variant, concurrency, capacity, settings.cycles, settings, repeat)
            samples.append(sample)
            print(
                f"[{number:>3}/{len(steps)}] {LABELS[variant]:<21} tasks {concurrency:>3}"
                f" {sample.rate:>9,.0f} cycles/s  socket() {sample.sockets:>5}"
                f"  TIME_WAIT {sample.time_wait_server + sample.time_wait_client:>5}"
                f"  fds {sample.peak_fds:>4}",
                flush=True,
            )
            if limit is not None and sample.time_wait_everywhere > TW_ROOM * limit:
                warnings.append(
                    f"{sample.time_wait_everywhere} TIME_WAIT entries on this machine after measurement {number},"
                    f" near tcp_max_tw_buckets={limit}"
                )
    counters_after = tcp_counters()
    for name in WATCHED_COUNTERS:
        grown = counters_after.get(name, 0) - counters_before.get(name, 0)
        if grown:
            what = (
                "TIME_WAIT counts may be low"
                if name == "TCPTimeWaitOverflow"
                else f"a listen queue overflowed, ours (backlog {BACKLOG}) or another process's"
            )
            warnings.append(f"TcpExt {name} grew by {grown} during the run (the counter is machine-wide): {what}")
    mismatched = [s for s in samples if s.created is not None and s.created != s.sockets]
    if mismatched:
        warnings.append(
            f"{len(mismatched)} pool measurements: audited socket() calls and statistics().created disagree;"
            " the table shows the larger"
        )
    if any(s.time_limited for s in samples):
        warnings.append(
            "some measurements hit the time limit: fewer cycles than asked (the rate is still cycles/elapsed)"
        )
    return samples, warnings


async def profile_variants(settings: Settings) -> str:
    """Profile each variant at concurrency 1 and 32; return the report."""
    report = []
    with CycleServer.running() as server:
        for concurrency in HEADLINE:
            for variant in VARIANTS:
                port = server.listen()
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
                    run = await drive(cycle, concurrency, settings.cycles, settings.time_limit)
                    profiler.disable()
                server.close(port)
                report.append(_profile_text(profiler, variant, concurrency, run))
    return "\n".join(report)


def _profile_text(profiler: cProfile.Profile, variant: Variant, concurrency: int, run: Drive) -> str:
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    for (filename, _, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        own = entry[2]
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
        groups[group] = groups.get(group, 0.0) + own
    lines = [
        f"== {LABELS[variant]}, {concurrency} tasks: {run.cycles} cycles in {run.seconds:.2f} s under the profiler"
        f" ({run.seconds / max(run.cycles, 1) * 1e6:.0f} us/cycle)",
        "own time by group:",
    ]
    lines += [f"  {100 * t / total:5.1f}%  {g}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    ours = [
        (entry[3], entry[2], entry[1], f"{Path(filename).name}:{line}({name})")
        for (filename, line, name), entry in stats.stats.items()  # type: ignore[attr-defined]
        if "trio_recycle" in filename and filename.endswith(".py")
    ]
    if ours:
        lines.append(
            "trio_recycle functions (cumulative and own time as % of all profiled time;"
            " a coroutine counts one call per resume):"
        )
        for cumulative, own, calls, where in sorted(ours, reverse=True):
            lines.append(
                f"  cum {100 * cumulative / total:5.1f}% {cumulative / max(run.cycles, 1) * 1e6:6.1f} us"
                f"  own {100 * own / total:5.1f}%  calls/cycle {calls / max(run.cycles, 1):4.1f}  {where}"
            )
    lines.append("top 25 functions by own time:")
    stats.sort_stats("tottime").print_stats(25)
    lines.append(buffer.getvalue())
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, help="measured cycles per measurement (default 4000; --quick: 100)")
    parser.add_argument(
        "--repeats", type=int, help="repeats of each measurement, median reported (default 5; --quick: 1)"
    )
    parser.add_argument("--time-limit", type=float, help="seconds after which a batch stops by itself (default 20)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run for tests and CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument(
        "--profile", action="store_true", help="profile each variant with cProfile instead of measuring"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: rebuild the tables, JSON and plot in --out from the samples of an earlier cycles.json",
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    cycles: int = args.cycles if args.cycles is not None else (100 if quick else 4000)
    repeats: int = args.repeats if args.repeats is not None else (1 if quick else 5)
    time_limit: float = args.time_limit if args.time_limit is not None else (3.0 if quick else 20.0)
    if cycles < 1 or repeats < 1 or time_limit <= 0:
        parser.error("--cycles and --repeats must be >= 1, --time-limit > 0")
    out: Path = args.out
    warmup = 20 if quick else max(100, cycles // 10)
    return Settings(cycles, warmup, repeats, time_limit, out, quick, args.profile, args.from_json)


def measure_all(settings: Settings) -> Results:
    """Take every measurement and summarise them."""
    counter = SocketCounter()
    sys.addaudithook(counter.hook)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    start = time.perf_counter()
    samples, warnings = trio.run(run_benchmark, settings, counter)
    seconds = time.perf_counter() - start
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = summarise(samples)
    command = " ".join(["python", "benchmarks/bench_cycles.py", *sys.argv[1:]])
    return Results(settings, command, info, samples, rows, check_targets(rows), warnings, started, seconds)


def load_results(path: Path, out: Path) -> Results:
    """The Results of an earlier run, summarised again from the samples in its cycles.json."""
    document = json.loads(path.read_text())
    samples = [Sample(**sample) for sample in document["samples"]]
    recorded = document["settings"]
    settings = Settings(**{**recorded, "out": out, "from_json": path})
    rows = summarise(samples)
    return Results(
        settings,
        document["command"],
        document["machine"],
        samples,
        rows,
        check_targets(rows),
        document["warnings"],
        document["started"],
        document["seconds"],
    )


def main(settings: Settings) -> int:
    if not sys.platform.startswith("linux"):
        print("bench_cycles.py needs Linux (/proc, and the pool recycles only there)", file=sys.stderr)
        return 2
    settings.out.mkdir(parents=True, exist_ok=True)
    if settings.profile:
        report = trio.run(profile_variants, settings)
        path = settings.out / "profile.txt"
        path.write_text(report)
        print(report)
        print(f"wrote {path}")
        return 0
    if settings.from_json is not None:
        results = load_results(settings.from_json, settings.out)
    else:
        results = measure_all(settings)
    print()
    print(render(results, text_table))
    write_markdown(results, settings.out / "cycles.md")
    write_json(results, settings.out / "cycles.json")
    print()
    print(f"wrote {settings.out / 'cycles.md'} and {settings.out / 'cycles.json'}")
    print(plot_sweep(results, settings.out / "sweep.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
