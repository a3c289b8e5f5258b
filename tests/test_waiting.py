"""The waiting room on its own: FIFO, the per-peer skip, abort on cancellation, fail_all, and its cost."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings

from trio_recycle import _waiting
from trio_recycle._waiting import Request, WaitingRoom

from .strategies import waiting_programs

if TYPE_CHECKING:
    from collections.abc import Callable


def request(peer: object, label: str = "") -> Request:
    """A request for ``peer``; ``label`` (carried as its origin) names the waiter in the tests."""
    return Request(0, 0, 0, None, (0, 0, 0, None, peer), peer, label or str(peer))


@attrs.define(eq=False)
class Waiters:
    """Real tasks waiting in one room, each under a cancel scope of its own, named by label."""

    room: WaitingRoom[str]
    nursery: trio.Nursery
    scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    #: What each task ended with: its grant, its error's text, or "cancelled".
    got: dict[str, str] = attrs.field(factory=dict)

    async def add(self, peer: object, label: str = "") -> None:
        """A task for ``peer`` joins, behind every task already waiting."""
        label = label or str(peer)
        self.nursery.start_soon(self._wait, peer, label)
        await trio.testing.wait_all_tasks_blocked()

    def add_soon(self, peer: object, label: str) -> None:
        """A task for ``peer`` joins, in no particular order among those started with it."""
        self.nursery.start_soon(self._wait, peer, label)

    async def _wait(self, peer: object, label: str) -> None:
        with trio.CancelScope() as scope:
            self.scopes[label] = scope
            try:
                self.got[label] = await self.room.wait(request(peer, label))
            except OSError as exc:
                self.got[label] = str(exc)
            except trio.ClosedResourceError as exc:
                self.got[label] = f"closed: {exc}"
        if scope.cancelled_caught:
            self.got[label] = "cancelled"

    async def cancel(self, label: str) -> None:
        self.scopes[label].cancel()
        await trio.testing.wait_all_tasks_blocked()

    def first(self) -> str | None:
        """The label of the first servable waiter."""
        found = self.room.first_servable()
        return None if found is None else str(found[1].origin)

    def besides(self, peer: object) -> str | None:
        """The label of the first waiter servable with one socket fewer toward ``peer``."""
        found = self.room.first_servable_besides(peer)
        return None if found is None else str(found[1].origin)

    async def grant_first(self) -> str:
        found = self.room.first_servable()
        assert found is not None
        self.room.grant(found[0], f"for {found[1].origin}")
        await trio.testing.wait_all_tasks_blocked()
        return str(found[1].origin)


def limited(limit: int, counts: dict[object, int] | None = None) -> tuple[WaitingRoom[str], dict[object, int]]:
    """A room with a per-peer limit over ``counts``, which the test changes, calling recount as the ledger does."""
    counts = {} if counts is None else counts
    return WaitingRoom(limit, counts), counts


def set_count(room: WaitingRoom[str], counts: dict[object, int], peer: object, count: int) -> None:
    """What the ledger does when a socket toward ``peer`` changes state."""
    if count:
        counts[peer] = count
    else:
        counts.pop(peer, None)
    room.recount(peer)


@pytest.mark.parametrize("limit", [None, 2])
async def test_waiters_are_granted_first_come_first_served(nursery: trio.Nursery, limit: int | None) -> None:
    room: WaitingRoom[str] = WaitingRoom(limit)
    waiters = Waiters(room, nursery)
    for n in (0, 1, 0, 2):
        await waiters.add(n, f"{n}@{len(room)}")
    assert len(room) == 4
    assert [await waiters.grant_first() for _ in range(4)] == ["0@0", "1@1", "0@2", "2@3"]
    assert waiters.got == {label: f"for {label}" for label in ("0@0", "1@1", "0@2", "2@3")}
    assert not room
    assert room.first_servable() is None


async def test_a_full_peer_is_skipped_and_keeps_its_place(nursery: trio.Nursery) -> None:
    """first_servable skips waiters whose peer is full, in order among the rest; the skipped one stays first."""
    room, counts = limited(1, {"a": 1})
    waiters = Waiters(room, nursery)
    for peer, label in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1"), ("b", "b2")):
        await waiters.add(peer, label)
    assert [await waiters.grant_first() for _ in range(3)] == ["b1", "c1", "b2"]
    assert waiters.first() is None
    assert len(room) == 2
    set_count(room, counts, "a", 0)
    assert [await waiters.grant_first() for _ in range(2)] == ["a1", "a2"]


async def test_fullness_that_changes_moves_the_first_servable(nursery: trio.Nursery) -> None:
    """A peer that becomes full is skipped from then on; one that is no longer full is back in its place."""
    room, counts = limited(2)
    waiters = Waiters(room, nursery)
    for peer, label in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")):
        await waiters.add(peer, label)
    assert waiters.first() == "a1"
    set_count(room, counts, "a", 1)  # below the limit: nothing changes
    assert waiters.first() == "a1"
    set_count(room, counts, "a", 2)
    assert waiters.first() == "b1"
    set_count(room, counts, "b", 3)  # past the limit (a take-over's moment)
    assert waiters.first() == "c1"
    set_count(room, counts, "c", 2)
    assert waiters.first() is None
    set_count(room, counts, "b", 2)  # still full
    assert waiters.first() is None
    set_count(room, counts, "a", 1)
    assert waiters.first() == "a1"
    assert await waiters.grant_first() == "a1"
    set_count(room, counts, "a", 2)
    set_count(room, counts, "b", 1)
    assert waiters.first() == "b1"
    set_count(room, counts, "a", 0)
    assert waiters.first() == "b1"  # a's head is a2 now, which came after b1
    set_count(room, counts, "b", 2)
    assert waiters.first() == "a2"
    set_count(room, counts, "b", 0)
    assert [await waiters.grant_first() for _ in range(2)] == ["b1", "a2"]
    assert waiters.first() is None  # c is still full
    set_count(room, counts, "c", 0)
    assert await waiters.grant_first() == "c1"
    assert not room


async def test_a_peer_that_arrives_full_is_skipped(nursery: trio.Nursery) -> None:
    """The fullness of a peer's first waiter comes from the counts at its arrival, with no recount."""
    room, counts = limited(1, {"a": 1})
    waiters = Waiters(room, nursery)
    await waiters.add("a", "a1")
    assert waiters.first() is None
    await waiters.add("b", "b1")
    assert waiters.first() == "b1"
    set_count(room, counts, "a", 0)
    assert waiters.first() == "a1"


