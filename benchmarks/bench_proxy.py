"""The reverse proxy under load: its upstream connections got four ways, against four upstreams.

What it measures: ``examples/demo.py`` at benchmark length. An upstream (its
own process), the reverse proxy in front of it (``examples/reverse_proxy.py``,
its own process), and a load generator (in the demo's process) keeping
kept-alive client connections busy. The proxy gets its upstream connections
four ways, one run each per round, the order alternating:

* ``plain``                -- `trio.open_tcp_stream` per request, no pool;
* ``recycle``              -- the pool, a connection per request, sockets recycled (recycling only);
* ``keepalive-no-recycle`` -- connections kept alive with ``release()``, a pool opened with
  ``recycle=False`` (what nginx's ``keepalive`` and httpx do);
* ``keepalive``            -- kept alive and recycled (the proxy's default).

Against four upstreams (``--scenarios``):

* ``closing``         -- ``examples/upstream_server.py``, closes after every response;
* ``keepalive``       -- ``examples/upstream_server.py --keepalive-requests 20 --keepalive-timeout 0.5``
  (the demo's upstream);
* ``nginx-closing``   -- nginx with ``keepalive_timeout 0``;
* ``nginx-keepalive`` -- nginx with ``keepalive_timeout 75s`` and ``keepalive_requests 100``.

nginx comes from the distribution's packages (``apt-get install nginx``);
``benchmarks/nginx_upstream.py`` runs it on a loopback port with a
temporary configuration and stops it after each run. Where nginx is not
installed, its two scenarios are skipped with a message.

Every run gets a fresh upstream and a fresh proxy. Per mode: requests/s
through the proxy (median over rounds, min-max), the proxy's CPU time per
request (user + system, from /proc; the steadier figure when the machine is
shared), upstream ``socket()`` calls and TIME_WAIT entries left on the
upstream per 1000 requests, requests retried after the stale-connection
race, the proxy's peak descriptor count, and failed requests. The targets,
checked in every scenario and printed: against a keep-alive upstream,
keep-alive with recycling at least matches keep-alive without recycling;
against a closing upstream, it matches recycling only (within 5 %).
Results: the demo's tables on stdout, and ``proxy.md`` and ``proxy.json`` in
``benchmarks/results`` (``--out``).

Run it with::

    python benchmarks/bench_proxy.py                  # 4 scenarios x 4 modes x 3 rounds of 4 s, about 5 minutes
    python benchmarks/bench_proxy.py --quick          # a smoke run
    python benchmarks/bench_proxy.py --scenarios nginx-keepalive --duration 10 --rounds 5

It needs h11 (the ``examples`` extra) and Linux (/proc). The exit status is
1 if a request failed or a recycling mode left TIME_WAIT entries (the
demo's checks); a missed throughput target is reported, not an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
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
NGINX: Final = HERE / "nginx_upstream.py"
DEFAULT_OUT: Final = HERE / "results"
MODES: Final = ("plain", "recycle", "keepalive-no-recycle", "keepalive")
LABELS: Final = {
    "plain": "trio.open_tcp_stream",
    "recycle": "recycling only",
    "keepalive-no-recycle": "keep-alive, recycle=False",
    "keepalive": "keep-alive + recycling",
}
#: Each scenario's upstream: a description and the demo's options for it.
SCENARIOS: Final = {
    "closing": (
        "examples/upstream_server.py, closes after every response",
        ["--keepalive-requests", "1"],
    ),
    "keepalive": (
        "examples/upstream_server.py, keeps a connection for 20 requests, closes it after 0.5 s idle",
        ["--keepalive-requests", "20", "--keepalive-timeout", "0.5"],
    ),
    "nginx-closing": (
        "nginx, keepalive_timeout 0 (closes after every response)",
        ["--upstream-command", f"{sys.executable} {NGINX} --keepalive-timeout 0"],
    ),
    "nginx-keepalive": (
        "nginx, keepalive_timeout 75s, keepalive_requests 100",
        ["--upstream-command", f"{sys.executable} {NGINX} --keepalive-timeout 75 --keepalive-requests 100"],
    ),
}
#: A scenario's target: (mode, baseline, the least ratio of requests/s that meets it).
TARGETS: Final = {
    "closing": ("keepalive", "recycle", 0.95),
    "keepalive": ("keepalive", "keepalive-no-recycle", 1.0),
    "nginx-closing": ("keepalive", "recycle", 0.95),
    "nginx-keepalive": ("keepalive", "keepalive-no-recycle", 1.0),
}


@attrs.frozen
class Settings:
    duration: float
    rounds: int
    connections: int
    size: int
    side_by_side: bool
    out: Path
    scenarios: tuple[str, ...] = tuple(SCENARIOS)


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
    retried: int
    peak_fds: int
    #: Requests/s of each round, in round order (for ratios within a round).
    rates: tuple[float, ...] = ()

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
        retried=int(sum(number(r, "retried") for r in runs)),
        peak_fds=int(max(number(r, "peak_fds") for r in runs)),
        rates=tuple(rates),
    )


@attrs.frozen
class Verdict:
    """A scenario's throughput target, measured."""

    text: str
    ratio: float
    paired: float
    cpu_ratio: float
    least: float

    @property
    def met(self) -> bool:
        return self.ratio >= self.least and self.paired >= self.least


