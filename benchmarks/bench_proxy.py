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
    python benchmarks/bench_proxy.py --scenarios nginx-keepalive --duration 10 --repeats 5

It needs h11 (the ``examples`` extra) and Linux (/proc). The exit status is
1 if a request failed or a recycling mode left TIME_WAIT entries (the
demo's checks); a missed throughput target is reported, not an error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
from harness import cli, report, runs, servers
from harness.machine import load_average, machine
from harness.targets import Verdict, judge, target

if TYPE_CHECKING:
    import argparse

HERE: Final = Path(__file__).resolve().parent
DEMO: Final = HERE.parent / "examples" / "demo.py"
NGINX: Final = HERE / "nginx_upstream.py"
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
#: A scenario's target compares this mode with that one (the bound is in harness/targets.py).
COMPARED: Final = {
    "closing": ("keepalive", "recycle"),
    "keepalive": ("keepalive", "keepalive-no-recycle"),
    "nginx-closing": ("keepalive", "recycle"),
    "nginx-keepalive": ("keepalive", "keepalive-no-recycle"),
}


@attrs.frozen
class Settings:
    duration: float
    rounds: int
    connections: int
    size: int
    side_by_side: bool
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


def summarize(mode: str, mode_runs: list[dict[str, object]]) -> Summary:
    def number(run: dict[str, object], key: str) -> float:
        value = run[key]
        assert isinstance(value, (int, float))
        return value

    rates = [number(r, "measured") / number(r, "seconds") for r in mode_runs if number(r, "seconds")]
    cpu = [1e6 * number(r, "proxy_cpu") / number(r, "measured") for r in mode_runs if number(r, "measured")]
    failed = 0
    for run in mode_runs:
        failures = run["failures"]
        assert isinstance(failures, dict)
        failed += sum(failures.values())
    return Summary(
        mode=mode,
        rate=runs.median(rates),
        rate_min=min(rates, default=0.0),
        rate_max=max(rates, default=0.0),
        cpu_us=runs.median(cpu),
        requests=int(sum(number(r, "requests") for r in mode_runs)),
        failed=failed,
        socket_calls=int(sum(number(r, "socket_calls") for r in mode_runs)),
        time_wait=int(sum(number(r, "time_wait") for r in mode_runs)),
        retried=int(sum(number(r, "retried") for r in mode_runs)),
        peak_fds=int(max(number(r, "peak_fds") for r in mode_runs)),
        rates=tuple(rates),
    )


def verdict(scenario: str, summaries: list[Summary]) -> Verdict | None:
    mode, base = COMPARED[scenario]
    by_mode = {s.mode: s for s in summaries}
    run, other = by_mode.get(mode), by_mode.get(base)
    if run is None or other is None or not (other.rate and run.cpu_us):
        return None
    pairs = [a / b for a, b in zip(run.rates, other.rates, strict=True) if b]
    ratio, paired = run.rate / other.rate, runs.median(pairs)
    measured = f"{ratio:.2f}x (paired {paired:.2f}x; by proxy CPU per request {other.cpu_us / run.cpu_us:.2f}x)"
    return judge(target("proxy", scenario), ratio, paired, measured=measured)


def render(doc: report.Document) -> report.Report:
    s = doc["settings"]
    out = report.Report("The reverse proxy under load: upstream connections four ways, against four upstreams")
    out.add(
        f"Each run: a fresh upstream ({s['size']}-byte bodies) and a fresh proxy (`examples/reverse_proxy.py`),"
        f" each its own process; {s['connections']} kept-alive client connections from the load generator;"
        f" {s['duration']:g} s measured per run after a 0.5 s warm-up; every response checked. Median of"
        f" {s['rounds']} round(s), each with fresh processes, the order alternating."
        + (" The modes loaded at the same time." if s["side_by_side"] else "")
        + " Paired: the median of the ratios within each round. By proxy CPU: the inverse ratio of the proxy's CPU"
        " time per request, the figure least moved by other load."
    )
    if doc.get("skipped"):
        out.add(f"Skipped: {doc['skipped']}")
    headers = ["upstream connections", "requests/s (median)", "min-max", "proxy CPU/request (us)", "socket()/1000"]
    headers += ["TIME_WAIT/1000", "retried", "failed"]
    for scenario, scenario_runs in doc["runs"].items():
        summaries = [summarize(mode, [r for r in scenario_runs if r["mode"] == mode]) for mode in MODES]
        cells = [
            [
                LABELS[x.mode],
                f"{x.rate:,.0f}",
                f"{x.rate_min:,.0f}-{x.rate_max:,.0f}",
                f"{x.cpu_us:,.0f}",
                f"{x.socket_per_1000:.1f}",
                f"{x.time_wait_per_1000:.1f}",
                str(x.retried),
                str(x.failed),
            ]
            for x in summaries
        ]
        out.table(headers, cells, f"## Upstream: {SCENARIOS[scenario][0]}")
        if (v := verdict(scenario, summaries)) is not None:
            out.verdicts.append(v)
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = cli.parser(__doc__, quick="runs of 0.5 s, 1 round", repeats="rounds: runs per mode; default 3")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 4; --quick: 0.5)")
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
    args = parser.parse_args(argv)
    scenarios = tuple(args.scenarios.split(","))
    if not set(scenarios) <= SCENARIOS.keys():
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    duration = args.duration if args.duration is not None else 0.5 if args.quick else 4.0
    settings = Settings(duration, cli.repeats(args, 3), args.connections, args.size, args.side_by_side, scenarios)
    return args, settings


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


def measure(settings: Settings) -> report.Document:
    info = machine()
    started, start = report.now(), time.perf_counter()
    runs: dict[str, object] = {}
    skipped = []
    statuses = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in settings.scenarios:
            if scenario.startswith("nginx") and servers.find_nginx() is None:
                message = f"{scenario}: nginx is not installed (Debian/Ubuntu: apt-get install nginx)"
                print(f"\nskipped {message}", flush=True)
                skipped.append(message)
                continue
            json_path = Path(tmp) / f"{scenario}.json"
            code = run_demo(settings, scenario, json_path)
            statuses.append(code)
            if not json_path.exists():
                print(f"the demo wrote no results for {scenario} (exit status {code})", file=sys.stderr)
                statuses.append(1)
                continue
            runs[scenario] = json.loads(json_path.read_text())["runs"]
    info["loadavg_end"] = load_average()
    seconds = time.perf_counter() - start
    return report.document(
        "proxy",
        settings,
        info,
        started,
        seconds,
        runs=runs,
        skipped="; ".join(skipped),
        demo_status=max(statuses, default=0),
    )


if __name__ == "__main__":
    arguments, settings = parse_args()
    # The demo's own checks (a failed request, TIME_WAIT with recycling) set its exit status; a missed
    # throughput target is reported, not an error.
    status = cli.main("proxy", arguments, settings, measure, render)
    if status == 0 and arguments.from_json is None:
        status = 1 if report.load(arguments.out / "proxy.json").get("demo_status") else 0
    sys.exit(status)
