"""httpx against a server, through `trio_recycle.httpx.RecyclingTransport` and stock, with what each left behind.

Every answer is checked (status 200, the exact body its path names, so a
byte of another exchange is a failure), every exception of a request is a
failure counted by type, ``socket()`` calls are counted with an audit hook
on ``socket.__new__`` (per actor, through a context variable, so that
actors running at the same time count apart), and the TIME_WAIT entries
each side kept are read from /proc once the sockets are done closing.
"""

from __future__ import annotations

import contextvars
import sys
from collections import Counter
from typing import TYPE_CHECKING, Final

import attrs
import httpx
import trio

import trio_recycle
from interop import netstat
from interop.content import body, path_for
from trio_recycle.httpx import RecyclingTransport

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The pool's capacity: as many sockets as the most tasks, so ``created``
#: above it means sockets were thrown away and made again (or, in a larger
#: pool, made while others it held sat unused).
CAPACITY: Final = 16
#: Seconds one run may take, beyond its pauses, before it counts as hung.
RUN_LIMIT: Final = 180.0

_sockets: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("interop_sockets", default=None)
_hooked = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.__new__":
        counter = _sockets.get()
        if counter is not None:
            counter[0] += 1


_probed = False


async def _probe_once() -> None:
    """Open and close one pool, so that its once-per-process probes (can_recycle, fresh ISNs) are not counted."""
    global _probed
    if not _probed:
        async with trio_recycle.open_socket_pool(capacity=1):
            pass
        _probed = True


def count_sockets() -> list[int]:
    """A counter of the ``socket()`` calls made from now on in this task and the tasks it starts."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    counter = [0]
    _sockets.set(counter)
    return counter


@attrs.define
class Outcome:
    """One actor's run against one server."""

    server: str
    actor: str
    case: str
    requests: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    errors: list[str] = attrs.field(factory=list)
    sockets: int = 0
    left: netstat.Left | None = None
    #: The pool's statistics at the end (pool actors only), as a dict of ints.
    stats: dict[str, int] | None = None
    #: What did not add up in ``stats``.
    accounting: list[str] = attrs.field(factory=list)
    #: Requests the proxy sent again after the stale race (proxy actors).
    retried: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.errors) < 3:
            self.errors.append(f"{kind}: {detail}"[:300])


def accounting_problems(stats: dict[str, int], sockets: int | None) -> list[str]:
    """What does not add up in a pool's statistics once every stream is closed."""
    problems = []
    owned = stats["idle"] + stats["in_use"] + stats["draining"] + stats.get("parked", 0)
    if stats["in_use"] or stats["tasks_waiting"]:
        problems.append(f"in_use={stats['in_use']} tasks_waiting={stats['tasks_waiting']} after the last stream")
    if owned > stats["capacity"]:
        problems.append(f"owns {owned} > capacity {stats['capacity']}")
    if stats["created"] - stats["discarded"] != owned:
        problems.append(f"created {stats['created']} - discarded {stats['discarded']} != owned {owned}")
    if sockets is not None and sockets != stats["created"]:
        problems.append(f"socket() calls seen {sockets} != created {stats['created']}")
    return problems


def stats_dict(stats: trio_recycle.PoolStatistics) -> dict[str, int]:
    return {field.name: getattr(stats, field.name) for field in attrs.fields(type(stats))}


async def _get(client: httpx.AsyncClient, port: int, path: str, outcome: Outcome) -> None:
    outcome.requests += 1
    try:
        response = await client.get(f"http://127.0.0.1:{port}{path}")
    except httpx.HTTPError as exc:
        outcome.fail(type(exc).__name__, str(exc))
        return
    if response.status_code != 200:
        outcome.fail(f"status {response.status_code}", path)
    elif response.content != body(path):
        outcome.fail("wrong body", f"{path}: {response.content[:40]!r}")


async def _drive(
    client: httpx.AsyncClient,
    port: int,
    outcome: Outcome,
    *,
    tasks: int,
    size: int,
    requests: int,
    pauses: Sequence[float],
) -> None:
    """``requests`` GETs from ``tasks`` tasks; or, with ``pauses``, bursts of one GET per task, paused between."""
    if pauses:
        number = 0
        for pause in (None, *pauses):
            if pause is not None:
                await trio.sleep(pause)
            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(_get, client, port, path_for(number, size), outcome)
                    number += 1
        return
    numbers = iter(range(requests))

    async def worker() -> None:
        for number in numbers:
            await _get(client, port, path_for(number, size), outcome)

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)


async def run_httpx(
    server: str,
    port: int,
    *,
    pooled: bool,
    tasks: int,
    size: int,
    requests: int = 0,
    pauses: Sequence[float] = (),
    case: str,
    capacity: int = CAPACITY,
) -> Outcome:
    """One run of httpx, through a pool of ``capacity`` (``pooled``) or stock, and what it left."""
    actor = "httpx stock"
    if pooled:
        actor = "httpx+pool" if capacity == CAPACITY else f"httpx+pool({capacity})"
    outcome = Outcome(server, actor, case)
    before = netstat.snapshot(port)
    if pooled:
        await _probe_once()
    sockets = count_sockets()
    try:
        with trio.fail_after(RUN_LIMIT + sum(pauses)):
            if pooled:
                async with trio_recycle.open_socket_pool(capacity=capacity) as pool:
                    async with httpx.AsyncClient(transport=RecyclingTransport(pool)) as client:
                        await _drive(client, port, outcome, tasks=tasks, size=size, requests=requests, pauses=pauses)
                    # Streams httpcore closed before the server's FIN wait
                    # for it in the pool's drain: count them once done.
                    with trio.move_on_after(pool_eof_wait()):
                        # The pool has no event for an empty drain: look again.
                        while pool.statistics().draining:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    outcome.stats = stats_dict(pool.statistics())
            else:
                async with httpx.AsyncClient() as client:
                    await _drive(client, port, outcome, tasks=tasks, size=size, requests=requests, pauses=pauses)
    except trio.TooSlowError:
        outcome.fail("hang", f"run not done within {RUN_LIMIT + sum(pauses):g} s")
    outcome.sockets = sockets[0]
    if outcome.stats is not None:
        outcome.accounting = accounting_problems(outcome.stats, outcome.sockets)
    outcome.left = await netstat.settle(port, before)
    return outcome


def pool_eof_wait() -> float:
    """A little more than the pool's default ``eof_timeout``: every drain ends by then."""
    return 6.0
