"""Keep-alive exchanges: a raw trio loop holding one socket per task vs the pool's release() and take.

What it shows: the cost of one request/response exchange on a connection
kept alive, against a server (its own process) that answers every request
line with a fixed answer and never closes, measured in one run,
interleaved, three ways:

* ``raw``    -- each task holds one ``trio.socket`` socket for the whole run:
  ``send``, ``recv`` until the answer is complete. The floor for trio code.
* ``stream`` -- each task holds one `trio.SocketStream` (``send_all``,
  ``receive_some``): what the stream abstraction costs by itself.
* ``pool``   -- every exchange is ``pool.open_tcp_stream`` (which takes the
  parked connection: no DNS, no connect, one liveness check),
  ``send_all``, ``receive_some`` until the answer is complete, and
  ``stream.release()`` (a non-blocking peek, the watch's epoll
  registration).

The target (docs/benchmarks.md): a pool exchange costs at
most 10 us more than a raw one, ``1e6/pool rate - 1e6/raw rate``, at 1 and
32 tasks (pool capacity = tasks). Every measurement is repeated
(``--repeats``) with the variants' order rotated; the median is reported,
with the client process's CPU time per exchange beside it, the steadiest
figure when other jobs share the machine.

Run it with ``nox -s bench`` or::

    python benchmarks/bench_keepalive.py                # the full run, about a minute
    python benchmarks/bench_keepalive.py --quick        # a smoke run, seconds
    python benchmarks/bench_keepalive.py --exchanges 20000 --repeats 7

Results: a table on stdout, ``keepalive.md`` and ``keepalive.json`` in
``benchmarks/results`` (``--out``). Linux only (the pool's watch is epoll).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
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
REQUEST: Final = b"GET /keep-alive\n"
RESPONSE_BYTES: Final = 64
Variant = Literal["raw", "stream", "pool"]
VARIANTS: Final[tuple[Variant, ...]] = ("raw", "stream", "pool")
LABELS: Final[dict[Variant, str]] = {
    "raw": "raw trio socket, held",
    "stream": "trio.SocketStream, held",
    "pool": "pool open + release()",
}
CONCURRENCY: Final = (1, 32)
#: The docs' target: a pool exchange costs at most this many microseconds more than a raw one.
TARGET_EXTRA_US: Final = 10.0
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results"

# The server: stdlib sockets on one epoll loop, a fixed answer per request
# line, never closing first. It runs as `python -c` in its own process and
# prints its port.
SERVER_CODE: Final = r"""
import selectors, socket, sys
response = b"x" * (int(sys.argv[1]) - 1) + b"\n"
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
listener.setblocking(False)
selector = selectors.EpollSelector()
selector.register(listener, selectors.EVENT_READ)
selector.register(sys.stdin, selectors.EVENT_READ)
print(listener.getsockname()[1], flush=True)
pending = {}
while True:
    for key, _ in selector.select():
        sock = key.fileobj
        if sock is sys.stdin:
            sys.exit(0)
        if sock is listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending[conn] = b""
                selector.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionError:
            data = b""
        if not data:
            selector.unregister(sock)
            del pending[sock]
            sock.close()
            continue
        buffered = pending[sock] + data
        count = buffered.count(b"\n")
        pending[sock] = buffered[buffered.rfind(b"\n") + 1 :]
        if count:
            sock.sendall(response * count)
"""


@attrs.frozen
class Settings:
    exchanges: int
    repeats: int
    out: Path
    quick: bool


@attrs.frozen
class Sample:
    variant: Variant
    tasks: int
    exchanges: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.exchanges / self.seconds


@contextlib.contextmanager
def server_process() -> Iterator[int]:
    """Start the keep-alive server; yield its port; stop it (EOF on stdin) on exit."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(RESPONSE_BYTES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(timeout=5)


Exchange = Callable[[], Awaitable[None]]


async def _raw_worker(port: int, count: int) -> None:
    sock = trio.socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        await sock.connect((HOST, port))
        for _ in range(count):
            await sock.send(REQUEST)
            got = 0
            while got < RESPONSE_BYTES:
                chunk = await sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed")
                got += len(chunk)


async def _stream_worker(port: int, count: int) -> None:
    async with await trio.open_tcp_stream(HOST, port) as stream:
        for _ in range(count):
            await stream.send_all(REQUEST)
            got = 0
            while got < RESPONSE_BYTES:
                chunk = await stream.receive_some()
                if not chunk:
                    raise RuntimeError("the server closed")
                got += len(chunk)