async def test_besides_counts_the_head_of_a_peer_full_by_exactly_one(nursery: trio.Nursery) -> None:
    """first_servable_besides(peer): that peer's first waiter competes when one socket fewer makes room."""
    room, counts = limited(2, {"a": 2, "b": 2})
    waiters = Waiters(room, nursery)
    for peer, label in (("c", "c0"), ("b", "b1"), ("a", "a1"), ("c", "c1"), ("a", "a2")):
        await waiters.add(peer, label)
    set_count(room, counts, "c", 2)
    assert waiters.first() is None
    assert waiters.besides("a") == "a1"
    assert waiters.besides("b") == "b1"
    assert waiters.besides("c") == "c0"
    assert waiters.besides("d") is None  # a peer nobody waits for
    set_count(room, counts, "a", 3)  # full by two: one socket fewer is still full
    assert waiters.besides("a") is None
    set_count(room, counts, "a", 2)
    set_count(room, counts, "c", 1)
    assert waiters.first() == "c0"
    assert waiters.besides("a") == "c0"  # the earlier of the two
    assert waiters.besides("b") == "c0"
    await waiters.cancel("c0")
    assert waiters.first() == "c1"
    assert waiters.besides("a") == "a1"
    assert waiters.besides("b") == "b1"
    assert waiters.first() == "c1"  # asking besides changed nothing
    room.fail_all(lambda: trio.ClosedResourceError("done"))


async def test_besides_without_a_limit_is_the_first_waiter(nursery: trio.Nursery) -> None:
    room: WaitingRoom[str] = WaitingRoom()
    waiters = Waiters(room, nursery)
    await waiters.add("a")
    await waiters.add("b")
    assert (waiters.first(), waiters.besides("b"), waiters.besides("x")) == ("a", "a", "a")
    assert not room.full("a")


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    room: WaitingRoom[str] = WaitingRoom()
    with trio.move_on_after(1) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(room.wait, request("a"))
            await trio.testing.wait_all_tasks_blocked()
            assert len(room) == 1
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert len(room) == 0
    assert room.first_servable() is None


