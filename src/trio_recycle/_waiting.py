"""WaitingRoom: the tasks waiting for a pooled socket, first come first served, with their abort."""

# The shape of trio's ParkingLot beside CapacityLimiter (trio/_core/
# _parking_lot.py, trio/_sync.py): the room only queues, wakes and fails
# tasks; the policy (whether a task must wait, which socket it gets) is the
# pool's, which runs one reconciler, Capacity.serve_waiters, after every
# change, as httpcore's _assign_requests_to_connections does.
#
# * FIFO: an OrderedDict, so that an abort (cancellation) is O(1) and so is
#   finding the first waiter. A plain dict is not a queue: its first item
#   is found by skipping the holes that deleted items leave at the front,
#   O(waiters served since it last resized).
# * A waiter is granted a socket (or an error) by the pool; it leaves the
#   queue at that moment, not when its task next runs, so nothing granted is
#   ever granted twice and an abort never finds a task that was served.
# * The per-peer skip (capacity_per_peer): a waiter whose peer is at its
#   limit cannot be served, and must not hold up the waiters of other peers
#   behind it. Each peer with waiters has its own line; the room finds the
#   earliest waiter among the heads of the lines whose peer is not full
#   with a heap of (sequence number, line): the waiters skipped are never
#   walked, and O(log n) finds the first, n the peers waiting. Without a
#   limit there are no lines: the first waiter is the queue's.
# * Fullness is the ledger's count of sockets toward a peer against the
#   limit. The ledger, the only writer of those counts, calls `recount`
#   after every change, so a line's `full` is always exact.
# * The heap is lazy: an entry whose line has another head by now, or is
#   full, or is gone, is dropped when it comes to the top. `listed` keeps a
#   peer whose fullness flaps from adding an entry per flap; entries of
#   waiters that left are rebuilt away once they are most of the heap
#   (amortized O(1) per waiter).

from __future__ import annotations

from collections import OrderedDict
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, Final, Generic, TypeVar, final

import attrs
import outcome
import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Request", "WaitingRoom"]

T = TypeVar("T")
#: Stale heap entries tolerated beyond one per line before a rebuild.
_SLACK: Final = 16


@final
@attrs.define(eq=False)
class Request:
    """What a waiting task asks for: a socket of ``key`` for a connection to ``peer`` (never changed once made).

    Not frozen: a frozen attrs class sets each field through
    object.__setattr__, and every open that finds no idle socket makes one.
    """

    family: int
    type: int
    proto: int
    local_address: str | None
    #: The PoolKey an idle socket must have to serve it.
    key: tuple[int, int, int, object, object]
    peer: object
    #: The (host, port, local_address) of the open, when it may take a released live connection.
    origin: object = None


@final
@attrs.define(eq=False)
class _Line:
    """The waiters of one peer, first come first served, each with its sequence number."""

    full: bool
    waiters: OrderedDict[trio.lowlevel.Task, int] = attrs.field(factory=OrderedDict)
    #: The sequence number of this line's newest heap entry (-1: none).
    listed: int = -1


