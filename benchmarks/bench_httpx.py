"""httpx over recycled sockets: stock httpx.AsyncClient vs AsyncClient(transport=RecyclingTransport(pool)).

What it measures: requests/s of one ``httpx.AsyncClient`` making GET
requests as fast as it can from 1 and from 16 tasks, against two upstreams
in their own process: one that closes after every response (``Connection:
close``) and one that keeps connections alive. Each client runs two ways:

* ``stock`` -- ``httpx.AsyncClient()``: httpcore's trio backend, a new
  socket per connection;
* ``pool``  -- ``httpx.AsyncClient(transport=RecyclingTransport(pool))``,
  with a pool of capacity 2 x tasks.

Every cell (upstream x tasks x variant) gets a fresh upstream and a fresh
client; the variants alternate order from round to round. Per cell:
requests/s (median over rounds, min-max), the client's CPU time per
request (user + system, from getrusage: the steadier figure when the
machine is shared), ``socket()`` calls (an audit hook), and TIME_WAIT
entries the upstream is left with. The ratios pool/stock are checked
against the targets of DESIGN.md (>= 1.3x at 1 task and >= 1.15x at 16
tasks against the closing upstream, >= 0.95x against keep-alive, no
TIME_WAIT on the upstream, ``socket()`` calls within the pool's capacity).

The upstream is nginx when it is installed (``--upstream auto``, the
default), else ``benchmarks/http_upstream.py``. Run it with::

    python benchmarks/bench_httpx.py                 # 3 rounds of 3 s per cell, about 2 minutes
    python benchmarks/bench_httpx.py --quick         # a smoke run, seconds
    python benchmarks/bench_httpx.py --upstream python --duration 5 --rounds 5

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
    duration: float
    warmup: float
    rounds: int
    size: int
    upstream: str
    out: Path


@attrs.frozen
class Sample:
    mode: str
    tasks: int
    variant: str
    round: int
    requests: int
    failed: int
    seconds: float
    cpu_seconds: float
    socket_calls: int
    time_wait: int
    capacity: int
    pool_stats: str

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


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
    tally = Tally()
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = trio.current_time() + seconds

        async def worker() -> None:
            while True:
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


async def run_cell(
    settings: Settings, counter: SocketCounter, port: int, mode: str, tasks: int, variant: str, round_: int
) -> Sample:
    url = f"http://127.0.0.1:{port}/"
    capacity = 2 * tasks
    async with contextlib.AsyncExitStack() as stack:
        pool = None
        transport: httpx.AsyncBaseTransport
        if variant == "pool":
            pool = await stack.enter_async_context(trio_recycle.open_socket_pool(capacity=capacity))
            transport = RecyclingTransport(pool)
        else:
            transport = httpx.AsyncHTTPTransport()
        client = await stack.enter_async_context(httpx.AsyncClient(transport=transport))
        sockets_before = counter.count
        await load(client, url, tasks, settings.warmup, settings.size)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        tally = await load(client, url, tasks, settings.duration, settings.size)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        await client.aclose()
        pool_stats = repr(pool.statistics()) if pool is not None else ""
        socket_calls = counter.count - sockets_before
    # The last FINs are handled in the kernel's softirq: a moment to settle.
    await trio.sleep(0.2)
    return Sample(
        mode,
        tasks,
        variant,
        round_,
        tally.requests,
        tally.failed,
        seconds,
        cpu,
        socket_calls,
        time_wait_count(port),
        capacity if variant == "pool" else 0,
        pool_stats,
    )


# ----------------------------------------------------------------------
# Summary and report


@attrs.frozen
class Row:
    mode: str
    tasks: int
    variant: str
    rate: float
    rate_min: float
    rate_max: float
    cpu_us: float
    socket_calls: int
    time_wait: int
    capacity: int
    failed: int


def summarise(samples: list[Sample]) -> list[Row]:
    rows = []
    for mode in MODES:
        for tasks in TASKS:
            for variant in VARIANTS:
                cell = [s for s in samples if (s.mode, s.tasks, s.variant) == (mode, tasks, variant)]
                if not cell:
                    continue
                rates = [s.rate for s in cell]
                rows.append(
                    Row(
                        mode,
                        tasks,
                        variant,
                        statistics.median(rates),
                        min(rates),
                        max(rates),
                        statistics.median(s.cpu_seconds / max(s.requests, 1) * 1e6 for s in cell),
                        max(s.socket_calls for s in cell),
                        max(s.time_wait for s in cell),
                        cell[0].capacity,
                        sum(s.failed for s in cell),
                    )
                )
    return rows


def ratios(samples: list[Sample]) -> dict[tuple[str, int], tuple[float, list[float]]]:
    """pool/stock per (mode, tasks): the ratio of medians, and each round's ratio."""
    result = {}
    for mode in MODES:
        for tasks in TASKS:
            by_round: dict[int, dict[str, float]] = {}
            for s in samples:
                if (s.mode, s.tasks) == (mode, tasks):
                    by_round.setdefault(s.round, {})[s.variant] = s.rate
            rounds = [r["pool"] / r["stock"] for r in by_round.values() if r.get("stock") and "pool" in r]
            medians = {
                v: statistics.median(s.rate for s in samples if (s.mode, s.tasks, s.variant) == (mode, tasks, v))
                for v in VARIANTS
            }
            result[mode, tasks] = (medians["pool"] / medians["stock"], rounds)
    return result


