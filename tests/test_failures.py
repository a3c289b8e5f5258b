"""Failure injection (issue 9, invariant I10): every failure reaches its own task and leaves the pool usable.

Bad input while tasks wait, non-OSError exceptions at socket creation
(injected by replacing ``PooledSocket.create``: the failure is what is
injected, not the kernel), descriptor exhaustion (``RLIMIT_NOFILE`` lowered
in a subprocess), streams dropped without ``aclose()`` and streams touched
from another ``trio.run``, each alone and combined with waiters at capacity,
drains in flight and the pool's exit. After each case: ``statistics()`` adds
up, the descriptors are back to their baseline, and no waiter is stuck.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_recycle
from trio_recycle import _close as _drain
from trio_recycle._close import READ_BUDGET
from trio_recycle._pooled_socket import PooledSocket

from . import checks
from .checks import assert_capacity, assert_idle_disconnected, bytes_queued, fd_inodes
from .conftest import (
    ResolveNames,
    StartServer,
    answer_then_close,
    cycle,
    drained,
    echo_tagged,
    read_until_eof,
    tcp_state,
    time_wait_count,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_recycle import SocketPool


def socket_fds() -> set[str]:
    return {v for v in fd_inodes().values() if v.startswith("socket:")}


def assert_accounts(pool: SocketPool, *, waiting: int = 0) -> None:
    """statistics() adds up, every owned socket is open, and nobody is left waiting."""
    assert_capacity(pool)
    assert pool.statistics().tasks_waiting == waiting


@attrs.define
class Injector:
    """Make the next ``count`` calls of PooledSocket.create raise ``error`` (None: pass through)."""

    error: BaseException | None = None
    count: int = 0
    calls: int = 0

    def fail_next(self, error: BaseException, count: int = 1) -> None:
        self.error = error
        self.count = count


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Injector:
    """Replace PooledSocket.create with a version that raises on demand."""
    injector = Injector()
    create = PooledSocket.__dict__["create"].__get__(None, PooledSocket)

    def failing_create(*args: object, **kwargs: object) -> PooledSocket:
        injector.calls += 1
        if injector.error is not None and injector.count > 0:
            injector.count -= 1
            raise injector.error
        psock: PooledSocket = create(*args, **kwargs)
        return psock

    monkeypatch.setattr(PooledSocket, "create", staticmethod(failing_create))
    return injector


# ----------------------------------------------------------------------
# Bad input: rejected up front, naming the argument


@pytest.mark.parametrize(
    ("local_address", "error"),
    [
        ("localhost", ValueError),
        ("127.0.0.1\x00", ValueError),
        ("", ValueError),
        ("not an address", ValueError),
        (b"127.0.0.1", TypeError),
        (["127.0.0.1"], TypeError),
        (("127.0.0.1", 0), TypeError),
    ],
)
async def test_bad_local_address_is_refused_up_front(
    start_server: StartServer, local_address: object, error: type[Exception]
) -> None:
    """A host name, a NUL byte or a non-str local_address fails before any socket is made, naming the argument."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        for open_ in (pool.open_tcp_stream, pool.open_udp_socket):
            with pytest.raises(error, match="local_address"):
                await open_(server.host, server.port, local_address=local_address)  # type: ignore[arg-type]
        assert pool.statistics().created == 0
        assert await cycle(pool, server) == b"ok:ping"
        assert_accounts(pool)


@pytest.mark.parametrize(
    "option",
    [
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2**31),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, -(2**31) - 1),
        (2**31, socket.TCP_KEEPIDLE, 1),
        (socket.IPPROTO_TCP, 2**40, 1),
    ],
)
async def test_socket_option_beyond_a_c_int_is_refused(option: tuple[int, int, int]) -> None:
    """An int that does not fit setsockopt's C int is a ValueError naming socket_options, not a late TypeError."""
    with pytest.raises(ValueError, match="socket_options"):
        async with trio_recycle.open_socket_pool(socket_options=[option]):
            pass  # pragma: no cover


