"""Randomized interleavings: Hypothesis programs against hostile servers keep I1-I8 after every step.

Each example is a `Program` (tests/strategies.py): a pool configuration and
a few tasks, each a list of steps. It runs in a fresh ``trio.run`` with a
MockClock (autojump), a real pool and real loopback servers of every
hostile kind (tests/hostile.py). After every step the interpreter checks:

* I1: each stream received its own server's tag and then exactly a prefix
  of its own bytes (or of its flood); each server connection received a
  prefix of exactly one stream's bytes; no tag reaches two streams.
* I2: a closed handle raises ClosedResourceError at once; stale handles are
  poked later, after their socket may serve somebody else, and their bytes
  would show up as foreign bytes at the next owner's server.
* I3/I4: through the test-only accessors of conftest; I4's counts are also
  checked by an instrument after every task step.
* I7: no polite server saw a reset before its own FIN, and every disconnect
  the pool makes happens in a TCP state where the peer's FIN has arrived.
* I10: a stream dropped without aclose() warns and gives its place back;
  an exception (not an OSError) injected at the pool's next socket creation
  reaches the task whose open needed that socket, nowhere else.

After the pool's block: I5 (every socket the pool created is closed, no
task of the pool is left, every handle is dead), and after the run the
process holds exactly the sockets it held before.
"""

from __future__ import annotations

import gc
import re
import socket
import traceback
import warnings
import weakref
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Final

import attrs
import pytest
import trio
import trio.testing
from hypothesis import event, given, settings

import trio_recycle
from trio_recycle._in_flight import nothing_in_flight
from trio_recycle._pooled_socket import PooledSocket

from . import checks
from .checks import assert_capacity, assert_idle_disconnected, fd_inodes, socket_inode
from .conftest import has_ipv6, tcp_state
from .hostile import ALL_KINDS, POLITE_KINDS, Conn, HostileServer, dead_address, start_hostile_server
from .strategies import POKES, SERVERS, Config, Program, Step, keepalive_programs, pattern, programs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from trio_recycle import RecyclingStream, SocketPool

HAS_IPV6: Final = has_ipv6()
#: Virtual seconds one step may take before it is cancelled like any other.
STEP_TIMEOUT: Final = 20.0
#: Virtual seconds the whole program may take: beyond it, a deadlock.
PROGRAM_LIMIT: Final = 5000.0
#: read_eof stops after this many bytes (the flood never ends).
READ_LIMIT: Final = 16384
#: Servers that may reset the client on their own (they close with unread
#: data, or on purpose): a BrokenResourceError from them is not a bug.
RESETTING_KINDS: Final = frozenset({"answer_close", "answer_reset", "accept_close", "close_later", "keep_3"})
#: TCP states in which the peer's FIN has not arrived: a disconnect there
#: would reset a peer that had not finished (I7).
NO_FIN_STATES: Final = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2"}


# ----------------------------------------------------------------------
# Cancelling a step at its k-th checkpoint


class Canceller(trio.abc.Instrument):
    """Cancel a task's scope right after that task's k-th yield (one instrument serves every task).

    Cancelling after the task has yielded reaches it *in* that checkpoint:
    a task blocked there (wait_readable, waiting for capacity) is woken with
    Cancelled; one that yielded in a shielded or already-rescheduled
    checkpoint gets Cancelled at its next unshielded one. k = 0 cancels
    before the step starts, which hits its first checkpoint_if_cancelled.
    """

    def __init__(self) -> None:
        self.armed: dict[trio.lowlevel.Task, tuple[trio.CancelScope, list[int]]] = {}

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        entry = self.armed.get(task)
        if entry is not None:
            scope, left = entry
            left[0] -= 1
            if left[0] <= 0:
                del self.armed[task]
                scope.cancel()

    @contextmanager
    def cancel_at(self, yields: int | None) -> Iterator[trio.CancelScope]:
        """A scope cancelled after this task's ``yields``-th yield; 0: at once; None: never."""
        task = trio.lowlevel.current_task()
        with trio.CancelScope() as scope:
            if yields == 0:
                scope.cancel()
            elif yields is not None:
                self.armed[task] = (scope, [yields])
            try:
                yield scope
            finally:
                self.armed.pop(task, None)


# ----------------------------------------------------------------------
# The interpreter's model of the world


class InjectedError(Exception):
    """What a "fail_create" step makes the pool's next socket creation raise."""


@attrs.define(eq=False)
class StreamModel:
    """What the program knows about one stream it opened."""

    number: int
    task: int
    server: HostileServer
    _stream: RecyclingStream | None
    #: Bytes of `pattern` handed to send_all so far (the peer got a prefix).
    attempted: int = 0
    #: A send was cancelled or broke: how much went out is unknown, so stop sending.
    send_unknown: bool = False
    received: bytearray = attrs.field(factory=bytearray)
    eof_sent: bool = False
    closed: bool = False
    broken: bool = False
    tag: bytes | None = None
    #: The stream whose released connection this one continues (kept alive).
    prev: StreamModel | None = None
    released: bool = False
    #: Forgotten by a "drop" step: no reference is left.
    dropped: bool = False

    @property
    def stream(self) -> RecyclingStream:
        assert self._stream is not None, f"stream #{self.number} was dropped"
        return self._stream


