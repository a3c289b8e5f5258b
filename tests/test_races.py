"""Races at the pool's edges: its exit during opens, grants to cancelled waiters, full pools.

Each test here reproduces a bug found in review with public trio APIs only
(instruments that act the moment a given task is rescheduled or exits),
and failed before its fix.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

import trio_recycle

from . import checks
from .checks import assert_capacity
from .conftest import ResolveNames, StartServer, answer_then_close, read_until_eof

if TYPE_CHECKING:
    from collections.abc import Callable


class OnScheduled(trio.abc.Instrument):
    """Run a callback synchronously when a given task is rescheduled."""

    def __init__(self) -> None:
        self.hooks: dict[trio.lowlevel.Task, Callable[[], object]] = {}

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        hook = self.hooks.pop(task, None)
        if hook is not None:
            hook()


class OnAttemptExit(trio.abc.Instrument):
    """Cancel a scope when the first happy-eyeballs attempt task exits (the winner)."""

    def __init__(self) -> None:
        self.body: trio.CancelScope | None = None

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if self.body is not None and task.name.endswith("attempt"):
            self.body.cancel()
            self.body = None


TWO: list[tuple[str, int]] = [("127.0.0.1", socket.AF_INET), ("127.0.0.2", socket.AF_INET)]


async def test_pool_exit_while_a_happy_eyeballs_attempt_waits(
    start_server: StartServer, resolve_names: ResolveNames
) -> None:
    """An open over several addresses that waits for capacity gets ClosedResourceError, not a group."""
    server = await start_server(answer_then_close)
    resolve_names({"two.test": TWO})
    errors: list[BaseException] = []

    async def opener(pool: trio_recycle.SocketPool) -> None:
        try:
            await pool.open_tcp_stream("two.test", server.port)
        except BaseException as exc:
            errors.append(exc)

    async with trio.open_nursery() as outer, trio_recycle.open_socket_pool(capacity=1) as pool:
        held = await pool.open_tcp_stream("127.0.0.1", server.port)
        outer.start_soon(opener, pool)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().tasks_waiting == 1
    with pytest.raises(trio.ClosedResourceError):
        held.getpeername()  # closed by the exit, never dropped before it
    assert len(errors) == 1
    assert isinstance(errors[0], trio.ClosedResourceError), repr(errors[0])


async def test_pool_exit_after_the_connect_completed(start_server: StartServer) -> None:
    """The pool exits after a connect completed but before its task ran: ClosedResourceError, not EBADF."""
    server = await start_server(answer_then_close)
    instrument = OnScheduled()
    trio.lowlevel.add_instrument(instrument)
    outcomes: list[BaseException | trio_recycle.RecyclingStream] = []
    try:
        for _ in range(20):

            async def opener(pool: trio_recycle.SocketPool, body: trio.CancelScope) -> None:
                # The opener's wake-up (writable) cancels the pool's body, so
                # the pool's exit and the opener run in the same batch.
                instrument.hooks[trio.lowlevel.current_task()] = body.cancel
                try:
                    outcomes.append(await pool.open_tcp_stream("127.0.0.1", server.port))
                except BaseException as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as outer:
                with trio.CancelScope() as body:
                    async with trio_recycle.open_socket_pool(capacity=1) as pool:
                        outer.start_soon(opener, pool, body)
                        await trio.sleep_forever()
    finally:
        trio.lowlevel.remove_instrument(instrument)
    bad = [o for o in outcomes if not isinstance(o, (trio.ClosedResourceError, trio_recycle.RecyclingStream))]
    assert not bad, bad


async def test_pool_exit_as_happy_eyeballs_picks_its_winner(
    start_server: StartServer, resolve_names: ResolveNames
) -> None:
    """open_tcp_stream never returns a stream the pool's exit has already closed."""
    server = await start_server(answer_then_close)
    resolve_names({"two.test": TWO})
    instrument = OnAttemptExit()
    trio.lowlevel.add_instrument(instrument)
    results: list[str] = []
    try:
        for _ in range(30):
            got: list[object] = []

            async def opener(pool: trio_recycle.SocketPool, got: list[object] = got) -> None:
                try:
                    got.append(await pool.open_tcp_stream("two.test", server.port, happy_eyeballs_delay=0))
                except BaseException as exc:
                    got.append(exc)

            async with trio.open_nursery() as outer:
                with trio.CancelScope() as body:
                    instrument.body = body
                    async with trio_recycle.open_socket_pool(capacity=4) as pool:
                        outer.start_soon(opener, pool)
                        await trio.sleep_forever()
            (result,) = got
            if isinstance(result, trio_recycle.RecyclingStream):
                try:
                    result.getpeername()
                except trio.ClosedResourceError:
                    results.append("a closed stream")
                else:
                    results.append("a live stream")
            else:
                results.append(type(result).__name__)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert "a closed stream" not in results, results
    assert set(results) <= {"a live stream", "ClosedResourceError"}, results


async def test_cancelled_waiter_handed_a_socket_does_not_connect(start_server: StartServer) -> None:
    """A waiter cancelled right after it was handed a socket sends no SYN."""
    server = await start_server(answer_then_close)
    instrument = OnScheduled()
    trio.lowlevel.add_instrument(instrument)
    try:
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            held = await pool.open_tcp_stream("127.0.0.1", server.port)
            await held.send_all(b"a")
            assert await read_until_eof(held) == b"ok:a"
            scope = trio.CancelScope()
            outcome: list[object] = []

            async def waiter() -> None:
                instrument.hooks[trio.lowlevel.current_task()] = scope.cancel
                with scope:
                    outcome.append(await pool.open_tcp_stream("127.0.0.1", server.port))
                outcome.append("cancelled")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().tasks_waiting == 1
                await held.aclose()  # recycles and hands the socket to the waiter, cancelled at once
            assert outcome == ["cancelled"]
            await trio.testing.wait_all_tasks_blocked()
            assert_capacity(pool)
        assert server.accepted == 1
    finally:
        trio.lowlevel.remove_instrument(instrument)