# ----------------------------------------------------------------------
# A non-OSError while a waiter's socket is made goes to that waiter alone


async def test_error_making_a_waiters_socket_reaches_the_waiter_not_the_closer(
    start_server: StartServer, inject: Injector
) -> None:
    """The aclose() that frees the slot succeeds; the waiter gets the error; the pool still works."""
    server = await start_server(answer_then_close)
    other = await start_server(answer_then_close)
    before = socket_fds()
    async with trio_recycle.open_socket_pool(capacity=1, peer_affinity=True) as pool:
        held = await pool.open_tcp_stream(server.host, server.port)
        await held.send_all(b"x")
        assert await held.receive_some() == b"ok:x"
        assert await held.receive_some() == b""
        failures: list[BaseException] = []

        async def waiter() -> None:
            # Another peer: the freed socket cannot be handed over as it is,
            # so the pool makes a new one for this task, and that fails.
            with pytest.raises(RuntimeError, match="injected") as info:
                await pool.open_tcp_stream(other.host, other.port)
            failures.append(info.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 1
            inject.fail_next(RuntimeError("injected"))
            await held.aclose()  # must not raise the waiter's error
        assert len(failures) == 1
        assert_accounts(pool)
        assert await cycle(pool, other) == b"ok:ping"
        assert_accounts(pool)
    assert socket_fds() <= before


async def test_error_making_a_waiters_socket_after_a_drain_does_not_crash_the_run(
    start_server: StartServer, inject: Injector
) -> None:
    """A drain task that frees the slot hands the error to the waiter: no TrioInternalError, no stuck waiter."""
    server = await start_server(echo_tagged)
    other = await start_server(answer_then_close)
    before = socket_fds()
    async with trio_recycle.open_socket_pool(capacity=1, peer_affinity=True) as pool:
        held = await pool.open_tcp_stream(server.host, server.port)
        await held.send_all(b"x")
        outcomes: list[str] = []

        async def waiter() -> None:
            try:
                stream = await pool.open_tcp_stream(other.host, other.port)
            except ValueError as exc:
                outcomes.append(f"error: {exc}")
            else:  # pragma: no cover - the failure is injected
                await stream.aclose()
                outcomes.append("stream")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            inject.fail_next(ValueError("injected"))
            # Unread data: aclose() sends our FIN and hands the socket to
            # a drain task, which frees the slot when the echo server's FIN
            # arrives.
            await held.aclose()
        assert outcomes == ["error: injected"]
        await drained(pool)
        assert_accounts(pool)
        assert await cycle(pool, other) == b"ok:ping"
    assert socket_fds() <= before


async def test_cancelling_a_waiter_whose_socket_failed_is_harmless(start_server: StartServer, inject: Injector) -> None:
    """A waiter cancelled after its socket failed neither hangs nor trips the abort callback."""
    server = await start_server(echo_tagged)
    async with trio_recycle.open_socket_pool(capacity=1, peer_affinity=False) as pool:
        held = await pool.open_tcp_stream(server.host, server.port)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def waiter() -> None:
                    with pytest.raises(KeyError):
                        await pool.open_tcp_stream(server.host, server.port, local_address="127.0.0.1")

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                inject.fail_next(KeyError("injected"))
                await held.aclose()
                await drained(pool)
                scope.cancel()
        assert_accounts(pool)


# ----------------------------------------------------------------------
# Every failing call is a checkpoint


async def test_failed_opens_are_checkpoints(start_server: StartServer, inject: Injector) -> None:
    """open_tcp_stream/open_udp_socket that fail in bind(), in socket creation or on a closed pool still yield."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        for open_ in (pool.open_tcp_stream, pool.open_udp_socket):
            # bind() of an IPv6 address for an IPv4 peer fails at once.
            with trio.testing.assert_checkpoints(), pytest.raises(OSError, match="local_address"):
                await open_(server.host, server.port, local_address="::1")
            inject.fail_next(OSError(24, "Too many open files (injected)"))
            with trio.testing.assert_checkpoints(), pytest.raises(OSError, match="injected"):
                await open_(server.host, server.port)
            inject.fail_next(ValueError("injected"))
            with trio.testing.assert_checkpoints(), pytest.raises(ValueError, match="injected"):
                await open_(server.host, server.port)
        assert_accounts(pool)
    for open_ in (pool.open_tcp_stream, pool.open_udp_socket):
        with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
            await open_(server.host, server.port)


async def test_a_retry_loop_on_a_failing_open_lets_other_tasks_run(start_server: StartServer) -> None:
    """A task retrying an open that fails at once does not starve the others."""
    server = await start_server(answer_then_close)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio_recycle.open_socket_pool() as pool, trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        for _ in range(50):
            with pytest.raises(OSError, match="local_address"):
                await pool.open_tcp_stream(server.host, server.port, local_address="::1")
        nursery.cancel_scope.cancel()
    assert ticks >= 40


async def test_failed_stream_calls_are_checkpoints(start_server: StartServer) -> None:
    """send_all, receive_some, send_eof and wait_send_all_might_not_block yield even when they fail at once."""
    server = await start_server(echo_tagged)
    async with trio_recycle.open_socket_pool() as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        await stream.send_eof()
        with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"after eof")
        await stream.aclose()
        for call in (
            lambda: stream.send_all(b"x"),
            lambda: stream.receive_some(),
            lambda: stream.send_eof(),
            lambda: stream.wait_send_all_might_not_block(),
        ):
            with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
                await call()


async def test_broken_stream_calls_are_checkpoints(start_server: StartServer) -> None:
    """receive_some and send_all that meet a reset already queued yield before raising."""

    async def reset_at_once(stream: trio.SocketStream, server: object) -> None:
        await stream.receive_some()
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        stream.socket.close()

    server = await start_server(reset_at_once)
    async with trio_recycle.open_socket_pool() as pool:
        for call in ("receive_some", "send_all"):
            stream = await pool.open_tcp_stream(server.host, server.port)
            await stream.send_all(b"x")
            await trio.testing.wait_all_tasks_blocked()
            with trio.testing.assert_checkpoints(), pytest.raises(trio.BrokenResourceError):
                await (stream.receive_some() if call == "receive_some" else stream.send_all(b"y"))
            await stream.aclose()
        assert_accounts(pool)


async def test_failed_udp_calls_are_checkpoints(udp_peer: object) -> None:
    """RecyclingUDPSocket.send/receive yield when the socket is closed or an ICMP error is pending."""
    async with trio_recycle.open_socket_pool() as pool:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now: port unreachable
        udp = await pool.open_udp_socket("127.0.0.1", port)
        await udp.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_checkpoints(), pytest.raises(ConnectionRefusedError):
            await udp.receive()
        await udp.aclose()
        for call in (lambda: udp.send(b"x"), lambda: udp.receive()):
            with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
                await call()


# ----------------------------------------------------------------------
# Out of descriptors: RLIMIT_NOFILE lowered in a subprocess (tests/rlimit_cases.py)

ROOT: Final = Path(__file__).resolve().parent.parent


async def run_rlimit_case(case: str, *ports: int) -> None:
    """Run ``tests.rlimit_cases`` ``case`` in a subprocess against servers of this process."""
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, "-m", "tests.rlimit_cases", case, *map(str, ports)],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert output.strip().endswith("ok"), output


async def test_emfile_evicts_an_idle_socket_and_retries(start_server: StartServer) -> None:
    """socket() failing with EMFILE while sockets sit idle for other peers: evict the LRU one, retry once."""
    servers = [await start_server(answer_then_close) for _ in range(4)]
    await run_rlimit_case("evict_idle_on_emfile", *(server.port for server in servers))


async def test_happy_eyeballs_takeover_at_the_descriptor_limit(start_server: StartServer) -> None:
    """The takeover closes the hanging attempt first when no descriptor is left for the new one."""
    server = await start_server(answer_then_close)
    await run_rlimit_case("takeover_at_the_limit", server.port)


async def test_waiters_recycling_and_drains_at_the_descriptor_limit(start_server: StartServer) -> None:
    """16 tasks at capacity 8 with 5 descriptors left: only EMFILE errors, no stuck waiter, exact accounts."""
    answer = await start_server(answer_then_close)
    echo = await start_server(echo_tagged)
    await run_rlimit_case("churn_at_the_limit", answer.port, echo.port)


# ----------------------------------------------------------------------
# Happy eyeballs at a full pool


@pytest.mark.parametrize("order", ["silent first", "listening first"])
async def test_queued_happy_eyeballs_attempt_takes_over_a_silent_sibling(
    start_server: StartServer, resolve_names: ResolveNames, autojump_clock: trio.testing.MockClock, order: str
) -> None:
    """Both attempts queue at a full pool; once the first gets the slot, the second decides again after the delay."""
    server = await start_server(answer_then_close, "127.0.0.1")
    with checks.silent_address("127.0.0.2", server.port):
        addresses: list[tuple[str, int]] = [("127.0.0.2", socket.AF_INET), ("127.0.0.1", socket.AF_INET)]
        if order == "listening first":
            addresses.reverse()
        resolve_names({"slow.test": addresses})
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            holder = await pool.open_tcp_stream(server.host, server.port)
            await holder.send_all(b"h")
            assert await holder.receive_some() == b"ok:h"
            opened: list[trio_recycle.RecyclingStream] = []

            async def opener() -> None:
                opened.append(await pool.open_tcp_stream("slow.test", server.port, happy_eyeballs_delay=0.25))

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(opener)
                    # Both attempts queue (the second after its 0.25 s delay):
                    # a pool state, polled with a bound rather than a fixed sleep.
                    while pool.statistics().tasks_waiting < 2:  # noqa: ASYNC110 - the waiters are inside the pool
                        await trio.sleep(0.01)
                    assert pool.statistics().tasks_waiting == 2
                    await holder.aclose()
            async with opened[0] as stream:
                assert stream.getpeername() == ("127.0.0.1", server.port)
                await stream.send_all(b"x")
                assert await read_until_eof(stream) == b"ok:x"
            assert_accounts(pool)


# ----------------------------------------------------------------------
# Streams dropped without aclose()


def forget(box: list[object]) -> None:
    """Drop the only references (held in ``box``) and collect."""
    box.clear()
    gc.collect()


async def _drop(box: list[object], kind: str) -> None:
    """`forget`, expecting the ResourceWarning that names the kind; let the pool reclaim."""
    with pytest.warns(ResourceWarning, match=f"unclosed {kind}"):
        forget(box)
    await trio.testing.wait_all_tasks_blocked()


async def test_dropped_stream_gives_its_place_to_a_waiter(start_server: StartServer) -> None:
    """A stream dropped unclosed: ResourceWarning, its socket closed (not recycled), the waiter served."""
    server = await start_server(answer_then_close)
    before = socket_fds()
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        held: list[object] = [await pool.open_tcp_stream(server.host, server.port)]
        got: list[bytes] = []

        async def waiter() -> None:
            got.append(await cycle(pool, server))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 1
            await _drop(held, "RecyclingStream")
        assert got == [b"ok:ping"]
        stats = pool.statistics()
        assert (stats.created, stats.discarded, stats.recycled) == (2, 1, 1)
        assert_accounts(pool)
    assert socket_fds() <= before


async def test_dropped_udp_socket_gives_its_place_back() -> None:
    """The same for a RecyclingUDPSocket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        port = peer.getsockname()[1]
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            held: list[object] = [await pool.open_udp_socket("127.0.0.1", port)]
            await _drop(held, "RecyclingUDPSocket")
            assert pool.statistics().discarded == 1
            async with await pool.open_udp_socket("127.0.0.1", port) as udp:
                await udp.send(b"x")
            assert_accounts(pool)


async def test_many_dropped_streams_do_not_exhaust_the_pool(start_server: StartServer) -> None:
    """A loop that forgets `async with` keeps working past capacity (it hung at open number capacity + 1)."""
    server = await start_server(answer_then_close)
    before = socket_fds()
    async with trio_recycle.open_socket_pool(capacity=4) as pool:
        for _ in range(12):
            with trio.fail_after(5):
                box: list[object] = [await pool.open_tcp_stream(server.host, server.port)]
            with pytest.warns(ResourceWarning):
                forget(box)
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.statistics()
        assert stats.in_use == 0
        assert stats.discarded == stats.created == 12
        assert_accounts(pool)
    assert socket_fds() <= before


async def test_dropped_stream_while_draining_and_at_the_pool_exit(start_server: StartServer) -> None:
    """A drop with a drain in flight, and one right before the pool's exit: nothing leaks, nothing raises."""
    echo = await start_server(echo_tagged)
    before = socket_fds()
    async with trio_recycle.open_socket_pool(capacity=3) as pool:
        draining = await pool.open_tcp_stream(echo.host, echo.port)
        await draining.send_all(b"x")
        await draining.aclose()  # unread: drains in the background
        held: list[object] = [await pool.open_tcp_stream(echo.host, echo.port)]
        await _drop(held, "RecyclingStream")
        await drained(pool)
        assert_accounts(pool)
        last: list[object] = [await pool.open_tcp_stream(echo.host, echo.port)]
        with pytest.warns(ResourceWarning):
            forget(last)
        # The reclaim callback runs after the exit closed the socket.
    assert pool.statistics().in_use == 0
    await trio.testing.wait_all_tasks_blocked()  # the echo server sees the close
    assert socket_fds() <= before


async def test_stream_dropped_in_another_thread_is_reclaimed_in_the_pools_run(start_server: StartServer) -> None:
    """The finalizer may run in any thread: the pool's bookkeeping is still done in its own run."""
    server = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        held: list[object] = [await pool.open_tcp_stream(server.host, server.port)]

        with pytest.warns(ResourceWarning, match="unclosed RecyclingStream"):
            await trio.to_thread.run_sync(forget, held)
        with trio.fail_after(5):
            assert await cycle(pool, server) == b"ok:ping"
        assert pool.statistics().discarded == 1
        assert_accounts(pool)


# ----------------------------------------------------------------------
# Streams, UDP sockets and the pool touched from another trio.run


def _in_another_run(calls: list[tuple[str, Callable[[], object]]]) -> list[str]:
    """Run each call in a fresh trio.run (in this worker thread); return what each raised."""

    async def main() -> list[str]:
        results = []
        for name, call in calls:
            try:
                result = call()
                if inspect.isawaitable(result):
                    await result
            except RuntimeError as exc:
                results.append(f"{name}: {exc}")
            else:  # pragma: no cover - the check failed
                results.append(f"{name}: no error")
        return results

    return trio.run(main)


async def test_stream_used_from_another_run_raises_and_touches_nothing(start_server: StartServer) -> None:
    """Every method of a stream called from another trio.run raises RuntimeError; the stream still works here."""
    server = await start_server(echo_tagged)
    before = socket_fds()
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        stream = await pool.open_tcp_stream(server.host, server.port)
        tag = await stream.receive_some()
        calls: list[tuple[str, Callable[[], object]]] = [
            ("send_all", lambda: stream.send_all(b"x")),
            ("receive_some", lambda: stream.receive_some()),
            ("send_eof", lambda: stream.send_eof()),
            ("wait_send_all_might_not_block", lambda: stream.wait_send_all_might_not_block()),
            ("aclose", lambda: stream.aclose()),
            ("release", lambda: stream.release()),
            ("kept_alive", lambda: stream.kept_alive),
            ("getsockopt", lambda: stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)),
            ("setsockopt", lambda: stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)),
            ("getpeername", lambda: stream.getpeername()),
            ("getsockname", lambda: stream.getsockname()),
            ("open_tcp_stream", lambda: pool.open_tcp_stream(server.host, server.port)),
            ("open_udp_socket", lambda: pool.open_udp_socket(server.host, server.port)),
            ("statistics", lambda: pool.statistics()),
            ("closed", lambda: pool.closed),
        ]
        with trio.fail_after(10):
            results = await trio.to_thread.run_sync(_in_another_run, calls)
        assert len(results) == len(calls)
        for (name, _), result in zip(calls, results, strict=True):
            assert result.startswith(f"{name}: this "), result
            assert "another trio.run" in result, result
        stats = pool.statistics()
        assert (stats.in_use, stats.draining, stats.created) == (1, 0, 1)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        await stream.send_all(b"still mine")
        await stream.send_eof()
        assert tag + await read_until_eof(stream) == tag + b"still mine"
        await stream.aclose()
        assert_accounts(pool)
    assert pool.statistics().created == pool.statistics().discarded  # after the run is fine
    assert socket_fds() <= before