async def test_a_waiter_cancelled_mid_queue_leaves_the_order_of_the_rest(nursery: trio.Nursery) -> None:
    """Cancelled at a line's head, in its middle, while its peer is full, or as its last: the rest keep their order."""
    room, counts = limited(1)
    waiters = Waiters(room, nursery)
    for peer, label in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3"), ("b", "b2"), ("c", "c1")):
        await waiters.add(peer, label)
    await waiters.cancel("a2")  # mid-line
    await waiters.cancel("a1")  # the head: a3 is the head now
    assert waiters.first() == "b1"
    assert waiters.got == {"a1": "cancelled", "a2": "cancelled"}
    set_count(room, counts, "b", 1)
    assert waiters.first() == "a3"
    await waiters.cancel("b1")  # the head of a full peer's line
    set_count(room, counts, "a", 1)
    assert waiters.first() == "c1"
    await waiters.cancel("c1")  # a line's last waiter
    assert waiters.first() is None
    set_count(room, counts, "b", 0)
    assert waiters.first() == "b2"
    set_count(room, counts, "a", 0)
    assert [await waiters.grant_first() for _ in range(2)] == ["a3", "b2"]
    assert not room


@pytest.mark.parametrize("limit", [None, 1])
async def test_fail_all_raises_a_fresh_error_in_every_waiter(nursery: trio.Nursery, limit: int | None) -> None:
    room: WaitingRoom[str] = WaitingRoom(limit, {"b": 1})
    waiters = Waiters(room, nursery)
    for label, peer in (("1", "a"), ("2", "b"), ("3", "a")):
        waiters.add_soon(peer, label)
    await trio.testing.wait_all_tasks_blocked()
    errors: list[BaseException] = []

    def make_error() -> BaseException:
        errors.append(trio.ClosedResourceError("closed"))
        return errors[-1]

    room.fail_all(make_error)
    await trio.testing.wait_all_tasks_blocked()
    assert waiters.got == dict.fromkeys(("1", "2", "3"), "closed: closed")
    assert len({id(e) for e in errors}) == 3
    assert not room
    assert room.first_servable() is None


@pytest.mark.parametrize("limit", [None, 1])
async def test_fail_reaches_that_waiter_alone(nursery: trio.Nursery, limit: int | None) -> None:
    room: WaitingRoom[str] = WaitingRoom(limit)
    waiters = Waiters(room, nursery)
    await waiters.add("a")
    await waiters.add("b")
    first = room.first_servable()
    assert first is not None
    room.fail(first[0], OSError("yours"))
    await trio.testing.wait_all_tasks_blocked()
    assert await waiters.grant_first() == "b"
    assert waiters.got == {"a": "yours", "b": "for b"}


# ----------------------------------------------------------------------
# Cost: counted, never timed.


class CountedCounts(dict[object, int]):
    """The ledger's per-peer counts, counting the room's reads of them (its fullness checks)."""

    reads = 0

    def get(self, key: object, default: int = 0, /) -> int:  # type: ignore[override]
        self.reads += 1
        return super().get(key, default)


