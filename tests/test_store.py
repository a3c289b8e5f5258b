"""The store and its watch on real loopback connections, with no pool: parked means watched, every one checked."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio
import trio.testing

from trio_recycle._in_flight import quiet
from trio_recycle._pooled_socket import PooledSocket
from trio_recycle._store import SocketStore
from trio_recycle._watch import URGENT

from . import checks

if TYPE_CHECKING:
    from collections.abc import Iterator

KEY = ("127.0.0.1", 80, None)


@contextmanager
def connections(count: int) -> Iterator[list[tuple[PooledSocket, socket.socket]]]:
    """``count`` established loopback TCP connections: (our end as a PooledSocket, the peer's end)."""
    pairs: list[tuple[PooledSocket, socket.socket]] = []
    with checks.listener(backlog=count) as listener:
        try:
            for _ in range(count):
                ours = socket.create_connection(listener.getsockname())
                ours.setblocking(False)
                theirs, _ = listener.accept()
                psock = PooledSocket(ours, (ours.family, ours.type, 0, None, None), ())
                psock.open_key = KEY
                pairs.append((psock, theirs))
            yield pairs
        finally:
            for psock, theirs in pairs:
                psock.close()
                theirs.close()


async def test_parking_watches_and_every_way_out_unwatches(nursery: trio.Nursery) -> None:
    store = SocketStore(nursery, 60.0, lambda: None)
    with connections(3) as pairs:
        (a, _), (b, _), (c, _) = pairs
        for psock in (a, b, c):
            store.park(psock, KEY)
            assert store.watching(psock)
        taken = store.take_parked(KEY)
        assert taken is not None
        assert taken[0] is c
        assert not store.watching(c)
        assert store.remove(a)
        assert not store.watching(a)
        store.put_idle(c)
        assert not store.watching(c)
        assert store.sockets(parked=True) == [b]
        assert set(store.clear()) == {b, c}
        assert not store.watching(b)


async def test_the_check_finds_every_ready_connection_past_1023(nursery: trio.Nursery) -> None:
    """More than one epoll_wait's worth (1023) ready at once: ready() returns them all, the last parked included."""
    count = 1100
    store = SocketStore(nursery, 60.0, lambda: None)
    with connections(count) as pairs:
        for psock, _ in pairs:
            store.park(psock, KEY)
        # In park order, so the last parked is the last in the kernel's ready list.
        for _, theirs in pairs:
            theirs.send(b"x")
        found = store.ready()
        assert {psock for psock, _ in found} == {psock for psock, _ in pairs}
        assert store.parked_count == 0
        assert store.take_parked(KEY) is None


async def test_an_urgent_byte_is_reported_as_urgent(nursery: trio.Nursery) -> None:
    """A lone MSG_OOB byte: invisible to recv(MSG_PEEK), reported by the watch with EPOLLPRI."""
    store = SocketStore(nursery, 60.0, lambda: None)
    with connections(1) as [(psock, theirs)]:
        store.park(psock, KEY)
        assert quiet(psock.sock)
        theirs.send(b"!", socket.MSG_OOB)  # loopback: queued on our end when send() returns
        [(found, events)] = store.ready()
        assert found is psock
        assert events & URGENT
        assert not quiet(psock.sock)


async def test_the_watcher_wakes_for_an_event_and_for_expiry(nursery: trio.Nursery, autojump_clock: object) -> None:
    """The watcher task calls on_wake when a parked connection is ready, and when the oldest one expires."""
    seen: list[tuple[float, list[PooledSocket], list[PooledSocket]]] = []

    def on_wake() -> None:
        ready = [psock for psock, _ in store.ready()]
        seen.append((trio.current_time(), ready, store.expired()))

    store = SocketStore(nursery, 5.0, on_wake)
    with connections(2) as [(a, theirs), (b, _)]:
        start = trio.current_time()
        store.park(a, KEY)
        store.park(b, KEY)
        theirs.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [(start, [a], [])]
        await trio.sleep(6)
        assert seen[-1] == (start + 5.0, [], [b])
        assert store.parked_count == 0
        store.clear()