async def test_udp_socket_used_from_another_run_raises() -> None:
    """The same for a RecyclingUDPSocket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        async with trio_recycle.open_socket_pool(capacity=1) as pool:
            udp = await pool.open_udp_socket(*peer.getsockname())
            calls: list[tuple[str, Callable[[], object]]] = [
                ("send", lambda: udp.send(b"x")),
                ("receive", lambda: udp.receive()),
                ("aclose", lambda: udp.aclose()),
                ("getpeername", lambda: udp.getpeername()),
            ]
            with trio.fail_after(10):
                results = await trio.to_thread.run_sync(_in_another_run, calls)
            expected = "RecyclingUDPSocket belongs to a pool opened in another trio.run"
            assert all(expected in result for result in results), results
            async with udp:
                await udp.send(b"mine")
            assert peer.recv(16) == b"mine"
            assert_accounts(pool)


async def test_another_run_with_a_waiter_and_a_drain_in_flight(start_server: StartServer) -> None:
    """A stray call from another run while tasks wait and a socket drains changes nothing; the exit is clean."""
    echo = await start_server(echo_tagged)
    async with trio_recycle.open_socket_pool(capacity=2) as pool:
        draining = await pool.open_tcp_stream(echo.host, echo.port)
        await draining.send_all(b"x")
        held = await pool.open_tcp_stream(echo.host, echo.port)
        results: list[bytes] = []

        async def waiter() -> None:
            async with await pool.open_tcp_stream(echo.host, echo.port) as stream:
                await stream.send_eof()
                results.append(await read_until_eof(stream))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 1
            await draining.aclose()  # the drain frees the slot for the waiter
            stray_calls: list[tuple[str, Callable[[], object]]] = [("aclose", lambda: held.aclose())]
            stray = await trio.to_thread.run_sync(_in_another_run, stray_calls)
            assert "another trio.run" in stray[0]
        assert len(results) == 1
        assert results[0].startswith(b"<")
        assert pool.statistics().in_use == 1
        await held.aclose()
        await drained(pool)
        assert_accounts(pool)


# ----------------------------------------------------------------------
# A fast peer and a large drain_limit


async def test_aclose_reads_a_bounded_amount_then_hands_over_to_the_drain() -> None:
    """aclose() against megabytes of unread data returns after at most READ_BUDGET bytes; the drain does the rest."""
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(drain_limit=1 << 30, eof_timeout=5) as pool:
            stream = await pool.open_tcp_stream(*listener.getsockname())
            peer, _ = listener.accept()
            with peer:
                peer.setblocking(False)
                sent = 0
                with contextlib.suppress(BlockingIOError):
                    while sent < 16 * READ_BUDGET:
                        sent += peer.send(b"f" * 65536)
                assert sent > 2 * READ_BUDGET
                await stream.aclose()
                (psock,) = checks.sockets_in(pool, checks.State.DRAINING)
                assert bytes_queued(psock.sock) > 0  # left for the drain task
                peer.close()  # FIN after the data: the drain reads it all, then recycles
                await drained(pool)
            stats = pool.statistics()
            assert (stats.idle, stats.recycled) == (1, 1)
            assert_accounts(pool)


async def test_aclose_after_an_unseen_reset_closes_without_a_drain() -> None:
    """The peer reset the connection and the stream never read: aclose() finds the error, closes, starts no drain."""
    with checks.listener() as listener:
        async with trio_recycle.open_socket_pool(capacity=1, eof_timeout=5) as pool:
            stream = await pool.open_tcp_stream(*listener.getsockname())
            peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            peer.close()  # linger 0: an RST, no FIN
            (psock,) = checks.sockets_in(pool, checks.State.IN_USE)
            with trio.fail_after(5):
                while tcp_state(psock.sock) != _TCP_CLOSE:  # noqa: ASYNC110 - a reset arriving has no trio Event
                    await trio.sleep(0.001)
            await stream.aclose()
            stats = pool.statistics()
            assert (stats.in_use, stats.draining, stats.idle, stats.recycled, stats.discarded) == (0, 0, 0, 0, 1)
            assert_accounts(pool)


_TCP_CLOSE_WAIT: Final = 8  # include/net/tcp_states.h
_TCP_CLOSE: Final = 7


async def test_fin_queued_behind_more_than_the_read_budget_gets_no_fin_from_us(monkeypatch: pytest.MonkeyPatch) -> None:
    """More than READ_BUDGET queued, then the peer's FIN: aclose() recycles and sends no FIN (no TIME_WAIT)."""
    # A small budget, so that the default receive buffer holds more than it.
    monkeypatch.setattr(_drain, "READ_BUDGET", 16384)
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        # A receive buffer that holds the data and the FIN whatever the
        # system's default (the kernel caps it at rmem_max, 208 KiB by default, and doubles it).
        rcvbuf = (socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        async with trio_recycle.open_socket_pool(drain_limit=1 << 30, eof_timeout=5, socket_options=[rcvbuf]) as pool:
            stream = await pool.open_tcp_stream("127.0.0.1", port)
            client_port = stream.getsockname()[1]
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(5)
                peer.sendall(b"f" * 90_000)
                peer.shutdown(socket.SHUT_WR)
                (psock,) = checks.sockets_in(pool, checks.State.IN_USE)
                # The FIN is in, behind the data (bounded poll: the kernel
                # offers no event for a change of state).
                for _ in range(5000):
                    if tcp_state(psock.sock) == _TCP_CLOSE_WAIT:
                        break
                    await trio.sleep(0.001)
                assert tcp_state(psock.sock) == _TCP_CLOSE_WAIT
                assert bytes_queued(psock.sock) > 16384 + 65536
                await stream.aclose()
                stats = pool.statistics()
                assert (stats.idle, stats.draining, stats.recycled) == (1, 0, 1)
                assert_idle_disconnected(pool)
                # The peer got the disconnect's RST in FIN_WAIT2, not our FIN
                # (which would have left it a TIME_WAIT).
                peer.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    peer.recv(1)
            # Only this connection's entry: an earlier test's client that
            # closed first can have left a TIME_WAIT entry on the local port
            # bind(0) has just handed to our listener (seen in full runs).
            assert time_wait_count(port, {client_port}) == 0
            assert_accounts(pool)


# ----------------------------------------------------------------------
# Each failure combined with waiters at capacity, a drain in flight and the pool's exit


class Injected(Exception):
    """The non-OSError the combination tests inject at socket creation."""


FAILURES: Final = ("non-OSError at creation", "dropped stream", "call from another run")
SITUATIONS: Final = ("waiters at capacity", "drain in flight", "pool exit")


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("failure", FAILURES)
async def test_failure_combined_with(start_server: StartServer, inject: Injector, failure: str, situation: str) -> None:
    """Three waiters at a full pool (capacity 2); one failure strikes; every waiter ends, the accounts add up."""
    answer = await start_server(answer_then_close)
    echo = await start_server(echo_tagged)
    other = await start_server(answer_then_close)  # waiters ask for another peer: hand-off makes a socket
    before = socket_fds()
    outcomes: list[str] = []
    with trio.fail_after(20):
        async with (
            trio.open_nursery() as outer,
            trio_recycle.open_socket_pool(capacity=2, eof_timeout=1, peer_affinity=True) as pool,
        ):
            box: list[object] = [await pool.open_tcp_stream(answer.host, answer.port)]
            second = await pool.open_tcp_stream(echo.host, echo.port)

            async def waiter() -> None:
                try:
                    outcomes.append((await cycle(pool, other)).decode())
                except Injected:
                    outcomes.append("injected")
                except trio.ClosedResourceError:
                    outcomes.append("pool closed")

            for _ in range(3):
                outer.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().tasks_waiting == 3
            if situation == "drain in flight":
                await second.send_all(b"x")
                await second.aclose()  # unread: the drain frees this slot later
            first = box[0]
            assert isinstance(first, trio_recycle.RecyclingStream)
            if failure == "non-OSError at creation":
                inject.fail_next(Injected("injected"))
                del first
                await box.pop().aclose()  # type: ignore[attr-defined]
            elif failure == "dropped stream":
                del first
                with pytest.warns(ResourceWarning, match="unclosed RecyclingStream"):
                    forget(box)
            else:
                stray: list[tuple[str, Callable[[], object]]] = [("aclose", first.aclose)]
                result = await trio.to_thread.run_sync(_in_another_run, stray)
                assert "another trio.run" in result[0]
                assert first.getsockname()  # untouched: still open, still ours
                await first.aclose()
                del first
                box.clear()
            if situation != "pool exit":
                await second.aclose()
                while len(outcomes) < 3:
                    await trio.testing.wait_all_tasks_blocked()
                await drained(pool)
                assert_accounts(pool)
        # The pool's exit failed whoever was still waiting.
        assert len(outcomes) == 3, outcomes
        assert set(outcomes) <= {"ok:ping", "injected", "pool closed"}, outcomes
        # The injected error reached the one waiter whose socket failed, if
        # a socket was made for a waiter before the exit (the slot of the
        # stream closed unread frees only when its drain ends).
        expected = {0, 1} if situation == "pool exit" else {1}
        assert outcomes.count("injected") in (expected if failure == "non-OSError at creation" else {0}), outcomes
        if situation != "pool exit":
            assert "pool closed" not in outcomes
        stats = pool.statistics()
        assert (stats.idle, stats.in_use, stats.draining, stats.tasks_waiting) == (0, 0, 0, 0)
        assert stats.created == stats.discarded
        await trio.testing.wait_all_tasks_blocked()
    assert socket_fds() <= before


async def test_socket_failing_for_every_waiter_fails_them_all_at_once(
    start_server: StartServer, inject: Injector
) -> None:
    """A freed slot whose socket() keeps failing (EMFILE) fails every queued waiter at once: none is left stuck."""
    server = await start_server(answer_then_close)
    other = await start_server(answer_then_close)
    async with trio_recycle.open_socket_pool(capacity=1, peer_affinity=True) as pool:
        held = await pool.open_tcp_stream(server.host, server.port)
        errors: list[int | None] = []

        async def waiter() -> None:
            with pytest.raises(OSError) as info:
                await pool.open_tcp_stream(other.host, other.port)
            errors.append(info.value.errno)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            inject.fail_next(OSError(errno.EMFILE, "Too many open files (injected)"), count=3)
            await held.aclose()  # unread: drains, then frees the slot
        assert errors == [errno.EMFILE] * 3
        assert_accounts(pool)
        assert await cycle(pool, other) == b"ok:ping"  # the slot is free again
