"""Pressure on a pool's capacity: who gives sockets back when a task must wait, and who was waiting."""

# A protocol layer that keeps idle connections of its own (httpcore's pool)
# holds pool sockets the pool cannot see are idle. Two such layers on one
# pool starve each other: the first keeps its idle connections until its
# own next request, the second waits for capacity meanwhile. So the pool
# and the layer share two small things, kept here so the pool's side is a
# few lines:
#
# * Reclaimers: a layer registers an object that lists the connections it
#   holds idle (`Candidate`). When a task is about to wait for capacity, the
#   pool calls `relieve`, which closes the best candidate over every
#   reclaimer of that pool (expired ones first, then the least recently
#   used) synchronously: its socket is back before the task queues, and
#   the task tries again. Reclaimers are held weakly: a layer that is
#   garbage-collected drops its connections, and their streams give their
#   sockets back by themselves.
# * A wait cell: a layer that puts a deadline on an open wants to tell
#   "the pool was full all along" from "the connect was slow". It sets a
#   `WaitCell` in a context variable around the open; the pool's wait marks
#   it. trio copies the context into child tasks, so the attempts of happy
#   eyeballs mark the same cell.

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import TYPE_CHECKING, Protocol, final

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

__all__ = ["Candidate", "Reclaimer", "WaitCell", "register", "relieve", "tasks_waiting", "wait_cell", "waiting"]


@final
@attrs.frozen
class Candidate:
    """A connection a reclaimer holds idle, and how to end it at once.

    Args:
      expired: Past its keep-alive expiry: closed before any other.
      last_used: `trio.current_time` of its last read or write.
      close: Ends the connection without awaiting; its socket goes back to
          the pool before it returns.
    """

    expired: bool
    last_used: float
    close: Callable[[], None]


class Reclaimer(Protocol):
    """What a protocol layer registers with a pool: the connections it holds idle."""

    def idle_connections(self) -> Iterable[Candidate]: ...


@final
@attrs.define(eq=False)
class WaitCell:
    """Marked by the pool while an open of this context waits for a socket.

    ``waiting`` counts the waits in progress; a wait that ends with an
    exception (cancelled by the open's deadline) stays counted, so that the
    layer reads, after the deadline, that the open was still waiting.
    """

    waiting: int = 0


@final
@attrs.define(eq=False)
class _PoolPressure:
    reclaimers: weakref.WeakSet[Reclaimer] = attrs.field(factory=weakref.WeakSet)
    waiting: int = 0


# Keyed weakly by pool: the registry never keeps a pool alive.
_pressures: weakref.WeakKeyDictionary[object, _PoolPressure] = weakref.WeakKeyDictionary()

_wait_cell: contextvars.ContextVar[WaitCell | None] = contextvars.ContextVar("trio_recycle_wait_cell", default=None)


def _pressure(pool: object) -> _PoolPressure:
    pressure = _pressures.get(pool)
    if pressure is None:
        pressure = _pressures[pool] = _PoolPressure()
    return pressure


def register(pool: object, reclaimer: Reclaimer) -> None:
    """Let ``pool`` take back the idle connections of ``reclaimer`` when a task must wait."""
    _pressure(pool).reclaimers.add(reclaimer)


def relieve(pool: object) -> bool:
    """Close the one idle connection of ``pool``'s reclaimers that should go first.

    Called by the pool when a task is about to wait for capacity, and by a
    layer when one of its connections goes idle while tasks wait.

    Returns:
      bool: whether a connection was closed (its socket is back: try again).
    """
    pressure = _pressures.get(pool)
    if pressure is None:
        return False
    best: Candidate | None = None
    for reclaimer in list(pressure.reclaimers):
        for candidate in reclaimer.idle_connections():
            if best is None or (not candidate.expired, candidate.last_used) < (not best.expired, best.last_used):
                best = candidate
    if best is None:
        return False
    best.close()
    return True


def tasks_waiting(pool: object) -> int:
    """How many tasks wait in ``pool`` for capacity now (cheaper than its statistics)."""
    pressure = _pressures.get(pool)
    return 0 if pressure is None else pressure.waiting


@contextlib.contextmanager
def waiting(pool: object) -> Iterator[None]:
    """Around the pool's wait for capacity: counts it, and marks the open's `WaitCell`."""
    pressure = _pressure(pool)
    cell = _wait_cell.get()
    pressure.waiting += 1
    if cell is not None:
        cell.waiting += 1
    try:
        yield
    finally:
        pressure.waiting -= 1
    # Reached only when the wait was granted: a cancelled wait stays marked.
    if cell is not None:
        cell.waiting -= 1


@contextlib.contextmanager
def wait_cell() -> Iterator[WaitCell]:
    """A fresh `WaitCell` for the opens made inside the block (and their child tasks)."""
    cell = WaitCell()
    token = _wait_cell.set(cell)
    try:
        yield cell
    finally:
        _wait_cell.reset(token)
