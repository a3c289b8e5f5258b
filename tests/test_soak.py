"""Soak: 256 tasks against capacity 32 for 20,000 cycles of random servers and random cancellation.

Marked ``soak``: deselected by default (``-m "not soak"`` in addopts); run it
with ``pytest -m soak -s tests/test_soak.py``. Environment knobs:
``SOAK_CYCLES`` (20000), ``SOAK_SECONDS`` (time budget after which no new
cycle starts, 240), ``SOAK_SEED`` (random).

Every cycle checks I1 (its own server's unique tag, then a prefix of its own
bytes) and I2 (the closed handle is dead); every 64 cycles I3 and I4 through
the test-only accessors; an instrument checks I4's counts after every task
step; a monitor samples the process's socket descriptors (minus the
servers' own) and asserts they never exceed capacity + a constant; the
polite servers must never see a reset and the pool must never disconnect a
socket whose peer sent no FIN (I7). After the pool's block: I5. The reuse
rate and the numbers are printed and written to ``soak.txt`` in the test's
tmp dir.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import time
from typing import TYPE_CHECKING, Final

import pytest
import trio

import trio_recycle

from .checks import assert_capacity, assert_idle_disconnected, counts_add_up, fd_inodes
from .hostile import POLITE_KINDS, HostileServer, dead_address, start_hostile_server
from .strategies import pattern
from .test_interleavings import RESETTING_KINDS, Canceller, _pool_tasks_left, watching_pools

if TYPE_CHECKING:
    from pathlib import Path

    from trio_recycle import RecyclingStream, SocketPool

pytestmark = pytest.mark.soak

TASKS: Final = 256
CAPACITY: Final = 32
CYCLES: Final = int(os.environ.get("SOAK_CYCLES", "20000"))
TIME_BUDGET: Final = float(os.environ.get("SOAK_SECONDS", "240"))
HARD_LIMIT: Final = 300.0
#: A cycle that makes no progress for this long counts as a deadlock.
STALL_LIMIT: Final = 30.0
EOF_TIMEOUT: Final = 0.1

#: Server behaviours and how often a cycle picks each.
WEIGHTS: Final = {
    "echo": 30,
    "answer_close": 30,
    "half_close": 8,
    "never_close": 8,
    "answer_reset": 6,
    "accept_close": 5,
    "dead": 5,
    "flood": 4,
    "close_later": 4,
}

#: Client-side socket descriptors may exceed capacity by this much. The
#: pool's sockets are the only client sockets, but the monitor counts a
#: server connection as the servers' only once its accept() has returned
#: to the handler (trio checkpoints in between): at most one per listener.
FD_SLACK: Final = len(WEIGHTS) + 2


class CountsWatch(trio.abc.Instrument):
    """I4 after every task step: idle + in_use + draining + parked == created - discarded <= capacity."""

    def __init__(self, pool: SocketPool, violations: list[str]) -> None:
        self.pool = pool
        self.violations = violations

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        stats = self.pool.statistics()
        if not counts_add_up(stats) and len(self.violations) < 10:
            self.violations.append(f"I4 after a step of {task.name}: {stats}")


def _socket_fds() -> int:
    return sum(1 for v in fd_inodes().values() if v.startswith("socket:"))


async def read_some_to_eof(stream: RecyclingStream, limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def test_soak(nursery: trio.Nursery, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """256 tasks, capacity 32, 20,000 random cycles: no deadlock, bounded descriptors, I1-I8 throughout."""
    markexpr = str(request.config.getoption("markexpr"))
    if "soak" not in markexpr or "not soak" in markexpr:
        pytest.skip("the soak test runs only when selected: pytest -m soak")
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    violations: list[str] = []
    created_inodes: set[str] = set()
    baseline_fds = _socket_fds()
    servers = {
        kind: await start_hostile_server(nursery, kind, hold=3 * EOF_TIMEOUT) for kind in WEIGHTS if kind != "dead"
    }
    dead, dead_port = dead_address()
    servers["dead"] = HostileServer("dead", "127.0.0.1", dead_port)
    server_fixed_fds = _socket_fds() - baseline_fds  # listeners and the dead address
    kinds = list(WEIGHTS)
    weights = list(WEIGHTS.values())
    numbers = itertools.count(1)
    tags: set[bytes] = set()
    counts = {"cycles": 0, "cancelled": 0, "refused": 0, "broken": 0, "timed_out": 0}
    peak = {"client_fds": 0, "server_fds": 0, "pool_fds": 0}
    canceller = Canceller()
    started = time.monotonic()
    last_progress = [started]

    def violate(message: str) -> None:
        if len(violations) < 10:
            violations.append(message)

    async def one_cycle(pool: SocketPool) -> None:
        kind = rng.choices(kinds, weights)[0]
        server = servers[kind]
        number = next(numbers)
        payload = pattern(number, 0, rng.randint(1, 300))
        mode = rng.random()
        cancel_at = rng.randint(0, 12) if rng.random() < 0.1 else None
        deadline = rng.uniform(0, 0.02) if rng.random() < 0.03 else 5.0
        received = b""
        with trio.move_on_after(deadline) as timeout, canceller.cancel_at(cancel_at) as scope:
            try:
                stream = await pool.open_tcp_stream("127.0.0.1", server.port)
            except OSError as exc:
                if kind != "dead" or exc.errno != errno.ECONNREFUSED:
                    violate(f"open {kind}: {exc!r}")
                counts["refused"] += 1
                return
            if kind == "dead":
                violate("connected where nothing listens")
            try:
                try:
                    await stream.send_all(payload)
                    if kind in ("echo", "close_later") and mode < 0.8:
                        await stream.send_eof()
                    if kind == "never_close":
                        received = await stream.receive_some(65536)
                    elif mode < 0.7:
                        received = await read_some_to_eof(stream, 1 << 17)
                    elif mode < 0.85:
                        received = await stream.receive_some(rng.randint(1, 64))
                except trio.BrokenResourceError as exc:
                    counts["broken"] += 1
                    if kind not in RESETTING_KINDS:
                        violate(f"{kind}: {exc!r} from {exc.__cause__!r}")
                finally:
                    await stream.aclose()
            finally:
                _check_received(kind, server, number, payload, received)
            try:
                await stream.send_all(b"STALE")
            except trio.ClosedResourceError:
                pass
            else:
                violate("I2: a closed stream accepted send_all")
        if scope.cancelled_caught:
            counts["cancelled"] += 1
        if timeout.cancelled_caught:
            counts["timed_out"] += 1

    def _check_received(kind: str, server: HostileServer, number: int, payload: bytes, data: bytes) -> None:
        if kind == "accept_close" or not data:
            if data:
                violate(f"I1: {kind} sent {data[:40]!r}")
            return
        end = data.find(b">")
        if end < 0:
            if not data.startswith(b"<") or not (data[1:].isdigit() or len(data) == 1):
                violate(f"I1: {kind}: {data[:40]!r} is not a tag")
            return
        tag, rest = data[: end + 1], data[end + 1 :]
        if tag in tags:
            violate(f"I1: tag {tag!r} reached two streams")
        tags.add(tag)
        if kind == "flood":
            expected = (tag * (len(rest) // len(tag) + 1))[: len(rest)]
        else:
            expected = payload[: len(rest)]
            if len(rest) > len(payload):
                violate(f"I1: {kind}: {len(rest)} bytes echoed of {len(payload)}")
        if rest != expected:
            violate(f"I1: {kind}: foreign bytes {rest[:60]!r}, expected {expected[:60]!r}")

    async def worker(pool: SocketPool, budget_end: float) -> None:
        while counts["cycles"] < CYCLES and time.monotonic() < budget_end and not violations:
            counts["cycles"] += 1
            await one_cycle(pool)
            last_progress[0] = time.monotonic()
            if counts["cycles"] % 64 == 0:
                try:
                    assert_idle_disconnected(pool)
                    assert_capacity(pool)
                except (AssertionError, pytest.fail.Exception) as exc:
                    violate(f"I3/I4: {pool.statistics()}: {exc}")

    async def monitor(pool: SocketPool) -> None:
        while True:
            server_fds = server_fixed_fds + sum(s.open_conns for s in servers.values())
            client_fds = _socket_fds() - baseline_fds - server_fds
            pool_fds = len(created_inodes & set(fd_inodes().values()))
            peak["client_fds"] = max(peak["client_fds"], client_fds)
            peak["pool_fds"] = max(peak["pool_fds"], pool_fds)
            if pool_fds > CAPACITY:
                violate(f"I4: {pool_fds} descriptors of the pool open, capacity {CAPACITY}: {pool.statistics()}")
            peak["server_fds"] = max(peak["server_fds"], server_fds)
            if client_fds > CAPACITY + FD_SLACK:
                violate(f"{client_fds} client socket descriptors, capacity {CAPACITY}: {pool.statistics()}")
            if time.monotonic() - last_progress[0] > STALL_LIMIT:
                violate(f"deadlock: no cycle finished for {STALL_LIMIT} s: {pool.statistics()}")
                return
            await trio.sleep(0.01)

    with trio.fail_after(HARD_LIMIT), watching_pools(created_inodes, violate):
        async with trio_recycle.open_socket_pool(capacity=CAPACITY, eof_timeout=EOF_TIMEOUT) as pool:
            watch = CountsWatch(pool, violations)
            trio.lowlevel.add_instrument(canceller)
            trio.lowlevel.add_instrument(watch)
            try:
                async with trio.open_nursery() as workers:
                    workers.start_soon(monitor, pool)
                    async with trio.open_nursery() as cyclers:
                        for _ in range(TASKS):
                            cyclers.start_soon(worker, pool, started + TIME_BUDGET)
                    workers.cancel_scope.cancel()
                await trio.sleep(0.05)  # let the servers see the last closes
            finally:
                trio.lowlevel.remove_instrument(watch)
                trio.lowlevel.remove_instrument(canceller)
            stats = pool.statistics()
        elapsed = time.monotonic() - started

    # I7: no polite server saw a reset before its own FIN.
    for server in servers.values():
        for conn in server.conns:
            if conn.reset and server.kind in POLITE_KINDS:
                violate(f"I7: {server.kind} connection {conn.tag!r} was reset before it had closed")
            if conn.errors:
                violate(f"{server.kind} connection {conn.tag!r}: {conn.errors!r}")
    # I5: nothing of the pool open or running after its block.
    leaked = created_inodes & set(fd_inodes().values())
    if leaked:
        violate(f"I5: {len(leaked)} sockets of the pool open after its block")
    if _pool_tasks_left():
        violate(f"I5: tasks of the pool left: {_pool_tasks_left()}")
    final = pool.statistics()
    if (final.idle, final.in_use, final.draining) != (0, 0, 0) or final.created != final.discarded:
        violate(f"I5: {final}")
    dead.close()

    opens = stats.created + stats.reused
    reuse_rate = stats.reused / opens if opens else 0.0
    report = (
        f"soak (seed {seed}): {counts['cycles']} cycles in {elapsed:.1f} s "
        f"({counts['cycles'] / elapsed:.0f}/s) by {TASKS} tasks on capacity {CAPACITY}; "
        f"cancelled {counts['cancelled']}, timed out {counts['timed_out']}, refused {counts['refused']}, "
        f"broken {counts['broken']}; created {stats.created}, reused {stats.reused}, "
        f"recycled {stats.recycled}, discarded {stats.discarded}; reuse rate {reuse_rate:.1%}; "
        f"peak socket fds of the pool {peak['pool_fds']}, of the client side {peak['client_fds']} "
        f"(capacity {CAPACITY}), "
        f"peak server socket fds {peak['server_fds']}"
    )
    print(report)
    (tmp_path / "soak.txt").write_text(report + "\n")
    assert not violations, f"{report}\n" + "\n".join(violations)
    budget_hit = elapsed >= TIME_BUDGET
    assert counts["cycles"] >= CYCLES or budget_hit, report
    assert stats.reused > 0, report
    assert peak["client_fds"] <= CAPACITY + FD_SLACK, report
