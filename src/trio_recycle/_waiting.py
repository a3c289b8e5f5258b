"""WaitingRoom: the tasks waiting for a pooled socket, first come first served, with their abort."""

# The shape of trio's ParkingLot beside CapacityLimiter (trio/_core/
# _parking_lot.py, trio/_sync.py): the room only queues, wakes and fails
# tasks; the policy (whether a task must wait, which socket it gets) is the
# pool's, which runs one reconciler, SocketPool._serve_waiters, after every
# change, as httpcore's _assign_requests_to_connections does.
#
# * FIFO: a dict in insertion order, so that an abort (cancellation) is O(1).
# * A waiter is granted a socket (or an error) by the pool; it leaves the
#   queue at that moment, not when its task next runs, so nothing granted is
#   ever granted twice and an abort never finds a task that was served.
# * The per-peer skip: a waiter whose peer is at capacity_per_peer cannot be
#   served, and must not hold up the waiters of other peers behind it. The
#   pool says which peers are full; `first_servable` skips them, keeping the
#   order among the rest.

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar, final

import attrs
import outcome
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Request", "WaitingRoom"]

T = TypeVar("T")


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
class WaitingRoom(Generic[T]):
    """The queue of tasks waiting for capacity; what they are granted is a ``T`` (a PooledSocket)."""

    _queue: dict[trio.lowlevel.Task, Request] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    async def wait(self, request: Request) -> T:
        """Queue the current task until `grant` or `fail` (or its cancellation, which leaves the queue)."""
        task = trio.lowlevel.current_task()
        self._queue[task] = request

        def abort(_: object) -> trio.lowlevel.Abort:
            # Only a task still queued can be here: grant and fail take a
            # task off the queue as they reschedule it.
            del self._queue[task]
            return trio.lowlevel.Abort.SUCCEEDED

        granted: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return granted

    def first_servable(self, full: Callable[[object], bool] | None) -> tuple[trio.lowlevel.Task, Request] | None:
        """The first waiter whose peer is not ``full`` (the first, when ``full`` is None)."""
        if full is None:
            return next(iter(self._queue.items()), None)
        for item in self._queue.items():
            if not full(item[1].peer):
                return item
        return None

    def grant(self, task: trio.lowlevel.Task, value: T) -> None:
        """Wake a queued task with ``value``."""
        del self._queue[task]
        trio.lowlevel.reschedule(task, outcome.Value(value))

    def fail(self, task: trio.lowlevel.Task, error: BaseException) -> None:
        """Wake a queued task with ``error`` raised in it."""
        del self._queue[task]
        trio.lowlevel.reschedule(task, outcome.Error(error))

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Wake every queued task with its own ``make_error()`` (a shared one would collect every traceback)."""
        for task in list(self._queue):
            self.fail(task, make_error())
