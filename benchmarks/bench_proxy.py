"""The reverse proxy example under load: recycled upstream sockets vs closing them vs trio.open_tcp_stream.

What it measures: ``examples/demo.py`` at benchmark length. An upstream that
closes after every response (``examples/upstream_server.py``, its own
process), the reverse proxy in front of it (``examples/reverse_proxy.py``,
its own process), and a load generator (in the demo's process) keeping
kept-alive client connections busy. The proxy gets its upstream
connections three ways, one run each per round, the order alternating
(``--side-by-side``: the three proxies loaded at the same time):

* ``recycle``    -- ``pool.open_tcp_stream``, sockets recycled (the default);
* ``no-recycle`` -- the same pool opened with ``recycle=False``;
* ``plain``      -- `trio.open_tcp_stream`, no pool.

Every run gets a fresh upstream and a fresh proxy. Per mode: requests/s
through the proxy (median over rounds, min-max), the proxy's CPU time per
request (user + system, from /proc; the steadier figure when the machine is
shared), upstream ``socket()`` calls and TIME_WAIT entries left on the
upstream per 1000 requests, the proxy's peak descriptor count, and failed
requests. Results: the demo's table on stdout, and ``proxy.md`` and
``proxy.json`` in ``benchmarks/results`` (``--out``).

Run it with::

    python benchmarks/bench_proxy.py                  # 3 rounds of 8 s per mode, about 1.5 minutes
    python benchmarks/bench_proxy.py --quick          # a smoke run, seconds
    python benchmarks/bench_proxy.py --duration 15 --rounds 5 --out /tmp/bench

It needs h11 (the ``examples`` extra) and Linux (/proc). The exit status is
the demo's: 1 if a request failed or recycling left TIME_WAIT entries.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import attrs

HERE: Final = Path(__file__).resolve().parent
DEMO: Final = HERE.parent / "examples" / "demo.py"
DEFAULT_OUT: Final = HERE / "results"
MODES: Final = ("recycle", "no-recycle", "plain")
LABELS: Final = {
    "recycle": "pool, recycled",
    "no-recycle": "pool, recycle=False",
    "plain": "trio.open_tcp_stream",
}


@attrs.frozen
class Settings:
    duration: float
    rounds: int
    connections: int
    size: int
    side_by_side: bool
    out: Path


@attrs.frozen
class Summary:
    mode: str
    rate: float
    rate_min: float
    rate_max: float
    cpu_us: float
    requests: int
    failed: int
    socket_calls: int
    time_wait: int
    peak_fds: int

    @property
    def socket_per_1000(self) -> float:
        return 1000 * self.socket_calls / self.requests if self.requests else 0.0

    @property
    def time_wait_per_1000(self) -> float:
        return 1000 * self.time_wait / self.requests if self.requests else 0.0


def summarize(mode: str, runs: list[dict[str, object]]) -> Summary:
    def number(run: dict[str, object], key: str) -> float:
        value = run[key]
        assert isinstance(value, (int, float))
        return value

    rates = [number(r, "measured") / number(r, "seconds") for r in runs if number(r, "seconds")]
    cpu = [1e6 * number(r, "proxy_cpu") / number(r, "measured") for r in runs if number(r, "measured")]
    failed = 0
    for run in runs:
        failures = run["failures"]
        assert isinstance(failures, dict)
        failed += sum(failures.values())
    return Summary(
        mode=mode,
        rate=statistics.median(rates) if rates else 0.0,
        rate_min=min(rates, default=0.0),
        rate_max=max(rates, default=0.0),
        cpu_us=statistics.median(cpu) if cpu else 0.0,
        requests=int(sum(number(r, "requests") for r in runs)),
        failed=failed,
        socket_calls=int(sum(number(r, "socket_calls") for r in runs)),
        time_wait=int(sum(number(r, "time_wait") for r in runs)),
        peak_fds=int(max(number(r, "peak_fds") for r in runs)),
    )


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = f" ({line.partition(':')[2].strip()})"
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs{cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def markdown(settings: Settings, summaries: list[Summary], meta: dict[str, object]) -> str:
    plain = next((s for s in summaries if s.mode == "plain"), None)
    lines = [
        "# The reverse proxy under load: recycled upstream sockets vs trio.open_tcp_stream",
        "",
        f"Measured {meta['when']} in {meta['seconds']:.0f} s with `python benchmarks/bench_proxy.py"
        f" --duration {settings.duration:g} --rounds {settings.rounds}`.",
        "",
        f"Machine: {meta['machine']}; load average at start {meta['load_start']}, at end {meta['load_end']}.",
        "",
        f"Each run: a fresh upstream (`examples/upstream_server.py`, {settings.size}-byte bodies, closes after"
        f" every response) and a fresh proxy (`examples/reverse_proxy.py`), each its own process;"
        f" {settings.connections} kept-alive client connections from the load generator;"
        f" {settings.duration:g} s measured per run after a 0.5 s warm-up; every response checked."
        f" Median of {settings.rounds} round(s), each with fresh processes, the order alternating."
        f"{' The modes loaded at the same time.' if settings.side_by_side else ' The modes one after the other.'}",
        "",
        "| upstream connections | requests/s (median) | min-max | vs plain | proxy CPU/request (us) | vs plain"
        " | socket()/1000 | TIME_WAIT/1000 | peak fds | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        rate_ratio = f"{s.rate / plain.rate:.2f}x" if plain and plain.rate and s is not plain else ""
        cpu_ratio = f"{plain.cpu_us / s.cpu_us:.2f}x" if plain and s.cpu_us and s is not plain else ""
        lines.append(
            f"| {LABELS[s.mode]} | {s.rate:,.0f} | {s.rate_min:,.0f}-{s.rate_max:,.0f} | {rate_ratio}"
            f" | {s.cpu_us:,.0f} | {cpu_ratio} | {s.socket_per_1000:.1f} | {s.time_wait_per_1000:.1f}"
            f" | {s.peak_fds} | {s.failed} |"
        )
    lines += [
        "",
        "`vs plain` for CPU is plain's CPU per request over this mode's: higher is better, like requests/s."
        " Requests/s depends on everything else the machine runs; CPU per request much less so.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description="Benchmark the reverse proxy example (runs examples/demo.py).")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 8; --quick: 1)")
    parser.add_argument("--rounds", type=int, help="runs per mode (default 3; --quick: 1)")
    parser.add_argument("--connections", type=int, default=64, help="client connections (default 64)")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument("--side-by-side", action="store_true", help="load the three proxies at the same time")
    parser.add_argument("--quick", action="store_true", help="a smoke run for tests and CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else 1.0 if args.quick else 8.0
    rounds = args.rounds if args.rounds is not None else 1 if args.quick else 3
    return Settings(duration, rounds, args.connections, args.size, args.side_by_side, args.out)


def main(settings: Settings) -> int:
    load_start = load_average()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "demo.json"
        argv = [
            sys.executable,
            str(DEMO),
            "--duration",
            str(settings.duration),
            "--rounds",
            str(settings.rounds),
            "--connections",
            str(settings.connections),
            "--size",
            str(settings.size),
            "--modes",
            ",".join(MODES),
            "--json",
            str(json_path),
            *(["--side-by-side"] if settings.side_by_side else []),
        ]
        returncode = subprocess.run(argv, check=False).returncode
        if not json_path.exists():
            print(f"the demo wrote no results (exit status {returncode})", file=sys.stderr)
            return returncode or 1
        data = json.loads(json_path.read_text())
    meta: dict[str, object] = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.monotonic() - start,
        "machine": machine(),
        "load_start": load_start,
        "load_end": load_average(),
    }
    runs = data["runs"]
    summaries = [summarize(mode, [r for r in runs if r["mode"] == mode]) for mode in MODES]
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "proxy.md").write_text(markdown(settings, summaries, meta))
    result = {
        "settings": {**attrs.asdict(settings), "out": str(settings.out)},
        "meta": meta,
        "summary": [{**attrs.asdict(s), "socket_per_1000": s.socket_per_1000} for s in summaries],
        "runs": runs,
    }
    (settings.out / "proxy.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {settings.out / 'proxy.md'} and {settings.out / 'proxy.json'}")
    return returncode


if __name__ == "__main__":
    sys.exit(main(parse_args()))