async def test_recycled_counts_only_sockets_put_back(start_server: StartServer) -> None:
    """A socket disconnected, then closed because the first waiter wants another peer, is not 'recycled'."""
    s1 = await start_server(answer_then_close)
    s2 = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1, peer_affinity=True) as pool:
        held = await pool.open_tcp_stream("127.0.0.1", s1.port)
        await held.send_all(b"a")
        await read_until_eof(held)

        async def other() -> None:
            async with await pool.open_tcp_stream("127.0.0.1", s2.port) as stream:
                await stream.send_all(b"b")
                await read_until_eof(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            await held.aclose()
        stats = pool.statistics()
    assert (stats.recycled, stats.reused, stats.discarded, stats.idle) == (1, 0, 1, 1)


async def test_happy_eyeballs_at_a_full_pool_takes_over_its_own_slot(
    start_server: StartServer, resolve_names: ResolveNames, autojump_clock: trio.testing.MockClock
) -> None:
    """With capacity 1, the next address is tried after the delay, in the hanging attempt's place."""
    server = await start_server(answer_then_close, "127.0.0.1")
    with checks.silent_address("127.0.0.2", server.port):
        resolve_names({"slow.test": [("127.0.0.2", socket.AF_INET), ("127.0.0.1", socket.AF_INET)]})
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            start = trio.current_time()
            with trio.fail_after(5):
                stream = await pool.open_tcp_stream("slow.test", server.port, happy_eyeballs_delay=0.25)
            assert trio.current_time() - start < 1
            async with stream:
                await stream.send_all(b"x")
                assert await read_until_eof(stream) == b"ok:x"
            stats = pool.statistics()
            assert (stats.created, stats.discarded, stats.in_use, stats.idle) == (2, 1, 0, 1)
            assert_capacity(pool)


async def test_full_pool_never_abandons_an_attempt_that_already_connected(
    start_server: StartServer, resolve_names: ResolveNames
) -> None:
    """Capacity 1, delay 0, first address listening, second refusing: every open succeeds, as with trio."""
    server = await start_server(answer_then_close, "127.0.0.1")
    resolve_names({"two.test": TWO})
    failures: list[OSError] = []
    for _ in range(30):
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            try:
                stream = await pool.open_tcp_stream("two.test", server.port, happy_eyeballs_delay=0)
            except OSError as exc:
                failures.append(exc)
            else:
                await stream.aclose()
            assert_capacity(pool)
    assert not failures, failures[:2]


async def test_taking_over_whose_socket_cannot_be_made_leaves_the_sibling(
    start_server: StartServer, resolve_names: ResolveNames
) -> None:
    """If the later attempt's socket cannot even be created, the slow earlier one keeps connecting."""
    await start_server(answer_then_close, "127.0.0.1")
    resolve_names({"slow.test": [("127.0.0.2", socket.AF_INET), ("::1", socket.AF_INET6)]})
    with checks.silent_listener("127.0.0.2") as full:
        port = full.getsockname()[1]

        async def free_the_queue() -> None:
            await trio.sleep(0.5)
            conn, _ = full.accept()  # the SYN resent at about 1 s now connects
            conn.close()

        async with trio.open_nursery() as nursery, trio_recycle.open_socket_pool(capacity=1) as pool:
            nursery.start_soon(free_the_queue)
            with trio.fail_after(5):
                # The ::1 attempt's socket cannot be bound to 127.0.0.1.
                stream = await pool.open_tcp_stream(
                    "slow.test", port, happy_eyeballs_delay=0.25, local_address="127.0.0.1"
                )
            assert stream.getpeername() == ("127.0.0.2", port)
            await stream.aclose()
            assert_capacity(pool)


async def test_refused_everywhere_keeps_the_errno_at_a_full_pool(resolve_names: ResolveNames) -> None:
    """Every address refuses: ConnectionRefusedError, whatever the capacity."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolve_names({"refuse.test": [("127.0.0.2", socket.AF_INET), ("127.0.0.3", socket.AF_INET)]})
    for capacity in (2, 1):
        for _ in range(20):
            async with trio_recycle.open_socket_pool(capacity=capacity) as pool:
                with pytest.raises(ConnectionRefusedError):
                    await pool.open_tcp_stream("refuse.test", port, happy_eyeballs_delay=0)


async def test_udp_open_meets_the_pool_exit() -> None:
    """A UDP open on a reused socket racing the pool's exit: ClosedResourceError or a socket, never EBADF."""
    outcomes: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        port = peer.getsockname()[1]
        for k in range(40):
            async with trio.open_nursery() as outer, trio_recycle.open_socket_pool(capacity=2) as pool:
                first = await pool.open_udp_socket("127.0.0.1", port)
                await first.aclose()  # one idle socket for the next open

                async def opener(pool: trio_recycle.SocketPool = pool) -> None:
                    try:
                        udp = await pool.open_udp_socket("127.0.0.1", port)
                    except trio.ClosedResourceError:
                        outcomes.append("closed")
                    except OSError as exc:
                        outcomes.append(f"OSError: {exc}")
                    else:
                        outcomes.append("ok")
                        await udp.aclose()

                outer.start_soon(opener)
                for _ in range(k % 3):
                    await trio.lowlevel.checkpoint()
    assert set(outcomes) <= {"closed", "ok"}, outcomes