@attrs.define(eq=False)
class TaskState:
    number: int
    current: StreamModel | None = None
    stale: list[StreamModel] = attrs.field(factory=list)


@attrs.define(eq=False)
class World:
    program: Program
    servers: list[HostileServer]
    canceller: Canceller = attrs.field(factory=Canceller)
    pool: SocketPool | None = None
    streams: dict[int, StreamModel] = attrs.field(factory=dict)
    tags: dict[bytes, int] = attrs.field(factory=dict)
    conn_of: dict[int, object] = attrs.field(factory=dict)
    opened: int = 0
    #: The last stream on each pooled socket: the one a kept-alive open continues.
    last_on: dict[PooledSocket, StreamModel] = attrs.field(factory=dict)
    #: Streams that share one connection, in order, keyed by the first one's number.
    chains: dict[int, list[StreamModel]] = attrs.field(factory=dict)
    tasks: list[TaskState] = attrs.field(factory=list)
    #: (task, step index) -> "ok", "cancelled" or "timed out".
    outcomes: dict[tuple[int, int], str] = attrs.field(factory=dict)
    created_inodes: set[str] = attrs.field(factory=set)
    violations: list[str] = attrs.field(factory=list)
    log: list[str] = attrs.field(factory=list)
    #: Socket creations still to fail with InjectedError ("fail_create").
    fail_creates: int = 0
    stop: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def violate(self, message: str) -> None:
        if not self.violations:
            self.log.append(f"!! {message}")
        self.violations.append(message)
        self.stop.cancel()

    def report(self) -> str:
        return (
            f"{self.violations[0]}\n"
            f"(+{len(self.violations) - 1} more)\n"
            f"program:\n{self.program!r}\n"
            "what happened:\n  " + "\n  ".join(self.log[-60:])
        )


# ----------------------------------------------------------------------
# Checks


