"""Scale (issue #16 item 5): an exchange's cost and the memory per pooled socket as the pool grows.

What it shows: whether a keep-alive exchange (take a parked connection,
send a request line, read the answer, release it) stays as cheap with
thousands of parked connections and thousands of peers as with a few, and
what one pooled socket costs in memory. Two sweeps, each point a fresh
pool against one keep-alive server (its own process, line_server.py) that
serves up to 10,000 addresses 127.0.x.y with one listener (on the
wildcard address, bound to the loopback device):

* capacity 16 .. 16384, 16 peers: the pool is filled (every socket
  connected, then released: parked) before the exchanges;
* peers 1 .. 10,000 at the largest capacity.

Per point: us per exchange (wall, 32 tasks or as many as the capacity,
each exchange to the next peer in turn) and client CPU us per exchange, both also as ratios to the
sweep's smallest point; the Python heap growth per pooled socket while the
pool fills (tracemalloc: the pool's own objects and the socket objects), and the
kernel's socket slab growth (``/proc/slabinfo`` TCP and sock_inode_cache,
machine-wide, so the server's end is in it) per pooled socket. The
target (harness/targets.py): an exchange with 4096 parked connections
costs at most 1.3x the one with 64. Every point is repeated
(``--repeats``), the order of the points rotating; medians. Each point is
bounded in time (``--time-limit``); RLIMIT_NOFILE is raised for the
client and the server (root may raise the hard limit; points that do not
fit are skipped with a message).

Run it with ``nox -s bench`` or::

    python benchmarks/bench_scale.py                 # both sweeps, a few minutes
    python benchmarks/bench_scale.py --quick         # capacities 16, 64, 4096; peers 1, 100; seconds

Results: ``scale.md`` and ``scale.json`` in ``benchmarks/results`` (``--out``).
"""

from __future__ import annotations

import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio
from harness import cli, report, runs, servers
from harness.machine import load_average, machine
from harness.targets import judge, target

import trio_recycle

if TYPE_CHECKING:
    import argparse

REQUEST: Final = b"GET /scale\n"
RESPONSE_BYTES: Final = 64
TASKS: Final = 32
#: Exchanges per task before the measured ones (each point's first exchanges are slower).
WARMUP: Final = 4
CAPACITIES: Final = (16, 64, 256, 1024, 4096, 16384)
PEERS: Final = (1, 10, 100, 1000, 10000)
CAPACITY_SWEEP_PEERS: Final = 16
QUICK_CAPACITIES: Final = (16, 64, 4096)
QUICK_PEERS: Final = (1, 100)
#: Descriptors beyond the sockets themselves (trio, the interpreter, pipes).
FD_SLACK: Final = 256

#: The server (its own process): listeners on many loopback addresses, a
#: fixed answer per request line, never closing first; it prints its peers.
SERVER: Final = Path(__file__).resolve().parent / "line_server.py"


@attrs.frozen
class Settings:
    points: tuple[tuple[str, int, int], ...]
    exchanges: int
    repeats: int
    time_limit: float


@attrs.frozen
class Sample:
    sweep: str
    capacity: int
    peers: int
    repeat: int
    exchanges: int
    seconds: float
    cpu_seconds: float
    parked: int
    #: Python heap (tracemalloc) growth while the pool filled: what its sockets hold.
    heap_bytes: int
    kernel_bytes: int
    time_limited: bool


#: The slab caches a TCP socket lives in (the sock itself, and its inode).
SLABS: Final = ("TCP", "sock_inode_cache")