def judge(scenario: str, summaries: list[Summary]) -> Verdict | None:
    mode, base, least = TARGETS[scenario]
    by_mode = {s.mode: s for s in summaries}
    run, other = by_mode.get(mode), by_mode.get(base)
    if run is None or other is None or not (other.rate and run.cpu_us):
        return None
    pairs = [a / b for a, b in zip(run.rates, other.rates, strict=True) if b]
    paired = statistics.median(pairs) if pairs else 0.0
    if least >= 1.0:
        text = f"{LABELS[mode]} matches or beats {LABELS[base]} (>= {least:.2f}x)"
    else:
        text = f"{LABELS[mode]} matches {LABELS[base]} (>= {least:.2f}x)"
    return Verdict(text, run.rate / other.rate, paired, other.cpu_us / run.cpu_us, least)


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


def markdown(settings: Settings, results: dict[str, list[Summary]], meta: dict[str, object]) -> str:
    lines = [
        "# The reverse proxy under load: upstream connections four ways, against four upstreams",
        "",
        f"Measured {meta['when']} in {meta['seconds']:.0f} s with `python benchmarks/bench_proxy.py"
        f" --duration {settings.duration:g} --rounds {settings.rounds}"
        f" --scenarios {','.join(settings.scenarios)}`.",
        "",
        f"Machine: {meta['machine']}; load average at start {meta['load_start']}, at end {meta['load_end']}.",
        "",
        f"Each run: a fresh upstream ({settings.size}-byte bodies) and a fresh proxy"
        f" (`examples/reverse_proxy.py`), each its own process; {settings.connections} kept-alive client"
        f" connections from the load generator; {settings.duration:g} s measured per run after a 0.5 s warm-up;"
        f" every response checked. Median of {settings.rounds} round(s), each with fresh processes, the order"
        f" alternating.{' The modes loaded at the same time.' if settings.side_by_side else ''}",
    ]
    skipped = meta.get("skipped")
    if skipped:
        lines += ["", f"Skipped: {skipped}"]
    for scenario, summaries in results.items():
        lines += [
            "",
            f"## Upstream: {SCENARIOS[scenario][0]}",
            "",
            "| upstream connections | requests/s (median) | min-max | proxy CPU/request (us)"
            " | socket()/1000 | TIME_WAIT/1000 | retried | failed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in summaries:
            lines.append(
                f"| {LABELS[s.mode]} | {s.rate:,.0f} | {s.rate_min:,.0f}-{s.rate_max:,.0f} | {s.cpu_us:,.0f}"
                f" | {s.socket_per_1000:.1f} | {s.time_wait_per_1000:.1f} | {s.retried} | {s.failed} |"
            )
        verdict = judge(scenario, summaries)
        if verdict is not None:
            lines += [
                "",
                f"Target: {verdict.text}: **{'met' if verdict.met else 'missed'}**, {verdict.ratio:.2f}x"
                f" (paired {verdict.paired:.2f}x; by proxy CPU per request {verdict.cpu_ratio:.2f}x).",
            ]
    lines += [
        "",
        "Paired: the median of the ratios within each round, whose runs came one after the other. By proxy CPU:"
        " the inverse ratio of the proxy's CPU time per request, the figure least moved by other load.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description="Benchmark the reverse proxy example (runs examples/demo.py).")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 4; --quick: 0.5)")
    parser.add_argument("--rounds", type=int, help="runs per mode (default 3; --quick: 1)")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="client connections (default 32: enough to keep the proxy busy, and few enough upstream connections"
        " that each carries the 100 requests after which nginx closes it)",
    )
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument("--side-by-side", action="store_true", help="load the four proxies at the same time")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run for tests and CI")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    scenarios = tuple(args.scenarios.split(","))
    if not set(scenarios) <= SCENARIOS.keys():
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    duration = args.duration if args.duration is not None else 0.5 if args.quick else 4.0
    rounds = args.rounds if args.rounds is not None else 1 if args.quick else 3
    return Settings(duration, rounds, args.connections, args.size, args.side_by_side, args.out, scenarios)