def check_targets(rows: list[Row], samples: list[Sample]) -> list[str]:
    lines = []
    for (mode, tasks), (ratio, _) in ratios(samples).items():
        target = TARGETS[mode, tasks]
        mark = "ok" if ratio >= target else "MISS"
        lines.append(f"[{mark}] {mode} upstream, {tasks} task(s): {ratio:.2f}x stock (target >= {target}x)")
    for row in rows:
        if row.variant != "pool":
            continue
        if row.mode == "close":
            mark = "ok" if row.time_wait == 0 else "MISS"
            lines.append(f"[{mark}] {row.tasks} task(s): {row.time_wait} TIME_WAIT on the closing upstream (target 0)")
        mark = "ok" if row.socket_calls <= row.capacity else "MISS"
        lines.append(
            f"[{mark}] {row.mode} upstream, {row.tasks} task(s): {row.socket_calls} socket() calls,"
            f" capacity {row.capacity}"
        )
    failed = sum(row.failed for row in rows)
    lines.append(f"[{'ok' if failed == 0 else 'MISS'}] {failed} failed requests")
    return lines


def table(rows: list[Row], samples: list[Sample]) -> str:
    ratio = ratios(samples)
    out = [
        "| upstream | tasks | client | requests/s (min-max) | CPU us/request | socket() calls | TIME_WAIT on upstream |"
        " pool/stock (per round) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        overall, rounds = ratio[row.mode, row.tasks]
        shown = f"**{overall:.2f}x** ({', '.join(f'{r:.2f}' for r in rounds)})" if row.variant == "pool" else ""
        out.append(
            f"| {row.mode} | {row.tasks} | {LABELS[row.variant]} | {row.rate:,.0f} ({row.rate_min:,.0f}-"
            f"{row.rate_max:,.0f}) | {row.cpu_us:,.0f} | {row.socket_calls:,} | {row.time_wait:,} | {shown} |"
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
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 0.3 s per cell")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for httpx.md and httpx.json")
    args = parser.parse_args(argv)
    kind = args.upstream
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "python"
    if args.quick:
        return Settings(0.3, 0.1, 1, args.size, kind, args.out)
    return Settings(args.duration, 0.5, args.rounds, args.size, kind, args.out)


def main(settings: Settings) -> None:
    counter = SocketCounter()
    sys.addaudithook(counter.hook)
    info = machine(settings.upstream)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    samples = []
    for round_ in range(settings.rounds):
        for mode in MODES:
            for tasks in TASKS:
                order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    with upstream(settings.upstream, mode, settings.size) as port:
                        sample = trio.run(run_cell, settings, counter, port, mode, tasks, variant, round_)
                    samples.append(sample)
                    print(
                        f"round {round_ + 1}/{settings.rounds} {mode:10} {tasks:2} task(s) {variant:5}"
                        f" {sample.rate:8,.0f} requests/s, {sample.socket_calls} socket(), {sample.time_wait}"
                        f" TIME_WAIT {sample.pool_stats}",
                        flush=True,
                    )
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = summarise(samples)
    checks = check_targets(rows, samples)
    command = " ".join(["python", "benchmarks/bench_httpx.py", *sys.argv[1:]])
    text = table(rows, samples)
    print()
    print(text)
    print()
    print("\n".join(checks))
    settings.out.mkdir(parents=True, exist_ok=True)
    report = [
        f"# httpx: stock vs RecyclingTransport ({started})",
        "",
        f"Command: `{command}`; upstream: {settings.upstream}; {settings.rounds} round(s) of"
        f" {settings.duration} s per cell; response body {settings.size} bytes.",
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
        "rows": [attrs.asdict(row) for row in rows],
        "samples": [{**attrs.asdict(s), "rate": s.rate} for s in samples],
        "ratios": {f"{m}/{t}": {"ratio": r, "rounds": rs} for (m, t), (r, rs) in ratios(samples).items()},
        "checks": checks,
    }
    (settings.out / "httpx.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {settings.out / 'httpx.md'} and {settings.out / 'httpx.json'}")
    if any(row.failed for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main(parse_args())