def _pool_worker(pool: trio_recycle.SocketPool) -> Callable[[int, int], Awaitable[None]]:
    async def worker(port: int, count: int) -> None:
        for _ in range(count):
            stream = await pool.open_tcp_stream(HOST, port)
            await stream.send_all(REQUEST)
            got = 0
            while got < RESPONSE_BYTES:
                chunk = await stream.receive_some()
                if not chunk:
                    raise RuntimeError("the server closed")
                got += len(chunk)
            await stream.release()

    return worker


async def measure(variant: Variant, port: int, tasks: int, exchanges: int) -> Sample:
    """Run ``exchanges`` exchanges split over ``tasks`` tasks, after a warm-up of a few per task."""
    per_task = max(1, exchanges // tasks)
    async with trio_recycle.open_socket_pool(capacity=tasks) as pool:
        worker: Callable[[int, int], Awaitable[None]]
        if variant == "raw":
            worker = _raw_worker
        elif variant == "stream":
            worker = _stream_worker
        else:
            worker = _pool_worker(pool)

        async def run(count: int) -> float:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(worker, port, count)
            return time.perf_counter() - start

        await run(4)  # warm-up: connections made, the pool's sockets parked
        cpu = time.process_time()
        seconds = await run(per_task)
        cpu = time.process_time() - cpu
        if variant == "pool":
            stats = pool.statistics()
            if stats.created > tasks:
                raise RuntimeError(f"the pool made {stats.created} sockets for {tasks} tasks: not kept alive")
    return Sample(variant, tasks, per_task * tasks, seconds, cpu)


def _median(samples: list[Sample], attribute: str) -> float:
    values: list[float] = [getattr(sample, attribute) / sample.exchanges * 1e6 for sample in samples]
    return statistics.median(values)


def report(samples: list[Sample]) -> tuple[str, dict[str, object]]:
    """The table (markdown) and the JSON summary."""
    lines = [
        "| tasks | variant | exchanges/s | us/exchange | client CPU us/exchange | pool - raw, us | target |",
        "|------:|---------|------------:|------------:|-----------------------:|---------------:|--------|",
    ]
    summary: dict[str, object] = {}
    for tasks in CONCURRENCY:
        per: dict[Variant, tuple[float, float]] = {}
        for variant in VARIANTS:
            group = [s for s in samples if s.variant == variant and s.tasks == tasks]
            if group:
                per[variant] = (_median(group, "seconds"), _median(group, "cpu_seconds"))
        raw_us = per["raw"][0]
        for variant, (us, cpu_us) in per.items():
            extra = us - raw_us
            verdict = ""
            if variant == "pool":
                verdict = "met" if extra <= TARGET_EXTRA_US else "MISSED"
                summary[f"pool_minus_raw_us@{tasks}"] = round(extra, 2)
                summary[f"pool_minus_raw_cpu_us@{tasks}"] = round(cpu_us - per["raw"][1], 2)
            summary[f"{variant}_us@{tasks}"] = round(us, 2)
            lines.append(
                f"| {tasks} | {LABELS[variant]} | {1e6 / us:,.0f} | {us:.1f} | {cpu_us:.1f} | "
                f"{extra:+.1f} | {verdict} |"
            )
    return "\n".join(lines), summary


async def run_all(settings: Settings, port: int) -> list[Sample]:
    samples: list[Sample] = []
    for repeat in range(settings.repeats):
        for tasks in CONCURRENCY:
            order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
            for variant in order:
                samples.append(await measure(variant, port, tasks, settings.exchanges))
    return samples


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--exchanges", type=int, help="measured exchanges per measurement (default 10000; --quick: 300)"
    )
    parser.add_argument("--repeats", type=int, help="repeats, median reported (default 5; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run for tests and CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    exchanges = args.exchanges or (300 if args.quick else 10000)
    repeats = args.repeats or (1 if args.quick else 5)
    if exchanges < 1 or repeats < 1:
        parser.error("--exchanges and --repeats must be >= 1")
    return Settings(exchanges, repeats, args.out, args.quick)


def main(settings: Settings) -> int:
    if not sys.platform.startswith("linux"):
        print("bench_keepalive.py measures Linux only (the pool's watch is epoll)", file=sys.stderr)
        return 0
    with server_process() as port:
        samples = trio.run(run_all, settings, port)
    table, summary = report(samples)
    title = (
        f"Keep-alive exchanges, {settings.exchanges} per measurement, median of {settings.repeats}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} x{os.cpu_count()}, Python {platform.python_version()}, trio {trio.__version__}"
    )
    print(title)
    print(table)
    if not settings.quick:
        settings.out.mkdir(parents=True, exist_ok=True)
        (settings.out / "keepalive.md").write_text(f"{title}\n\n{table}\n")
        data = {"title": title, "summary": summary, "samples": [attrs.asdict(s) for s in samples]}
        (settings.out / "keepalive.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {settings.out / 'keepalive.md'} and {settings.out / 'keepalive.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
