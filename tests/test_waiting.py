"""The waiting room on its own: FIFO, the per-peer skip, abort on cancellation, fail_all."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_recycle._waiting import Request, WaitingRoom


def request(peer: object) -> Request:
    return Request(0, 0, 0, None, (0, 0, 0, None, peer), peer)


async def test_waiters_are_granted_first_come_first_served(nursery: trio.Nursery) -> None:
    room: WaitingRoom[str] = WaitingRoom()
    got: list[tuple[int, str]] = []

    async def wait(n: int) -> None:
        got.append((n, await room.wait(request(n))))

    for n in range(3):
        nursery.start_soon(wait, n)
        await trio.testing.wait_all_tasks_blocked()
    assert len(room) == 3
    order = []
    while room:
        found = room.first_servable(None)
        assert found is not None
        order.append(found[1].peer)
        room.grant(found[0], f"for {found[1].peer}")
    await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2]
    assert sorted(got) == [(0, "for 0"), (1, "for 1"), (2, "for 2")]


async def test_a_full_peer_is_skipped_and_keeps_its_place(nursery: trio.Nursery) -> None:
    """first_servable skips waiters whose peer is full, in order among the rest; the skipped one stays first."""
    room: WaitingRoom[str] = WaitingRoom()

    async def wait(peer: str) -> None:
        with pytest.raises(trio.ClosedResourceError):
            await room.wait(request(peer))

    for peer in ("a", "b", "a", "c"):
        nursery.start_soon(wait, peer)
        await trio.testing.wait_all_tasks_blocked()
    found = room.first_servable(lambda peer: peer == "a")
    assert found is not None
    assert found[1].peer == "b"
    assert room.first_servable(lambda peer: True) is None
    first = room.first_servable(None)
    assert first is not None
    assert first[1].peer == "a"
    room.fail_all(lambda: trio.ClosedResourceError("done"))


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
    assert room.first_servable(None) is None


async def test_fail_all_raises_a_fresh_error_in_every_waiter() -> None:
    room: WaitingRoom[str] = WaitingRoom()
    errors: list[BaseException] = []

    async def wait() -> None:
        with pytest.raises(trio.ClosedResourceError) as info:
            await room.wait(request("a"))
        errors.append(info.value)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        room.fail_all(lambda: trio.ClosedResourceError("closed"))
    assert len(errors) == 3
    assert len({id(e) for e in errors}) == 3
    assert not room


async def test_fail_reaches_that_waiter_alone(nursery: trio.Nursery) -> None:
    room: WaitingRoom[str] = WaitingRoom()
    outcomes: list[tuple[str, object]] = []

    async def wait(peer: str) -> None:
        try:
            outcomes.append((peer, await room.wait(request(peer))))
        except OSError as exc:
            outcomes.append((peer, str(exc)))

    nursery.start_soon(wait, "a")
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(wait, "b")
    await trio.testing.wait_all_tasks_blocked()
    first = room.first_servable(None)
    assert first is not None
    room.fail(first[0], OSError("yours"))
    second = room.first_servable(None)
    assert second is not None
    room.grant(second[0], "socket")
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(outcomes) == [("a", "yours"), ("b", "socket")]
