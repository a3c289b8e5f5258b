"""The trio-recycle demo: a reverse proxy under load, its upstream connections got four ways.

What it shows: the project's main case, measured. On 127.0.0.1 it starts
an upstream (``upstream_server.py``, its own process) that keeps a
connection alive for ``--keepalive-requests`` requests and closes it after
``--keepalive-timeout`` seconds idle, as nginx does, and the reverse proxy
in front of it (``reverse_proxy.py``, its own process); a load generator
(here) keeps ``--connections`` kept-alive client connections to the proxy
busy. The proxy gets its upstream connections in each of ``--modes``
(``--help`` lists them), each run with fresh processes and the order
alternating, and the demo prints a side-by-side table: requests per
second, the proxy's CPU time per request, upstream ``socket()`` calls,
TIME_WAIT entries left on the upstream, requests retried after the
stale-connection race, failed requests, the proxy's peak number of open
descriptors, and the slowest request.

What the figures depend on is said in `MEASURES` below, which ``--help``
prints: counts follow from each mode, rates from the machine's load too.

Run it (the proxy needs h11, from the ``examples`` extra)::

    nox -s demo
    nox -s demo -- --help
    python examples/demo.py [--duration 3] [--rounds 2] [--connections 64] [--size 1024]

``--side-by-side`` loads all the proxies at the same time instead, each
with its own upstream, so that they see the same machine at the same
moment. ``--upstream-command`` runs another upstream (the proxy benchmark
runs nginx this way); ``--json PATH`` writes the figures for
``benchmarks/bench_proxy.py``.

Every response is checked: status 200 and a body that names its own
request, so a byte of another connection would count as a failure. The exit
status is 1 if a request failed, a process misbehaved, or a recycling mode
left TIME_WAIT entries on the upstream.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio

# The examples' one TIME_WAIT counter (the benchmarks and tests use benchmarks/harness/counters.py).
from fetcher import count_time_wait

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

HERE: Final = Path(__file__).resolve().parent
#: The proxy's upstream connections, by mode: its switches, a label, and what the mode is.
MODES: Final = {
    "plain": (
        ["--plain"],
        "trio.open_tcp_stream",
        "trio.open_tcp_stream for every request, Connection: close, no pool (what trio code does today)",
    ),
    "no-recycle": (
        ["--no-keepalive", "--no-recycle"],
        "pool, recycle=False",
        "the pool, one connection per request, sockets closed instead of recycled",
    ),
    "recycle": (
        ["--no-keepalive"],
        "recycling only",
        "the pool, one connection per request with Connection: close, each socket recycled after the upstream's FIN",
    ),
    "keepalive-no-recycle": (
        ["--no-recycle"],
        "keep-alive, recycle=False",
        "connections kept alive with release(), but a socket the upstream closes is closed, not recycled"
        " (a pool opened with recycle=False: what nginx's keepalive and httpx do)",
    ),
    "keepalive": (
        [],
        "keep-alive + recycling",
        "connections kept alive with release(), and a socket the upstream closes is recycled (the proxy's default)",
    ),
}
#: What the demo measures and what its figures depend on (printed by --help).
MEASURES: Final = """\
What the figures depend on. Upstream socket() calls, TIME_WAIT entries and
failed requests are counts: they follow from what each mode does, whatever
the machine. Requests per second are a measurement: the proxy's Python work
(h11 on both sides, about the same in every mode) is most of each request,
so a mode's gain over another is the share of that work it saves (a
connect(), a socket() and close(), the kernel's TIME_WAIT work). The ratio
shrinks when other jobs take the CPUs, when responses grow, and when the
upstream, not the proxy, is the bottleneck. So the ratios are reported,
never judged; the proxy's CPU time per request is the steadier figure on a
shared machine."""
DEFAULT_MODES: Final = "plain,recycle,keepalive-no-recycle,keepalive"
#: Modes that recycle: they must leave no TIME_WAIT entry on the upstream.
RECYCLING: Final = ("recycle", "keepalive")
#: Seconds a child process gets to start, and to stop after SIGINT.
PROCESS_TIMEOUT: Final = 10.0
#: Seconds one request may take before it counts as failed.
REQUEST_TIMEOUT: Final = 10.0
#: Seconds of load before measuring starts.
WARMUP: Final = 0.5
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Args:
    duration: float
    rounds: int
    connections: int
    capacity: int
    size: int
    modes: tuple[str, ...]
    side_by_side: bool
    json_path: str | None
    keepalive_requests: int = 20
    keepalive_timeout: float = 0.5
    upstream_command: str | None = None


@attrs.define
class Run:
    """One run of one mode: a fresh upstream, a fresh proxy, load, counts."""

    mode: str
    seconds: float = 0.0
    measured: int = 0
    requests: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    proxy_cpu: float = 0.0
    socket_calls: int = 0
    time_wait: int = 0
    retried: int = 0
    peak_fds: int = 0
    slowest: float = 0.0
    proxy_report: list[str] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)


class ResponseError(Exception):
    """A response that is not the one asked for."""


# ---------------------------------------------------------------------------
# Child processes


@attrs.define(eq=False)
class Child:
    """A child process that prints ``listening on HOST:PORT`` when ready."""

    name: str
    process: trio.Process
    host: str = ""
    port: int = 0
    output: bytearray = attrs.field(factory=bytearray)

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self.output:
            data = await self.process.stdout.receive_some(65536)
            if not data:
                raise RuntimeError(f"{self.name} exited before it was ready: {self.output.decode(errors='replace')}")
            self.output += data
        line, _, rest = self.output.partition(b"\n")
        self.output[:] = rest
        return line.decode()

    async def stop(self) -> str:
        """SIGINT, then return what it printed until it exited."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGINT)
        with trio.move_on_after(PROCESS_TIMEOUT):
            async for data in self.process.stdout:
                self.output += data
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
            raise RuntimeError(f"{self.name} did not stop within {PROCESS_TIMEOUT} s of SIGINT")
        if self.process.returncode:
            raise RuntimeError(f"{self.name} exited with status {self.process.returncode}")
        return self.output.decode(errors="replace")