def run_demo(settings: Settings, scenario: str, json_path: Path) -> int:
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
        *SCENARIOS[scenario][1],
        *(["--side-by-side"] if settings.side_by_side else []),
    ]
    print(f"\n=== upstream: {SCENARIOS[scenario][0]}", flush=True)
    return subprocess.run(argv, check=False).returncode


def main(settings: Settings) -> int:
    load_start = load_average()
    start = time.monotonic()
    results: dict[str, list[Summary]] = {}
    runs: dict[str, object] = {}
    skipped = []
    returncode = 0
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in settings.scenarios:
            if (
                scenario.startswith("nginx")
                and shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None
            ):
                message = f"{scenario}: nginx is not installed (Debian/Ubuntu: apt-get install nginx)"
                print(f"\nskipped {message}", flush=True)
                skipped.append(message)
                continue
            json_path = Path(tmp) / f"{scenario}.json"
            code = run_demo(settings, scenario, json_path)
            returncode = returncode or code
            if not json_path.exists():
                print(f"the demo wrote no results for {scenario} (exit status {code})", file=sys.stderr)
                returncode = returncode or 1
                continue
            data = json.loads(json_path.read_text())
            runs[scenario] = data["runs"]
            results[scenario] = [summarize(mode, [r for r in data["runs"] if r["mode"] == mode]) for mode in MODES]
    meta: dict[str, object] = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.monotonic() - start,
        "machine": machine(),
        "load_start": load_start,
        "load_end": load_average(),
        "skipped": "; ".join(skipped),
    }
    print()
    for scenario, summaries in results.items():
        verdict = judge(scenario, summaries)
        if verdict is not None:
            print(
                f"{scenario}: {verdict.text}: {'met' if verdict.met else 'MISSED'}, {verdict.ratio:.2f}x"
                f" (paired {verdict.paired:.2f}x, by proxy CPU {verdict.cpu_ratio:.2f}x)"
            )
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "proxy.md").write_text(markdown(settings, results, meta))
    document = {
        "settings": {**attrs.asdict(settings), "out": str(settings.out)},
        "meta": meta,
        "summary": {
            scenario: [{**attrs.asdict(s), "socket_per_1000": s.socket_per_1000} for s in summaries]
            for scenario, summaries in results.items()
        },
        "targets": {
            scenario: attrs.asdict(verdict) | {"met": verdict.met}
            for scenario, summaries in results.items()
            if (verdict := judge(scenario, summaries)) is not None
        },
        "runs": runs,
    }
    (settings.out / "proxy.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {settings.out / 'proxy.md'} and {settings.out / 'proxy.json'}")
    return returncode


if __name__ == "__main__":
    sys.exit(main(parse_args()))