def _check_stream(world: World, m: StreamModel) -> None:
    data = bytes(m.received)
    name = f"stream #{m.number} (task {m.task}, {m.server})"
    if m.server.kind == "accept_close":
        if data:
            world.violate(f"I1: {name} received {data[:40]!r} from a server that sends nothing")
        return
    if not data:
        return
    gets_tag = _gets_tag(m)
    if gets_tag is None:
        gets_tag = data.startswith(b"<")
    if not gets_tag:
        # A kept-alive stream: the connection's tag went to an earlier
        # stream; this one gets only the echo of its own bytes (I1 across
        # live reuse).
        expected = pattern(m.number, 0, len(data))
        if data != expected or len(data) > m.attempted:
            world.violate(f"I1: kept-alive {name} received {data[:60]!r}, expected {expected[:60]!r}")
        return
    end = data.find(b">")
    if end < 0:
        if not re.fullmatch(rb"<\d*", data):
            world.violate(f"I1: {name} received {data[:40]!r}, not a tag")
        return
    tag = data[: end + 1]
    if not re.fullmatch(rb"<\d+>", tag):
        world.violate(f"I1: {name} received {data[:40]!r}, not a tag")
        return
    if m.tag is None:
        owner = world.tags.setdefault(tag, m.number)
        if owner != m.number:
            world.violate(f"I1: tag {tag!r} reached stream #{m.number} and stream #{owner}")
        if all(conn.tag != tag for conn in m.server.conns):
            world.violate(f"I1: {name} received tag {tag!r} of a connection of another server")
        m.tag = tag
    elif m.tag != tag:  # pragma: no cover - received only grows
        world.violate(f"I1: {name} changed tag")
    rest = data[end + 1 :]
    if m.server.kind == "flood":
        expected = (tag * (len(rest) // len(tag) + 1))[: len(rest)]
    else:
        expected = pattern(m.number, 0, len(rest))
        if len(rest) > m.attempted:
            world.violate(f"I1: {name} received {len(rest)} echoed bytes but sent at most {m.attempted}")
    if rest != expected:
        world.violate(f"I1: {name} received foreign bytes: {rest[:60]!r}, expected {expected[:60]!r}")


def _gets_tag(m: StreamModel) -> bool | None:
    """Whether the connection's tag comes to this stream: no earlier stream on it sent a byte.

    None: unknown, an earlier stream's send was cancelled before or after
    its first byte went out.
    """
    prev = m.prev
    answer: bool | None = True
    while prev is not None:
        if prev.attempted and not prev.send_unknown:
            return False
        if prev.attempted:
            answer = None
        prev = prev.prev
    return answer


def _fits_chain(data: bytes, chain: list[StreamModel]) -> bool:
    """Whether ``data`` is what the streams of one kept connection sent, in order, as far as it goes.

    Each stream but the last sent all it attempted (a release needs that),
    except one whose send was cancelled before any byte went out
    (``send_unknown``): from it, anything up to what it attempted.
    """
    if not chain:
        return not data
    first, rest = chain[0], chain[1:]
    most = min(first.attempted, len(data))
    least = 0 if (first.send_unknown or not rest) else first.attempted
    if not rest or len(data) <= most:
        if data[:most] != pattern(first.number, 0, min(most, len(data))):
            return False
        if len(data) <= most:
            return True  # the server has not read further yet
    return any(
        data[:k] == pattern(first.number, 0, k) and _fits_chain(data[k:], rest) for k in range(most, least - 1, -1)
    )


def _continues_a_chain(world: World, server: HostileServer, conn: Conn, data: bytes) -> bool:
    """Whether ``data`` is what the streams that shared one kept connection sent, in order (I1)."""
    # Whose bytes they are is certain only from the first complete unit
    # "c<n>;" on: "c", "cc" or "c1" could be the start of several chains.
    certain = re.match(rb"c\d+;", data) is not None
    for first, chain in world.chains.items():
        if chain[0].server is not server:
            continue
        if _fits_chain(data, chain):
            if certain and world.conn_of.setdefault(first, conn) is not conn:
                world.violate(f"I1: the bytes of the streams {[s.number for s in chain]} reached two connections")
            return True
    return False


def _check_server(world: World, server: HostileServer) -> None:
    for conn in server.conns:
        if conn.reset and server.kind in POLITE_KINDS and world.program.config.recycle:
            # recycle=False is trio's SocketStream: closing with unread data
            # resets, by the kernel's rule. With recycling on, every close
            # before EOF drains first, so a reset is the pool's doing.
            m = next((m for m in world.streams.values() if world.conn_of.get(m.number) is conn), None)
            cut = world.pool is not None and checks.drains_cut(world.pool) > 0
            if m is not None:
                candidates = [m]
            else:
                # Bytes too short to name their stream ("c") never map the
                # connection: any broken stream of this server that could
                # have sent them may be the one (a dropped stream, say), or a
                # released one (I7 as of 0.3, below).
                data = bytes(conn.received)
                # A drain that gave way to a waiting task closed its socket as
                # trio.SocketStream would, and a late byte of the peer's then
                # draws the kernel's reset: a stream closed before its EOF is
                # a candidate once the pool has cut a drain.
                candidates = [
                    m
                    for m in world.streams.values()
                    if m.server is server
                    and (m.broken or m.released or (cut and m.closed))
                    and data == pattern(m.number, 0, len(data))
                ]
            # A connection kept alive across streams is mapped to its
            # chain's first stream: the stream that broke it is any of them
            # (the last, when it was dropped without aclose). I7 as of 0.3:
            # an idle parked connection that must go (evicted, expired, the
            # pool's exit) is ended by the disconnect, whose RST loses
            # nothing: the chain's last stream was released.
            chains = [world.chains.get(m.number, [m]) for m in candidates]
            if not any(
                any(s.broken for s in chain) or chain[-1].released or (cut and chain[-1].closed) for chain in chains
            ):
                world.violate(f"I7: {server} connection {conn.tag!r} got a reset before it had sent its FIN")
        if conn.errors:
            world.violate(f"{server} connection {conn.tag!r} failed: {conn.errors!r}")
        data = bytes(conn.received)
        if not data:
            continue
        if _continues_a_chain(world, server, conn, data):
            continue
        match = re.match(rb"c(\d+);", data)
        if match is None:
            if not re.fullmatch(rb"c\d*", data):
                world.violate(f"I1/I2: {server} connection {conn.tag!r} received foreign bytes {data[:60]!r}")
            continue
        number = int(match.group(1))
        if data != pattern(number, 0, len(data)):
            world.violate(f"I1/I2: {server} connection {conn.tag!r} received foreign bytes {data[:80]!r}")
            continue
        m = world.streams.get(number)
        if m is None or m.server is not server:
            world.violate(f"I1: {server} connection {conn.tag!r} got the bytes of stream #{number} of another server")
            continue
        if world.conn_of.setdefault(number, conn) is not conn:
            world.violate(f"I1: the bytes of stream #{number} reached two connections of {server}")
        if m.tag is not None and m.tag != conn.tag:
            world.violate(f"I1: stream #{number} reads {m.tag!r} but writes to {conn.tag!r}")
        if len(data) > m.attempted:
            world.violate(f"I1: {server} got {len(data)} bytes of stream #{number}, which sent {m.attempted}")


def check(world: World) -> None:
    """Every invariant that can be checked between two steps."""
    for m in world.streams.values():
        _check_stream(world, m)
    for server in world.servers:
        _check_server(world, server)
    assert world.pool is not None
    try:
        assert_idle_disconnected(world.pool)
    except (AssertionError, pytest.fail.Exception) as exc:
        world.violate(f"I3: an idle socket is not disconnected: {exc}")
    try:
        assert_capacity(world.pool)
    except AssertionError as exc:
        world.violate(f"I4: {world.pool.statistics()}: {exc}")
    for psock in checks.sockets_in(world.pool, checks.State.PARKED):
        # I9 (what holds between steps): every parked connection is watched.
        # A FIN or bytes may have arrived since the watcher last ran.
        if not checks.watching(world.pool, psock):
            world.violate("I9: a parked connection is not watched")
    for psock in checks.sockets_in(world.pool, checks.State.IDLE, checks.State.PARKED):
        world.created_inodes.add(socket_inode(psock.sock))


class CapacityWatch(trio.abc.Instrument):
    """I4 at every checkpoint: the counts add up after each task step."""

    def __init__(self, world: World, pool: SocketPool) -> None:
        self.world = world
        self.pool = pool

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        stats = self.pool.statistics()
        if not checks.counts_add_up(stats):
            self.world.violate(f"I4 after a step of {task.name}: {stats}")


@contextmanager
def watching_the_pool(world: World) -> Iterator[None]:
    """Record every socket the pool creates (I5) and the TCP state of every disconnect (I7)."""
    with watching_pools(world.created_inodes, world.violate, world):
        yield


@contextmanager
def watching_pools(
    created_inodes: set[str], violate: Callable[[str], None], world: World | None = None
) -> Iterator[None]:
    """Add the inode of every socket a pool creates to ``created_inodes``; report disconnects without a FIN.

    With a ``world``, a creation fails with InjectedError while
    ``world.fail_creates`` is positive.
    """
    create = PooledSocket.__dict__["create"]
    reset_for_reuse = PooledSocket.reset_for_reuse

    def spy_create(*args: object, **kwargs: object) -> PooledSocket:
        if world is not None and world.fail_creates:
            world.fail_creates -= 1
            world.log.append("   socket creation fails with InjectedError")
            raise InjectedError("injected by a fail_create step")
        psock: PooledSocket = create.__get__(None, PooledSocket)(*args, **kwargs)
        created_inodes.add(socket_inode(psock.sock))
        return psock

    def spy_reset(self: PooledSocket) -> bool:
        if not self.tainted and self.sock.type == socket.SOCK_STREAM:
            state = tcp_state(self.sock)
            # I7 as of 0.3: with nothing in flight either way (an idle
            # keep-alive connection), the RST loses nothing.
            if state in NO_FIN_STATES and not nothing_in_flight(self.sock):
                violate(f"I7: the pool disconnected a socket in {NO_FIN_STATES[state]}: the peer sent no FIN")
        return reset_for_reuse(self)

    setattr(PooledSocket, "create", staticmethod(spy_create))  # noqa: B010 - the attribute is a method
    setattr(PooledSocket, "reset_for_reuse", spy_reset)  # noqa: B010
    try:
        yield
    finally:
        setattr(PooledSocket, "create", create)  # noqa: B010
        setattr(PooledSocket, "reset_for_reuse", reset_for_reuse)  # noqa: B010


# ----------------------------------------------------------------------
# Steps


async def _end(world: World, m: StreamModel, end: Callable[[], Awaitable[object]], what: str) -> None:
    """``await end()`` (aclose or release); afterwards, even if it raised, the handle must be dead (I2)."""
    try:
        await end()
    finally:
        try:
            m.stream.getpeername()
        except trio.ClosedResourceError:
            pass
        else:
            world.violate(f"I2: stream #{m.number} still usable after {what}")


async def _close(world: World, ts: TaskState, m: StreamModel, *, owner: TaskState | None = None) -> None:
    m.closed = True
    if owner is None and ts.current is m:
        ts.current = None
    ts.stale.append(m)
    await _end(world, m, m.stream.aclose, "aclose")


def _broken(world: World, m: StreamModel, what: str, exc: trio.BrokenResourceError) -> None:
    m.broken = True
    m.send_unknown = True
    if m.server.kind not in RESETTING_KINDS:
        world.violate(f"{what} on stream #{m.number} to {m.server}, which never resets: {exc!r} from {exc.__cause__!r}")


async def _open(world: World, ts: TaskState, step: Step) -> None:
    if ts.current is not None:
        await _close(world, ts, ts.current)
    server = world.servers[step.arg]
    assert world.pool is not None
    world.opened += 1
    number = world.opened
    try:
        stream = await world.pool.open_tcp_stream(server.host, server.port)
    except OSError as exc:
        if server.kind != "dead":
            world.violate(f"open {server} failed: {exc!r}")
        return
    except InjectedError:
        # Ours alone (I10): it reached the task whose socket failed.
        world.log.append(f"   task {ts.number}: the open got the injected error")
        return
    if server.kind == "dead":
        world.violate("connected to an address where nothing listens")
    m = StreamModel(number, ts.number, server, stream)
    psock = checks.pooled_socket_of(stream)
    if stream.kept_alive:
        prev = world.last_on.get(psock)
        if prev is None or not prev.released or prev.server is not server:
            world.violate(f"I1: stream #{number} continues a connection nobody released to {server}: {prev}")
            return
        m.prev = prev
        first = prev
        while first.prev is not None:
            first = first.prev
        world.chains.setdefault(first.number, [first]).append(m)
    world.last_on[psock] = m
    world.streams[number] = m
    ts.current = m
    world.log.append(f"   task {ts.number}: stream #{number} -> {server}")


#: Servers that echo each read and keep the connection open: before a
#: release the task reads what they still owe, as a protocol reads the whole
#: answer before it gives a connection back.
ECHOING_KINDS: Final = frozenset({"echo", "never_close", "close_later", "keep_3"})


def _owed(m: StreamModel) -> int | None:
    """Bytes an echoing server still owes this stream; None while its tag is incomplete."""
    if m.attempted == 0:
        return 0
    gets_tag = _gets_tag(m)
    if gets_tag is None:
        if not m.received:
            return None
        gets_tag = m.received.startswith(b"<")
    if not gets_tag:
        return m.attempted - len(m.received)
    end = m.received.find(b">")
    if end < 0:
        return None
    return end + 1 + m.attempted - len(m.received)


#: Servers whose answer ends with their FIN (or reset): a protocol reads to
#: the end of it before it decides what to do with the connection.
ANSWER_THEN_EOF_KINDS: Final = frozenset({"answer_close", "half_close", "answer_reset", "accept_close"})


async def _release(world: World, ts: TaskState, m: StreamModel) -> None:
    kind = m.server.kind
    if kind in ECHOING_KINDS and not (m.broken or m.send_unknown or m.eof_sent):
        while (owed := _owed(m)) is None or owed > 0:
            before = len(m.received)
            await _receive(world, m, 65536, to_eof=False)
            if m.broken or len(m.received) == before:
                break  # the server closed (close_later) or reset
    elif kind in ANSWER_THEN_EOF_KINDS and not m.broken and (m.attempted or kind == "accept_close"):
        await _receive(world, m, 65536, to_eof=True)
    m.closed = True
    m.released = True
    if ts.current is m:
        ts.current = None
    ts.stale.append(m)
    await _end(world, m, m.stream.release, "release")


async def _drop(world: World, ts: TaskState, m: StreamModel) -> None:
    """Forget the stream without closing it; the pool must reclaim its socket (I10)."""
    ts.current = None
    m.closed = m.dropped = True
    # Its socket is closed with whatever is unread: the kernel may reset the
    # peer, as for any socket closed that way (I7 does not apply).
    m.broken = m.send_unknown = True
    ref = weakref.ref(m.stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m._stream = None
        if ref() is not None:
            gc.collect()
    warned = [w for w in caught if issubclass(w.category, ResourceWarning)]
    stream = ref()
    if stream is not None and not any(w.source is stream for w in warned):
        # Still referenced from somewhere (a traceback kept alive by an
        # earlier exception): close it as the program would have. (A
        # stream that was finalized lives on only as the source of its own
        # recorded ResourceWarning: it was dropped, and is not closed here.)
        world.log.append(f"   stream #{m.number} is still referenced: closed instead")
        await stream.aclose()
        return
    del stream
    if not any("unclosed RecyclingStream" in str(w.message) for w in warned):
        world.violate(f"stream #{m.number} was garbage-collected without a ResourceWarning: {caught!r}")
    await trio.lowlevel.checkpoint()  # the pool reclaims the socket in a callback


async def _send(world: World, m: StreamModel, n: int) -> None:
    if m.send_unknown:
        return
    if m.eof_sent:
        try:
            await m.stream.send_all(b"after-eof")
        except trio.ClosedResourceError:
            return
        world.violate(f"send_all after send_eof on stream #{m.number} did not raise ClosedResourceError")
        return
    data = pattern(m.number, m.attempted, m.attempted + n)
    m.attempted += n
    try:
        await m.stream.send_all(data)
    except trio.BrokenResourceError as exc:
        _broken(world, m, "send_all", exc)
    except BaseException:
        m.send_unknown = True
        raise


async def _receive(world: World, m: StreamModel, max_bytes: int, *, to_eof: bool) -> None:
    total = 0
    while True:
        try:
            data = await m.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            _broken(world, m, "receive_some", exc)
            return
        if len(data) > max_bytes:
            world.violate(f"receive_some({max_bytes}) returned {len(data)} bytes")
        m.received += data
        total += len(data)
        if not to_eof or not data or total >= READ_LIMIT:
            return


async def _send_eof(world: World, m: StreamModel) -> None:
    try:
        await m.stream.send_eof()
    except trio.BrokenResourceError as exc:
        _broken(world, m, "send_eof", exc)
    else:
        m.eof_sent = True


async def _poke(world: World, ts: TaskState, which: str) -> None:
    if not ts.stale:
        return
    m = ts.stale[-1]
    stream = m.stream
    try:
        if which == "send_all":
            await stream.send_all(b"STALE!")
        elif which == "receive_some":
            await stream.receive_some()
        elif which == "send_eof":
            await stream.send_eof()
        elif which == "wait_send":
            await stream.wait_send_all_might_not_block()
        elif which == "getsockopt":
            stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        else:
            await stream.aclose()  # closing twice is allowed and touches nothing
            return
    except trio.ClosedResourceError:
        return
    world.violate(f"I2: stale stream #{m.number}: {which} did not raise ClosedResourceError")


_POKE_FOR: Final = {"send": "send_all", "recv": "receive_some", "read_eof": "receive_some", "send_eof": "send_eof"}


async def perform(world: World, ts: TaskState, step: Step) -> None:
    if step.op == "open":
        await _open(world, ts, step)
    elif step.op == "poke":
        await _poke(world, ts, POKES[step.arg])
    elif step.op == "sleep":
        await trio.sleep(step.arg / 1000)
    elif step.op == "fail_create":
        world.fail_creates += 1
        await trio.lowlevel.checkpoint()
    elif step.op == "close_other":
        other = world.tasks[step.arg % len(world.tasks)]
        if other.current is not None and not other.current.closed:
            # The owner keeps it as its current stream: its next step, or
            # the one it is blocked in now, must get ClosedResourceError.
            victim = other.current
            world.log.append(f"   task {ts.number} closes stream #{victim.number} of task {other.number}")
            await _close(world, ts, victim, owner=other)
        else:
            await trio.lowlevel.checkpoint()
    else:
        m = ts.current
        if m is not None and m.closed:
            # Closed by another task: every call must fail, none may reach the socket.
            ts.current = None
            ts.stale.append(m)
            await _poke(world, ts, _POKE_FOR.get(step.op, "aclose"))
        elif m is None:
            await trio.lowlevel.checkpoint()
        elif step.op == "close":
            await _close(world, ts, m)
        elif step.op == "release":
            await _release(world, ts, m)
        elif step.op == "drop":
            await _drop(world, ts, m)
        elif m.broken:
            await trio.lowlevel.checkpoint()
        elif step.op == "send":
            await _send(world, m, step.arg)
        elif step.op == "recv":
            await _receive(world, m, step.arg, to_eof=False)
        elif step.op == "read_eof":
            await _receive(world, m, 65536, to_eof=True)
        elif step.op == "send_eof":
            await _send_eof(world, m)
        else:  # pragma: no cover
            raise AssertionError(step.op)


async def run_step(world: World, ts: TaskState, index: int, step: Step) -> None:
    world.log.append(f"task {ts.number}: {step}")
    outcome = "ok"
    current = ts.current
    with trio.move_on_after(STEP_TIMEOUT) as timeout:
        with world.canceller.cancel_at(step.cancel_at) as scope:
            try:
                await perform(world, ts, step)
            except trio.ClosedResourceError as exc:
                if current is not None and current.closed:
                    # Another task closed it while we were blocked in it (I2).
                    world.log.append(f"   task {ts.number}: woken by the close: {exc!r}")
                    ts.current = None
                    ts.stale.append(current)
                else:
                    world.violate(f"task {ts.number}: {step}: ClosedResourceError on an open stream: {exc!r}")
            except Exception as exc:
                world.violate(f"task {ts.number}: {step}: {''.join(traceback.format_exception(exc))}")
        if scope.cancelled_caught:
            outcome = "cancelled"
    if timeout.cancelled_caught:
        outcome = "timed out"
    if outcome != "ok":
        world.log.append(f"   task {ts.number}: {outcome}")
    world.outcomes[ts.number, index] = outcome
    check(world)


async def run_task(world: World, number: int, steps: tuple[Step, ...]) -> None:
    for index, step in enumerate(steps):
        await run_step(world, world.tasks[number], index, step)


def _tasks_of(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _tasks_of(child)


def _pool_tasks_left() -> list[str]:
    left: list[str] = []
    root = trio.lowlevel.current_root_task()
    assert root is not None
    for task in _tasks_of(root):
        code = getattr(task.coro, "cr_code", None)
        if code is not None and "trio_recycle" in code.co_filename:
            left.append(task.name)
    return left


async def run_program(program: Program, host: str = "127.0.0.1") -> World:
    """Interpret ``program`` against fresh servers; return the world with its violations."""
    config = program.config
    dead, dead_port = dead_address(host)
    async with trio.open_nursery() as servers_nursery:
        servers = [
            HostileServer("dead", host, dead_port)
            if kind == "dead"
            else await start_hostile_server(servers_nursery, kind, host)
            for kind in ALL_KINDS
        ]
        for name in SERVERS[len(ALL_KINDS) :]:
            kind, _, other_host = name.partition("@")
            servers.append(await start_hostile_server(servers_nursery, kind, other_host if HAS_IPV6 else host))
        world = World(program, servers)
        with watching_the_pool(world):
            try:
                with trio.fail_after(PROGRAM_LIMIT):
                    await _run_in_pool(world, config)
            except trio.TooSlowError:
                world.violate(f"deadlock: the program did not finish within {PROGRAM_LIMIT} virtual seconds")
        servers_nursery.cancel_scope.cancel()
    dead.close()
    return world


async def _run_in_pool(world: World, config: Config) -> None:
    async with trio_recycle.open_socket_pool(
        capacity=config.capacity,
        recycle=config.recycle,
        peer_affinity=config.peer_affinity,
        drain_limit=config.drain_limit,
        eof_timeout=config.eof_timeout,
        keepalive_expiry=config.keepalive_expiry,
        capacity_per_peer=config.capacity_per_peer,
    ) as pool:
        world.pool = pool
        watch = CapacityWatch(world, pool)
        trio.lowlevel.add_instrument(world.canceller)
        trio.lowlevel.add_instrument(watch)
        try:
            with world.stop:
                world.tasks = [TaskState(number) for number in range(len(world.program.tasks))]
                async with trio.open_nursery() as nursery:
                    for number, steps in enumerate(world.program.tasks):
                        nursery.start_soon(run_task, world, number, steps)
                # Let the servers and the pool's tasks act on what the last
                # steps did: until every task waits, not a fixed time.
                await trio.testing.wait_all_tasks_blocked()
                world.log.append("all tasks done")
                check(world)
        finally:
            trio.lowlevel.remove_instrument(watch)
            trio.lowlevel.remove_instrument(world.canceller)
    if world.violations:
        return
    # I5: after the block nothing of the pool is open or running.
    open_now = set(fd_inodes().values())
    leaked = world.created_inodes & open_now
    if leaked:
        world.violate(f"I5: sockets of the pool still open after its block: {sorted(leaked)}")
    left = _pool_tasks_left()
    if left:
        world.violate(f"I5: tasks of the pool still running after its block: {left}")
    stats = pool.statistics()
    if (stats.idle, stats.in_use, stats.draining, stats.tasks_waiting, stats.parked) != (0, 0, 0, 0, 0) or (
        stats.created != stats.discarded
    ):
        world.violate(f"I5: the pool still owns sockets after its block: {stats}")
    for m in world.streams.values():
        if m.dropped:
            continue
        try:
            m.stream.getsockname()
        except trio.ClosedResourceError:
            continue
        world.violate(f"I5: stream #{m.number} still usable after the pool's block")


def socket_fds() -> set[str]:
    return {v for v in fd_inodes().values() if v.startswith("socket:")}


def run(program: Program, host: str = "127.0.0.1") -> World:
    """Run ``program`` in a fresh trio run with a MockClock; fail with a readable report."""
    before = socket_fds()
    world: World = trio.run(run_program, program, host, clock=trio.testing.MockClock(autojump_threshold=0))
    if world.violations:
        raise AssertionError(world.report())
    after = socket_fds()
    assert after <= before, f"I5: sockets left open after the run: {sorted(after - before)}"
    return world


# ----------------------------------------------------------------------
# The tests


# Each example is one short trio run (a few ms): four times the profile's
# count, 100 examples (about 2 s) by default, 600 under the ci profile.
@settings(max_examples=settings().max_examples * 4)
@given(programs())
def test_random_programs_keep_the_invariants(program: Program) -> None:
    """I1-I8 hold after every step of any program of opens, sends, reads, EOFs, closes, pokes and cancels."""
    world = run(program)
    assert world.pool is not None
    stats = world.pool.statistics()
    event(f"reused: {'yes' if stats.reused else 'no'}")
    event(f"recycled: {'yes' if stats.recycled else 'no'}")
    event(f"kept alive: {'yes' if stats.kept_alive else 'no'}")
    event(f"release that did not park: {'yes' if stats.not_parked else 'no'}")
    event(f"cancelled or timed out steps: {min(3, sum('cancelled' in e or 'timed out' in e for e in world.log))}")
    event(f"streams dropped: {min(2, sum(e.endswith('drop the stream without closing it') for e in world.log))}")
    event(f"injected errors that reached an open: {min(2, sum('got the injected error' in e for e in world.log))}")


@settings(max_examples=settings().max_examples * 4)
@given(keepalive_programs())
def test_random_keepalive_programs_keep_the_invariants(program: Program) -> None:
    """I1-I9 hold when tasks release connections and take them again, among closes, pokes and cancels."""
    world = run(program)
    assert world.pool is not None
    stats = world.pool.statistics()
    event(f"kept alive: {min(stats.kept_alive, 3)}")
    event(f"release that did not park: {'yes' if stats.not_parked else 'no'}")
    event(f"cancelled or timed out steps: {min(3, sum('cancelled' in e or 'timed out' in e for e in world.log))}")


def _program(config: Config, *tasks: list[Step]) -> Program:
    return Program(config, tuple(tuple(task) for task in tasks))


def test_every_kind_of_server_in_one_program() -> None:
    """A hand-written program that visits every hostile server once (the interpreter itself works)."""
    tasks = []
    for index, _kind in enumerate(SERVERS):
        tasks.append([Step("open", index), Step("send", 10), Step("recv", 64), Step("read_eof"), Step("close")])
    world = run(_program(Config(capacity=len(SERVERS)), *tasks))
    assert len(world.streams) == len(SERVERS) - 1  # the dead address refuses
    stats = world.pool.statistics() if world.pool else None
    assert stats is not None
    assert stats.recycled >= 2


# ----------------------------------------------------------------------
# Systematic cancellation: every checkpoint of every kind of step


def _cycle(server: int = 0) -> list[Step]:
    """A full cycle to an echo (default) server: the pool must still work after a cancellation."""
    return [Step("open", server), Step("send", 2), Step("send_eof"), Step("read_eof"), Step("close")]


ECHO, ANSWER_CLOSE, HALF_CLOSE, CLOSE_LATER, NEVER_CLOSE = (
    ALL_KINDS.index(kind) for kind in ("echo", "answer_close", "half_close", "close_later", "never_close")
)
DEAD = ALL_KINDS.index("dead")

#: name -> (config, tasks before the target, (task, index) of the target step).
#: The target step is the last of task 0's setup list; `_cycle` follows it.
SCENARIOS: Final[dict[str, tuple[Config, list[list[Step]]]]] = {
    "open a new socket": (Config(), [[Step("open", ECHO)]]),
    "open a reused socket": (Config(), [[*_cycle(), Step("open", ECHO)]]),
    "open a socket of another peer (eviction)": (Config(capacity=1), [[*_cycle(ANSWER_CLOSE), Step("open", ECHO)]]),
    "open where nothing listens": (Config(), [[Step("open", DEAD)]]),
    "send_all that fits": (Config(), [[Step("open", ECHO), Step("send", 40)]]),
    "send_all that blocks": (
        Config(),
        [[Step("open", HALF_CLOSE), Step("send", 1), Step("read_eof"), Step("send", 3_000_000)]],
    ),
    "receive_some with data ready": (
        Config(),
        [[Step("open", ECHO), Step("send", 5), Step("sleep", 1), Step("recv", 64)]],
    ),
    "receive_some that blocks": (Config(), [[Step("open", CLOSE_LATER), Step("recv", 64)]]),
    "read to EOF": (Config(), [[Step("open", ECHO), Step("send", 5), Step("send_eof"), Step("read_eof")]]),
    "send_eof": (Config(), [[Step("open", ECHO), Step("send", 5), Step("send_eof")]]),
    "aclose after EOF (recycle)": (
        Config(),
        [[Step("open", ANSWER_CLOSE), Step("send", 3), Step("read_eof"), Step("close")]],
    ),
    "aclose before EOF (drain)": (Config(), [[Step("open", ECHO), Step("send", 3), Step("close")]]),
    "aclose of a peer that never closes": (
        Config(eof_timeout=0.5),
        [[Step("open", NEVER_CLOSE), Step("send", 3), Step("recv", 64), Step("close"), Step("sleep", 1000)]],
    ),
    "aclose in the fallback": (Config(recycle=False), [[Step("open", ANSWER_CLOSE), Step("send", 3), Step("close")]]),
    "release (park)": (Config(), [[Step("open", ECHO), Step("send", 3), Step("release")]]),
    "release while a task waits for the same open (hand-off)": (
        Config(capacity=1),
        [[Step("open", ECHO), Step("send", 3), Step("sleep", 10), Step("release")], [Step("open", ECHO)]],
    ),
    "release of an unclean stream (close protocol)": (
        Config(),
        [[Step("open", ECHO), Step("send", 3), Step("sleep", 10), Step("send_eof"), Step("release")]],
    ),
    "open that takes a parked connection": (
        Config(),
        [[Step("open", ECHO), Step("send", 2), Step("release"), Step("open", ECHO)]],
    ),
    "open that takes a parked connection at a full pool": (
        Config(capacity=1),
        [[Step("open", ECHO), Step("release"), Step("open", ECHO)]],
    ),
}


def _target_index(steps: list[Step]) -> int:
    # A trailing sleep only lets background work finish: the target is the step before it.
    return len(steps) - 2 if steps[-1].op == "sleep" else len(steps) - 1


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cancel_each_checkpoint_of_a_step_until_it_completes(scenario: str) -> None:
    """I6: cancelling a step at its 1st, 2nd, ... yield keeps every invariant, until the step completes."""
    config, (setup, *others) = SCENARIOS[scenario]
    target = _target_index(setup)
    for yields in range(200):
        steps = list(setup)
        steps[target] = attrs.evolve(steps[target], cancel_at=yields)
        world = run(_program(config, [*steps, *_cycle()], *others))
        outcome = world.outcomes[0, target]
        if outcome == "ok":
            break
        assert outcome == "cancelled", (yields, outcome)
    else:  # pragma: no cover
        pytest.fail(f"{scenario}: still cancelled after 200 yields")
    assert yields >= 1, f"{scenario}: the step was never cancelled"
    print(f"{scenario}: cancelled at each of its first {yields} yields, completed after")


# ----------------------------------------------------------------------
# Regressions found by the programs above


async def test_stale_handle_says_closed_even_while_its_owner_is_mid_send(nursery: trio.Nursery) -> None:
    """A stream closed by another task while its owner is inside send_eof raises ClosedResourceError, not Busy.

    Found as: task 2 ``open echo; read_eof; send 1`` while task 3 ``close the
    stream of task 2; poke stale.send_all``: the owner still held the send
    guard in its last (shielded) checkpoint, so the stale send_all raised
    BusyResourceError. trio picks which task runs first in a batch at
    random, so the race is run 20 times (both orders come up).
    """
    server = await start_hostile_server(nursery, "echo")
    async with trio_recycle.open_socket_pool(capacity=1) as pool:
        for _ in range(20):
            stream = await pool.open_tcp_stream(server.host, server.port)

            async def owner(stream: RecyclingStream = stream) -> None:
                with suppress(trio.ClosedResourceError):
                    await stream.send_eof()

            async def closer(stream: RecyclingStream = stream) -> None:
                await stream.aclose()
                with pytest.raises(trio.ClosedResourceError):
                    await stream.send_all(b"stale")
                with pytest.raises(trio.ClosedResourceError):
                    await stream.send_eof()
                with pytest.raises(trio.ClosedResourceError):
                    await stream.wait_send_all_might_not_block()

            async with trio.open_nursery() as tasks:
                tasks.start_soon(owner)
                tasks.start_soon(closer)
            assert_capacity(pool)