@asynccontextmanager
async def spawn(name: str, command: list[str], *options: str) -> AsyncIterator[Child]:
    """Run ``command --listen 127.0.0.1:0 *options`` until the block exits; kill it if it is still there."""
    argv = [*command, "--listen", "127.0.0.1:0", *options]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        child = Child(name, process)
        with trio.fail_after(PROCESS_TIMEOUT):
            line = await child.read_line()
        match = re.fullmatch(r"listening on \[?(.*?)\]?:(\d+)", line)
        if match is None:
            raise RuntimeError(f"{name} said {line!r} instead of 'listening on HOST:PORT'")
        child.host, child.port = match[1], int(match[2])
        yield child
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def example(script: str) -> list[str]:
    return [sys.executable, str(HERE / script)]


def upstream_command(args: Args) -> tuple[list[str], list[str]]:
    """The upstream's command and its options: ``--upstream-command``, or ``upstream_server.py``."""
    if args.upstream_command is not None:
        return shlex.split(args.upstream_command), []
    return example("upstream_server.py"), [
        "--size",
        str(args.size),
        "--keepalive-requests",
        str(args.keepalive_requests),
        "--keepalive-timeout",
        str(args.keepalive_timeout),
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ---------------------------------------------------------------------------
# The load generator


async def read_response(sock: trio.socket.SocketType, buffer: bytearray) -> tuple[int, bytes, bool]:
    """Read one Content-Length-framed response; return (status, body, server closes)."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > 65536:
            raise ResponseError("response head too long")
        data = await sock.recv(65536)
        if not data:
            raise ResponseError("the proxy closed the connection")
        buffer += data
    head = bytes(buffer[:end]).lower()
    start = head.find(b"\r\ncontent-length:") + 17
    stop = head.find(b"\r\n", start)
    try:
        if start < 17:
            raise ValueError
        status = int(head[9:12])
        length = int(head[start : stop if stop >= 0 else None])
    except ValueError:
        raise ResponseError(f"unexpected response head {head[:200]!r}") from None
    total = end + 4 + length
    while len(buffer) < total:
        data = await sock.recv(65536)
        if not data:
            raise ResponseError("the proxy closed the connection in a response body")
        buffer += data
    body = bytes(buffer[end + 4 : total])
    del buffer[:total]
    return status, body, b"\r\nconnection: close" in head


@attrs.define
class Load:
    done: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    slowest: float = 0.0


async def load_client(host: str, port: int, number: int, load: Load, stop: trio.Event) -> None:
    """Send requests over one kept-alive connection until ``stop`` is set."""
    sequence = 0
    while not stop.is_set():
        try:
            with trio.socket.socket() as sock:
                await sock.connect((host, port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer = bytearray()
                while not stop.is_set():
                    sequence += 1
                    path = f"/demo/{number}/{sequence}".encode()
                    request = b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\n\r\n"
                    sent = trio.current_time()
                    with trio.fail_after(REQUEST_TIMEOUT):
                        await sock.send(request)
                        status, body, close = await read_response(sock, buffer)
                    if status != 200:
                        raise ResponseError(f"status {status}: {body[:200]!r}")
                    if not body.startswith(b"GET " + path + b"\n"):
                        raise ResponseError(f"the body of another request: {body[:60]!r}")
                    load.done += 1
                    load.slowest = max(load.slowest, trio.current_time() - sent)
                    if close:
                        break
        except (OSError, ResponseError, trio.TooSlowError) as exc:
            load.failures[f"{type(exc).__name__}: {exc}"] += 1
            await trio.sleep(0.05)


class Progress:
    """One status line, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()

    def show(self, text: str, *, final: bool = False) -> None:
        if self.tty:
            print(f"\r\x1b[K{text}", end="\n" if final else "", flush=True)
        elif final:
            print(text, flush=True)


@attrs.define(eq=False)
class Contender:
    """One mode in a round: its upstream, its proxy, its load and its figures."""

    run: Run
    upstream: Child
    proxy: Child
    load: Load = attrs.field(factory=Load)
    done_at_start: int = 0
    cpu_at_start: float = 0.0


async def run_round(modes: tuple[str, ...], args: Args, label: str, progress: Progress) -> list[Run]:
    """Load a fresh upstream and proxy for each mode, all at the same time."""
    async with contextlib.AsyncExitStack() as stack:
        contenders = []
        for mode in modes:
            command, upstream_options = upstream_command(args)
            upstream = await stack.enter_async_context(spawn("upstream", command, *upstream_options))
            options = [
                *MODES[mode][0],
                "--upstream",
                f"{upstream.host}:{upstream.port}",
                "--capacity",
                str(args.capacity),
            ]
            proxy = await stack.enter_async_context(spawn(f"proxy ({mode})", example("reverse_proxy.py"), *options))
            contenders.append(Contender(Run(mode), upstream, proxy))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for contender in contenders:
                for number in range(args.connections):
                    proxy = contender.proxy
                    nursery.start_soon(load_client, proxy.host, proxy.port, number, contender.load, stop)
            begin = trio.current_time()
            total = WARMUP + args.duration

            async def watch(until: float) -> None:
                while (now := trio.current_time()) < until:
                    elapsed = now - begin
                    rates = []
                    for c in contenders:
                        c.run.peak_fds = max(c.run.peak_fds, open_fds(c.proxy.process.pid))
                        rates.append(f"{c.run.mode} {c.load.done / max(elapsed, 0.01):6,.0f}/s")
                    failed = sum(sum(c.load.failures.values()) for c in contenders)
                    bar = "#" * int(20 * elapsed / total)
                    progress.show(
                        f"  {label} [{bar:20}] {elapsed:4.1f}/{total:.1f} s  {'  '.join(rates)}  {failed} failed"
                    )
                    await trio.sleep(0.05)

            await watch(begin + WARMUP)
            start = trio.current_time()
            for c in contenders:
                c.done_at_start, c.cpu_at_start = c.load.done, cpu_seconds(c.proxy.process.pid)
            await watch(begin + total)
            end = trio.current_time()
            for c in contenders:
                c.run.seconds = end - start
                c.run.measured = c.load.done - c.done_at_start
                c.run.proxy_cpu = cpu_seconds(c.proxy.process.pid) - c.cpu_at_start
            stop.set()
        for c in contenders:
            c.run.requests = c.load.done
            c.run.failures = c.load.failures
            c.run.slowest = c.load.slowest
            c.run.proxy_report = (await c.proxy.stop()).strip().splitlines()
        for c in contenders:
            await c.upstream.stop()
    # Every upstream closed its connections before it exited; give the last
    # FINs and RSTs a moment to cross loopback before counting.
    await trio.sleep(0.1)
    for c in contenders:
        run = c.run
        run.time_wait = count_time_wait(c.upstream.port)
        check_report(run)
        progress.show(
            f"  {label} {run.mode:20} {run.measured / run.seconds:7,.0f} requests/s, {run.requests:,} requests,"
            f" {sum(run.failures.values())} failed, {run.socket_calls:,} socket() calls,"
            f" {run.time_wait:,} TIME_WAIT",
            final=True,
        )
    return [c.run for c in contenders]


def check_report(run: Run) -> None:
    """Read the proxy's exit report: socket() calls, and that nothing leaked."""
    text = "\n".join(run.proxy_report)
    calls = re.search(r"upstream socket\(\) calls: (\d+)", text)
    requests = re.search(r"proxy: (\d+) requests, responses (.*), (\d+) aborted", text)
    if calls is None or requests is None:
        run.problems.append(f"unexpected report from the proxy: {text!r}")
        return
    run.socket_calls = int(calls[1])
    retried = re.search(r"(\d+) retried", text)
    run.retried = int(retried[1]) if retried else 0
    if requests[2] != f"200={run.requests}" or requests[3] != "0":
        run.problems.append(f"the proxy answered {requests[2]} with {requests[3]} aborted; want 200={run.requests}")
    stats = re.search(r"in_use=(\d+)", text)
    if stats is not None and stats[1] != "0":
        run.problems.append(f"the proxy's pool still had sockets in use at exit: {text}")


# ---------------------------------------------------------------------------
# The table


def combine(runs: list[Run]) -> Run:
    total = Run(runs[0].mode)
    for run in runs:
        total.seconds += run.seconds
        total.measured += run.measured
        total.requests += run.requests
        total.failures.update(run.failures)
        total.proxy_cpu += run.proxy_cpu
        total.socket_calls += run.socket_calls
        total.time_wait += run.time_wait
        total.retried += run.retried
        total.peak_fds = max(total.peak_fds, run.peak_fds)
        total.slowest = max(total.slowest, run.slowest)
        total.problems += run.problems
    return total


def rate(run: Run) -> float:
    return run.measured / run.seconds if run.seconds else 0.0


def print_table(totals: list[Run]) -> None:
    def per_request_us(run: Run) -> str:
        return f"{1e6 * run.proxy_cpu / run.measured:,.0f}" if run.measured else "-"

    rows = {
        "requests/s through the proxy": [f"{rate(r):,.0f}" for r in totals],
        "proxy CPU per request (us)": [per_request_us(r) for r in totals],
        "requests (failed)": [f"{r.requests:,} ({sum(r.failures.values())})" for r in totals],
        "upstream socket() calls": [f"{r.socket_calls:,}" for r in totals],
        "TIME_WAIT left on upstream": [f"{r.time_wait:,}" for r in totals],
        "retried (stale connection)": [f"{r.retried:,}" for r in totals],
        "peak proxy descriptors": [f"{r.peak_fds:,}" for r in totals],
        "slowest request (ms)": [f"{1000 * r.slowest:,.0f}" for r in totals],
    }
    width = max(24, *(len(MODES[r.mode][1]) + 2 for r in totals))
    print()
    print(f"{'':30}" + "".join(f"{MODES[r.mode][1]:>{width}}" for r in totals))
    for label, cells in rows.items():
        print(f"{label:30}" + "".join(f"{cell:>{width}}" for cell in cells))


def verdict(totals: dict[str, Run]) -> bool:
    """Print the checks and the ratios; return False if a correctness check failed.

    Only counts are checked: failed requests, and TIME_WAIT entries left by
    a mode that recycles. Rates depend on the machine's load, so their
    ratios are printed without a mark.
    """
    ok = True
    lines = []
    failed = sum(sum(run.failures.values()) for run in totals.values())
    lines.append(f"  [{'ok' if failed == 0 else '!!'}] no failed request: {failed} failed")
    ok &= failed == 0
    for mode in RECYCLING:
        if mode in totals:
            time_wait = totals[mode].time_wait
            label = MODES[mode][1]
            lines.append(
                f"  [{'ok' if time_wait == 0 else '!!'}] no TIME_WAIT on the upstream with {label}: {time_wait} left"
            )
            ok &= time_wait == 0
    pairs = [
        ("keepalive", "keepalive-no-recycle"),
        ("keepalive", "recycle"),
        ("recycle", "plain"),
        ("keepalive", "plain"),
    ]
    ratios = []
    for mode, base in pairs:
        run, other = totals.get(mode), totals.get(base)
        if run is None or other is None or not (rate(other) and run.proxy_cpu and run.measured and other.measured):
            continue
        cpu_ratio = (other.proxy_cpu / other.measured) / (run.proxy_cpu / run.measured)
        ratios.append(
            f"       {MODES[mode][1]} / {MODES[base][1]}: {rate(run) / rate(other):.2f}x requests/s,"
            f" {cpu_ratio:.2f}x by proxy CPU per request"
        )
    print()
    for line in lines:
        print(line)
    if ratios:
        print("  measured, not judged (the machine's load moves them; see --help):")
        for line in ratios:
            print(line)
    for run in totals.values():
        for problem in run.problems:
            print(f"  [!!] {run.mode}: {problem}")
            ok = False
        for reason, count in run.failures.most_common(5):
            print(f"  {run.mode}: {count} x {reason}")
    return ok


def parse_args(argv: list[str] | None = None) -> Args:
    modes = "\n".join(
        textwrap.fill(MODES[mode][2], 79, initial_indent=f"  {mode:22}", subsequent_indent=" " * 24) for mode in MODES
    )
    parser = argparse.ArgumentParser(
        description="Load a reverse proxy whose upstream connections are got in several ways; print a table.",
        epilog=f"modes (--modes), the proxy's upstream connections:\n{modes}\n\n{MEASURES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each with fresh processes (default %(default)s)")
    parser.add_argument("--connections", type=int, default=64, help="client connections to the proxy (default 64)")
    parser.add_argument("--capacity", type=int, default=64, help="the proxy's pool capacity (default 64)")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help="comma-separated, of the modes listed below (default %(default)s)",
    )
    parser.add_argument(
        "--keepalive-requests",
        type=int,
        default=20,
        metavar="K",
        help="the upstream closes a connection after K requests (default %(default)s)",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=0.5,
        metavar="T",
        help="the upstream closes a connection idle for T seconds (default %(default)s)",
    )
    parser.add_argument(
        "--upstream-command",
        metavar="COMMAND",
        help="run this upstream instead of upstream_server.py; it gets --listen 127.0.0.1:0 and must print"
        " 'listening on HOST:PORT'",
    )
    parser.add_argument(
        "--side-by-side", action="store_true", help="load the proxies at the same time instead of one after the other"
    )
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    chosen = tuple(args.modes.split(","))
    if not set(chosen) <= MODES.keys() or len(set(chosen)) != len(chosen):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if not 0 < args.duration <= 600 or not 1 <= args.rounds <= 20 or not 1 <= args.connections <= 1000:
        parser.error("--duration must be in (0, 600], --rounds in 1..20, --connections in 1..1000")
    if args.keepalive_requests < 1 or not args.keepalive_timeout > 0:
        parser.error("--keepalive-requests must be >= 1 and --keepalive-timeout > 0")
    return Args(
        duration=args.duration,
        rounds=args.rounds,
        connections=args.connections,
        capacity=args.capacity,
        size=args.size,
        modes=chosen,
        side_by_side=args.side_by_side,
        json_path=args.json_path,
        keepalive_requests=args.keepalive_requests,
        keepalive_timeout=args.keepalive_timeout,
        upstream_command=args.upstream_command,
    )