@final
@attrs.define(eq=False)
class WaitingRoom(Generic[T]):
    """The queue of tasks waiting for capacity; what they are granted is a ``T`` (a PooledSocket).

    ``limit`` is capacity_per_peer (None: no per-peer limit) and ``counts``
    the sockets counted toward each peer, the ledger's own mapping, which
    must call `recount` after every change.
    """

    limit: int | None = None
    _counts: Mapping[object, int] = attrs.field(factory=dict, repr=False)
    #: The waiting tasks, first come first. The coordinator reads it only to
    #: test for emptiness on its hot paths (bool() of the room is a Python call).
    queue: OrderedDict[trio.lowlevel.Task, Request] = attrs.field(factory=OrderedDict)
    #: With a limit: the line of each peer that has waiters.
    _lines: dict[object, _Line] = attrs.field(factory=dict, repr=False)
    #: (head's sequence number, line): a heap, holding every line that is
    #: not full under its head (and stale entries).
    _heads: list[tuple[int, _Line]] = attrs.field(factory=list, repr=False)
    _next: int = 0

    def __len__(self) -> int:
        return len(self.queue)

    def __bool__(self) -> bool:
        return bool(self.queue)

    def full(self, peer: object) -> bool:
        """Whether ``peer`` has ``limit`` sockets."""
        limit = self.limit
        return limit is not None and self._counts.get(peer, 0) >= limit

    def recount(self, peer: object) -> None:
        """The count of ``peer`` changed: it may have become full, or no longer be."""
        line = self._lines.get(peer)
        if line is not None and line.full != (full := self.full(peer)):
            line.full = full
            if not full:
                self._list(line)

    async def wait(self, request: Request) -> T:
        """Queue the current task until `grant` or `fail` (or its cancellation, which leaves the queue)."""
        task = trio.lowlevel.current_task()
        self.queue[task] = request
        if self.limit is not None:
            line = self._lines.get(request.peer)
            if line is None:
                line = self._lines[request.peer] = _Line(self.full(request.peer))
            line.waiters[task] = self._next
            self._next += 1
            if not line.full:
                self._list(line)

        def abort(_: object) -> trio.lowlevel.Abort:
            # Only a task still queued can be here: grant and fail take a
            # task off the queue as they reschedule it.
            self._leave(task)
            return trio.lowlevel.Abort.SUCCEEDED

        granted: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return granted

    def first_servable(self) -> tuple[trio.lowlevel.Task, Request] | None:
        """The first waiter whose peer is not full (the first, without a limit)."""
        if self.limit is None:
            return next(iter(self.queue.items()), None)
        found = self._first()
        return None if found is None else (found[1], self.queue[found[1]])

    def first_servable_besides(self, peer: object) -> tuple[trio.lowlevel.Task, Request] | None:
        """The first waiter that would be servable if one socket fewer counted toward ``peer``."""
        if self.limit is None:
            return next(iter(self.queue.items()), None)
        found = self._first()
        line = self._lines.get(peer)
        if line is not None and line.full and self._counts.get(peer, 0) - 1 < self.limit:
            # Full by exactly one: its head is servable too, and may be earlier.
            task, seq = next(iter(line.waiters.items()))
            if found is None or seq < found[0]:
                found = (seq, task)
        return None if found is None else (found[1], self.queue[found[1]])

    def grant(self, task: trio.lowlevel.Task, value: T) -> None:
        """Wake a queued task with ``value``."""
        self._leave(task)
        trio.lowlevel.reschedule(task, outcome.Value(value))

    def fail(self, task: trio.lowlevel.Task, error: BaseException) -> None:
        """Wake a queued task with ``error`` raised in it."""
        self._leave(task)
        trio.lowlevel.reschedule(task, outcome.Error(error))

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Wake every queued task with its own ``make_error()`` (a shared one would collect every traceback)."""
        for task in list(self.queue):
            self.fail(task, make_error())

    def _leave(self, task: trio.lowlevel.Task) -> None:
        peer = self.queue.pop(task).peer
        if self.limit is None:
            return
        line = self._lines[peer]
        waiters = line.waiters
        was_head = next(iter(waiters)) is task
        del waiters[task]
        if not waiters:
            del self._lines[peer]
        elif was_head and not line.full:
            self._list(line)

    def _first(self) -> tuple[int, trio.lowlevel.Task] | None:
        """The earliest head of a line that is not full: (its sequence number, its task)."""
        heads = self._heads
        while heads:
            seq, line = heads[0]
            if not line.full and line.waiters:
                task, head = next(iter(line.waiters.items()))
                if head == seq:
                    return seq, task
            heappop(heads)
            if line.listed == seq:
                line.listed = -1
        return None

    def _list(self, line: _Line) -> None:
        """Make sure the heap holds ``line`` (not full, with waiters) under its head."""
        seq = next(iter(line.waiters.values()))
        if line.listed == seq:
            return
        line.listed = seq
        heads = self._heads
        heappush(heads, (seq, line))
        if len(heads) > 2 * len(self._lines) + _SLACK:
            for other in self._lines.values():
                other.listed = -1 if other.full else next(iter(other.waiters.values()))
            heads[:] = [(other.listed, other) for other in self._lines.values() if not other.full]
            heapify(heads)