def count_heap_operations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every heappush and heappop of the room's heap, from now on."""
    done: list[str] = []

    def counted(name: str, function: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            done.append(name)
            return function(*args)

        return call

    monkeypatch.setattr(_waiting, "heappush", counted("push", heapq.heappush))
    monkeypatch.setattr(_waiting, "heappop", counted("pop", heapq.heappop))
    return done


@pytest.mark.parametrize("full_peers", ["one", "many"])
async def test_first_servable_does_the_same_work_whatever_the_waiters_skipped(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, full_peers: str
) -> None:
    """With 10 or 1,000 waiters of full peers ahead, asking, flapping a peer and serving count the same operations.

    Each entry of the heap is popped at most once, so skipping the full
    peers' lines costs once in all, not once per call.
    """
    heap = count_heap_operations(monkeypatch)
    work: dict[int, tuple[list[str | None], tuple[str, ...], int]] = {}
    for skipped in (10, 1000):
        counts = CountedCounts()
        room: WaitingRoom[str] = WaitingRoom(1, counts)
        waiters = Waiters(room, nursery)
        peers = ["full"] if full_peers == "one" else [f"full{n}" for n in range(skipped)]
        for n in range(skipped):
            waiters.add_soon(peers[n % len(peers)], f"skipped{n}")
        await trio.testing.wait_all_tasks_blocked()
        await waiters.add("free")
        await waiters.add("other")
        for peer in peers:  # become full while waiting: their heap entries go stale
            set_count(room, counts, peer, 1)
        heap.clear()
        assert waiters.first() == "free"
        assert heap.count("pop") <= len(peers)  # each stale entry once
        heap.clear()
        counts.reads = 0
        answers = [waiters.first() for _ in range(100)]
        set_count(room, counts, "free", 1)  # flaps
        answers.append(waiters.first())
        set_count(room, counts, "free", 0)
        answers.append(waiters.first())
        answers.append(await waiters.grant_first())
        # Full by exactly one: the head of its line (a skipped waiter) comes first.
        answers.append(str(waiters.besides(peers[0]))[: len("skipped")])
        work[skipped] = (answers, tuple(heap), counts.reads)
        room.fail_all(lambda: trio.ClosedResourceError("done"))
        await trio.testing.wait_all_tasks_blocked()
    assert work[10] == work[1000]
    answers, operations, reads = work[10]
    assert answers == ["free"] * 100 + ["other", "free", "free", "skipped"]
    assert len(operations) <= 3
    assert reads <= 3


async def test_the_heap_does_not_grow_with_flaps_or_aborts(nursery: trio.Nursery) -> None:
    """A peer whose fullness flaps adds no entry per flap; waiters that left are rebuilt away."""
    room, counts = limited(1)
    waiters = Waiters(room, nursery)
    await waiters.add("b", "b1")
    await waiters.add("a", "a1")
    for _ in range(200):
        set_count(room, counts, "b", 1)
        assert waiters.first() == "a1"
        set_count(room, counts, "b", 0)
        assert waiters.first() == "b1"
        assert len(room._heads) <= 2
    for n in range(200):  # b1 stays at the top; each z leaves a stale entry under it
        await waiters.add("z", f"z{n}")
        await waiters.cancel(f"z{n}")
        assert len(room._heads) <= 2 * 3 + _waiting._SLACK + 1  # three lines at most: b, a, z
    assert waiters.first() == "b1"
    assert [await waiters.grant_first() for _ in range(2)] == ["b1", "a1"]


# ----------------------------------------------------------------------
# Against the plain definition: a walk of the queue.


# Each example is one short trio run with no I/O (a few ms).
@settings(max_examples=settings().max_examples * 4)
@given(waiting_programs())
def test_the_room_agrees_with_a_walk_of_the_queue(program: tuple[int, list[tuple[str, int, int]]]) -> None:
    """After every step, first_servable and first_servable_besides(each peer) are what walking the queue finds."""
    limit, steps = program
    trio.run(run_waiting_program, limit, steps)


async def run_waiting_program(limit: int, steps: list[tuple[str, int, int]]) -> None:
    room, counts = limited(limit)
    queue: list[tuple[str, int]] = []  # (label, peer), first come first

    def walk(besides: int | None = None) -> str | None:
        for label, peer in queue:
            if counts.get(peer, 0) - (peer == besides) < limit:
                return label
        return None

    async with trio.open_nursery() as nursery:
        waiters = Waiters(room, nursery)
        for n, (op, arg, delta) in enumerate(steps):
            if op == "join":
                await waiters.add(arg, f"w{n}")
                queue.append((f"w{n}", arg))
            elif op == "cancel" and queue:
                label, _ = queue.pop(arg % len(queue))
                await waiters.cancel(label)
            elif op == "count":
                set_count(room, counts, arg, max(0, counts.get(arg, 0) + delta))
            elif op == "serve" and walk() is not None:
                label = await waiters.grant_first()
                assert label == walk()
                queue.remove(next(item for item in queue if item[0] == label))
            assert len(room) == len(queue)
            assert waiters.first() == walk(), (n, op)
            for peer in range(4):
                assert waiters.besides(peer) == walk(peer), (n, op, peer)
        room.fail_all(lambda: trio.ClosedResourceError("done"))