async def main(args: Args) -> None:
    if importlib.util.find_spec("h11") is None:
        sys.exit("the proxy needs h11: pip install 'trio-recycle[examples]' (or h11)")
    if args.upstream_command is not None:
        upstream = f"`{args.upstream_command}`"
    else:
        upstream = (
            f"an upstream that closes after {args.keepalive_requests} requests"
            f" and after {args.keepalive_timeout:g} s idle"
        )
    print(
        f"trio-recycle demo: a reverse proxy on 127.0.0.1 in front of {upstream};\n"
        f"{args.connections} kept-alive client connections, {args.size}-byte responses,"
        f" {args.duration:g} s measured per run, {args.rounds} round(s) of {', '.join(args.modes)}"
        f"{', side by side' if args.side_by_side else ', one after the other'}.\n"
        "It counts upstream socket() calls, TIME_WAIT left on the upstream and failed requests, and measures"
        " requests/s;\nthe counts follow from each mode, the rates also from the machine's load.",
        flush=True,
    )
    progress = Progress()
    runs: dict[str, list[Run]] = {mode: [] for mode in args.modes}
    for number in range(args.rounds):
        label = f"round {number + 1}/{args.rounds}"
        if args.side_by_side:
            for run in await run_round(args.modes, args, label, progress):
                runs[run.mode].append(run)
            continue
        # Alternate the order (ABBA) so that a drift in the machine's load
        # does not favour one mode.
        for mode in args.modes if number % 2 == 0 else args.modes[::-1]:
            (run,) = await run_round((mode,), args, label, progress)
            runs[mode].append(run)
    totals = {mode: combine(mode_runs) for mode, mode_runs in runs.items()}
    print_table(list(totals.values()))
    ok = verdict(totals)
    if args.json_path is not None:
        data = {
            "args": attrs.asdict(args),
            "runs": [attrs.asdict(run) for mode_runs in runs.values() for run in mode_runs],
            "requests_per_second": {mode: rate(run) for mode, run in totals.items()},
        }
        text = json.dumps(data, indent=2)
        if args.json_path == "-":
            print(text)
        else:
            await trio.Path(args.json_path).write_text(text + "\n")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    trio.run(main, parse_args())