def kernel_socket_bytes() -> int:
    """Bytes of the SLABS' active objects (/proc/slabinfo, root only; 0 when unreadable): machine-wide."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in SLABS:
            total += int(fields[1]) * int(fields[3])
    return total


def raise_nofile(needed: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard where allowed) toward ``needed``; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def measure_point(
    peers: list[tuple[str, int]], sweep: str, capacity: int, settings: Settings, repeat: int
) -> Sample:
    """Fill a pool of ``capacity`` over ``peers`` (parked), then time the exchanges."""
    deadline = trio.current_time() + settings.time_limit
    kernel = kernel_socket_bytes()
    heap = 0
    async with trio_recycle.open_socket_pool(capacity=capacity) as pool:
        with trio.move_on_after(settings.time_limit) as scope:
            streams = []
            # RSS says nothing past the first big point (freed memory is
            # reused, not returned): the Python heap, traced while filling.
            tracemalloc.start()
            heap = tracemalloc.get_traced_memory()[0]
            for i in range(capacity):
                streams.append(await pool.open_tcp_stream(*peers[i % len(peers)]))
            for stream in streams:
                await stream.release()
            del streams
            parked = pool.statistics().parked
            heap = tracemalloc.get_traced_memory()[0] - heap
            tracemalloc.stop()
            kernel = kernel_socket_bytes() - kernel
            done, budget = 0, WARMUP * TASKS

            async def worker(first: int) -> None:
                nonlocal done
                index = first
                while done < budget and trio.current_time() < deadline:
                    done += 1
                    stream = await pool.open_tcp_stream(*peers[index % len(peers)])
                    await stream.send_all(REQUEST)
                    got = 0
                    while got < RESPONSE_BYTES:
                        chunk = await stream.receive_some()
                        if not chunk:
                            raise RuntimeError("the server closed")
                        got += len(chunk)
                    await stream.release()
                    index += tasks

            # Never more tasks than sockets: waiting for a socket is not what this measures.
            tasks = min(TASKS, capacity)
            async with trio.open_nursery() as nursery:
                for first in range(tasks):
                    nursery.start_soon(worker, first)
            done, budget = 0, settings.exchanges
            cpu, start = time.process_time(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for first in range(tasks):
                    nursery.start_soon(worker, first)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if scope.cancelled_caught:
        raise RuntimeError(f"{sweep} capacity {capacity}: the pool did not fill within {settings.time_limit} s")
    limited = done < settings.exchanges
    return Sample(sweep, capacity, len(peers), repeat, done, seconds, cpu, parked, heap, kernel, limited)


async def server_drained(server: servers.ChildServer) -> None:
    """Wait (bounded) until the server has read the last point's closes (it shares our descriptor limit)."""
    deadline = trio.current_time() + 30
    # Another process's state, asked over a pipe: polled, there is no event to wait for.
    while int(server.ask("open").split()[1]) and trio.current_time() < deadline:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def run_all(
    settings: Settings, addresses: list[tuple[str, int]], limit: int, server: servers.ChildServer
) -> tuple[list[Sample], list[str]]:
    warnings = []
    points = []
    for sweep, capacity, peers in settings.points:
        if capacity + FD_SLACK > limit:
            warnings.append(f"{sweep} capacity {capacity}: skipped, RLIMIT_NOFILE is {limit}")
        else:
            points.append((sweep, capacity, peers))
    samples = []
    # Unrecorded: the process's first pool and first exchanges are slower than any later point's.
    await measure_point(addresses[:1], "warm-up", 16, attrs.evolve(settings, exchanges=10 * TASKS), -1)
    for repeat, (sweep, capacity, peers) in [(r, p) for r in range(settings.repeats) for p in runs.rotated(points, r)]:
        await server_drained(server)
        sample = await measure_point(addresses[:peers], sweep, capacity, settings, repeat)
        samples.append(sample)
        print(
            f"{sweep:8} capacity {capacity:>5} peers {peers:>5}: {sample.seconds / max(sample.exchanges, 1) * 1e6:7.1f}"
            f" us/exchange, {sample.heap_bytes / max(capacity, 1):8.0f} B heap/socket, parked {sample.parked}",
            flush=True,
        )
    if any(s.time_limited for s in samples):
        warnings.append("some points hit the time limit: fewer exchanges than asked")
    return samples, warnings


def measure(settings: Settings) -> report.Document:
    most_peers = max(p for _, _, p in settings.points)
    biggest = max(c for _, c, _ in settings.points)
    limit = raise_nofile(biggest + FD_SLACK)  # the server inherits it: one listener, the connections
    info = machine(rlimit_nofile=limit)
    started, start = report.now(), time.perf_counter()
    with servers.child_server(
        servers.python_server(SERVER, f"--peers={most_peers}", f"--response-bytes={RESPONSE_BYTES}")
    ) as server:
        line = next(line for line in server.output.decode().splitlines() if line.startswith("peers "))
        addresses = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in line.split()[1:]]
        server.output = b""  # read: what follows answers our commands
        samples, warnings = trio.run(run_all, settings, addresses, limit, server)
    info["loadavg_end"] = load_average()
    seconds = time.perf_counter() - start
    return report.document("scale", settings, info, started, seconds, samples=samples, run_warnings=warnings)


def render(doc: report.Document) -> report.Report:
    samples = [Sample(**s) for s in doc["samples"]]
    out = report.Report("Scale: exchange cost and memory per pooled socket as capacity and peers grow")
    out.warnings = list(doc.get("run_warnings", []))
    out.add(
        f"{doc['settings']['exchanges']} keep-alive exchanges per point from min({TASKS}, capacity) tasks after"
        " the pool is filled (every socket connected, then parked),"
        f" median of {doc['settings']['repeats']} repeats, the points' order rotating. Ratios: to the sweep's"
        " smallest point. Kernel slab bytes are machine-wide: the server's end of every connection is in them."
    )
    cost: dict[tuple[str, int, int], float] = {}
    cpu_cost: dict[tuple[str, int, int], float] = {}
    for sweep in ("capacity", "peers"):
        keys = sorted({(s.capacity, s.peers) for s in samples if s.sweep == sweep})
        if not keys:
            continue
        cells = []
        for capacity, peers in keys:
            group = [s for s in samples if (s.sweep, s.capacity, s.peers) == (sweep, capacity, peers)]
            us = runs.median(s.seconds / s.exchanges * 1e6 for s in group if s.exchanges)
            cpu = runs.median(s.cpu_seconds / s.exchanges * 1e6 for s in group if s.exchanges)
            cost[sweep, capacity, peers], cpu_cost[sweep, capacity, peers] = us, cpu
            base = cost[(sweep, *keys[0])]
            cells.append(
                [
                    str(capacity),
                    str(peers),
                    str(min(s.parked for s in group)),
                    f"{us:.1f}",
                    f"{us / base:.2f}x" if base else "",
                    f"{cpu:.1f}",
                    f"{runs.median(s.heap_bytes / s.capacity for s in group):,.0f}",
                    f"{runs.median(s.kernel_bytes / s.capacity for s in group):,.0f}",
                ]
            )
        headers = ["capacity", "peers", "parked", "us/exchange", "vs smallest", "client CPU us/exchange"]
        headers += ["Python heap B/socket", "kernel slab B/socket (both ends)"]
        out.table(headers, cells, f"Sweep over {sweep}:")
    small = [k for k in cost if k[:2] == ("capacity", 64)]
    large = [k for k in cost if k[:2] == ("capacity", 4096)]
    if small and large:
        ratio = cost[large[0]] / cost[small[0]]
        by_cpu = cpu_cost[large[0]] / cpu_cost[small[0]]
        measured = f"{ratio:.2f}x (by client CPU per exchange {by_cpu:.2f}x)"
        out.verdicts.append(judge(target("scale", "cost@4096/64"), ratio, measured=measured))
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = cli.parser(__doc__, quick="capacities 16, 64, 4096; peers 1, 100; 300 exchanges", repeats="default 3")
    parser.add_argument("--exchanges", type=int, help="measured exchanges per point (default 5000; --quick: 300)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per point (default 60)")
    args = parser.parse_args(argv)
    capacities, peers = (QUICK_CAPACITIES, QUICK_PEERS) if args.quick else (CAPACITIES, PEERS)
    points = [("capacity", c, min(CAPACITY_SWEEP_PEERS, c)) for c in capacities]
    points += [("peers", capacities[-1], p) for p in peers if p <= capacities[-1]]
    exchanges = args.exchanges or (300 if args.quick else 5000)
    return args, Settings(tuple(points), exchanges, cli.repeats(args, 3), args.time_limit)


if __name__ == "__main__":
    arguments, settings = parse_args()
    sys.exit(cli.main("scale", arguments, settings, measure, render))
