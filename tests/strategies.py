"""Hypothesis strategies: programs of pool operations, several tasks each, as plain data.

A `Program` is a pool configuration and a few tasks, each a short list of
`Step` values. tests/test_interleavings.py interprets it inside one trio run
against real hostile loopback servers (tests/hostile.py). Its ``repr`` is
the program in readable form, so a shrunk failing example reads like a
script.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
from hypothesis import strategies as st

from .hostile import ALL_KINDS

__all__ = [
    "OPS",
    "POKES",
    "SERVERS",
    "Config",
    "Program",
    "Step",
    "configs",
    "keepalive_programs",
    "pattern",
    "programs",
    "steps",
    "waiting_programs",
]

#: The servers a program can open: every kind on 127.0.0.1, then two on
#: ::1, so that sockets of both families share one pool.
SERVERS: Final = (*ALL_KINDS, "echo@::1", "answer_close@::1")
#: What a step does; see `Step`.
OPS: Final = (
    "open",
    "send",
    "recv",
    "read_eof",
    "send_eof",
    "close",
    "release",
    "close_other",
    "poke",
    "sleep",
    "drop",
    "fail_create",
)
#: What a "poke" does with the task's most recently closed (stale) handle.
POKES: Final = ("send_all", "receive_some", "send_eof", "wait_send", "getsockopt", "aclose")


@attrs.frozen
class Step:
    """One operation of a task.

    ``arg`` depends on ``op``: open -> index into `SERVERS` (the server);
    send -> bytes to send; recv -> ``max_bytes``; poke -> index into `POKES`;
    sleep -> milliseconds (0: a bare checkpoint); close_other -> the task
    whose current stream to close (the owner may be blocked in it);
    otherwise unused. ``release`` reads what an echoing server still owes
    (a protocol releases only after the whole answer) and calls
    ``stream.release()``. ``drop`` forgets the task's current stream without
    closing it (it is garbage-collected); ``fail_create`` makes the pool's
    next socket creation, whoever it is for, raise an exception that is not
    an OSError.
    ``cancel_at``: None runs the step to completion (or its timeout); k
    cancels it right after its k-th yield to the scheduler, so that the
    k-th checkpoint (or the next unshielded one) raises Cancelled; 0 means
    cancelled before it starts.
    """

    op: str
    arg: int = 0
    cancel_at: int | None = None

    def __str__(self) -> str:
        if self.op == "open":
            text = f"open {SERVERS[self.arg]}"
        elif self.op in ("send", "recv"):
            text = f"{self.op} {self.arg}"
        elif self.op == "poke":
            text = f"poke stale.{POKES[self.arg]}"
        elif self.op == "sleep":
            text = f"sleep {self.arg}ms"
        elif self.op == "close_other":
            text = f"close the stream of task {self.arg}"
        elif self.op == "drop":
            text = "drop the stream without closing it"
        elif self.op == "fail_create":
            text = "the next socket creation raises a non-OSError"
        else:
            text = self.op
        if self.cancel_at is not None:
            text += f"  [cancelled after {self.cancel_at} yields]"
        return text


@attrs.frozen
class Config:
    """The pool's options for one program."""

    capacity: int = 2
    recycle: bool = True
    peer_affinity: bool = True
    drain_limit: int = 65536
    eof_timeout: float = 5.0
    keepalive_expiry: float = 5.0
    capacity_per_peer: int | None = None

    def __str__(self) -> str:
        return (
            f"open_socket_pool(capacity={self.capacity}, recycle={self.recycle}, "
            f"peer_affinity={self.peer_affinity}, drain_limit={self.drain_limit}, "
            f"eof_timeout={self.eof_timeout}, keepalive_expiry={self.keepalive_expiry}, "
            f"capacity_per_peer={self.capacity_per_peer})"
        )


@attrs.frozen(repr=False)
class Program:
    """A pool configuration and the steps of each task, run concurrently."""

    config: Config
    tasks: tuple[tuple[Step, ...], ...]

    def __repr__(self) -> str:
        lines = [str(self.config)]
        for number, task in enumerate(self.tasks):
            lines.append(f"  task {number}:")
            lines.extend(f"    {step}" for step in task)
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a falsifying example with this: the readable form."""
        printer.text(repr(self))


def pattern(stream_number: int, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of what stream ``stream_number`` sends: ``c<n>;`` repeated.

    Each stream sends its own pattern, continued across sends, so a peer can
    tell from any prefix which stream the bytes came from (I1, I2).
    """
    unit = b"c%d;" % stream_number
    repeats = stop // len(unit) + 1
    return (unit * repeats)[start:stop]


_CANCEL: Final = st.sampled_from([None, None, None, None, 0, 1, 2, 3, 5])
#: Mostly the two servers whose sockets come back (so that reuse is common),
#: often any of them.
_SERVER: Final = st.one_of(st.integers(0, 1), st.integers(0, len(SERVERS) - 1))


#: Rarer cancellations, so that exchanges complete and connections are kept.
_RARE_CANCEL: Final = st.sampled_from([None] * 12 + [0, 1, 2, 3, 5])


def _step(
    op: str, arg: st.SearchStrategy[int], cancel: st.SearchStrategy[int | None] = _CANCEL
) -> st.SearchStrategy[Step]:
    return st.builds(Step, st.just(op), arg, cancel)


def steps() -> st.SearchStrategy[Step]:
    """Any single step, the simplest first (so that failures shrink to them)."""
    return st.one_of(
        _step("send", st.integers(1, 48)),
        _step("recv", st.integers(1, 64)),
        _step("read_eof", st.just(0)),
        _step("close", st.just(0)),
        _step("open", _SERVER),
        _step("send", st.integers(1, 48)),
        _step("read_eof", st.just(0)),
        _step("close", st.just(0)),
        _step("open", _SERVER),
        _step("release", st.just(0)),
        _step("release", st.just(0)),
        _step("send_eof", st.just(0)),
        _step("poke", st.integers(0, len(POKES) - 1)),
        _step("close_other", st.integers(0, 3)),
        _step("sleep", st.sampled_from([0, 10, 700, 3000])),
        _step("drop", st.just(0)),
        _step("fail_create", st.just(0)),
    )


def configs() -> st.SearchStrategy[Config]:
    """Pool options: small capacities, so tasks wait and hand-off is exercised."""
    return st.builds(
        Config,
        capacity=st.integers(1, 4),
        recycle=st.sampled_from([True, True, False]),
        peer_affinity=st.booleans(),
        # Above anything an echo sends back (I7 relies on that); the flood
        # always exceeds it.
        drain_limit=st.sampled_from([65536, 4096]),
        eof_timeout=st.sampled_from([5.0, 0.5, 30.0]),
        keepalive_expiry=st.sampled_from([5.0, 0.5, 60.0]),
        capacity_per_peer=st.sampled_from([None, None, 1, 2]),
    ).map(_per_peer_within_capacity)


def _per_peer_within_capacity(config: Config) -> Config:
    # open_socket_pool refuses capacity_per_peer > capacity; at capacity it means no per-peer limit.
    per_peer = config.capacity_per_peer
    if per_peer is not None and per_peer > config.capacity:
        return attrs.evolve(config, capacity_per_peer=config.capacity)
    return config


def programs(max_tasks: int = 4, max_steps: int = 8) -> st.SearchStrategy[Program]:
    """A configuration and 1..max_tasks tasks; each starts with an open, then up to max_steps steps."""
    task = st.builds(
        lambda first, rest: (first, *rest),
        _step("open", _SERVER),
        st.lists(steps(), max_size=max_steps),
    )
    return st.builds(
        Program,
        configs(),
        st.lists(task, min_size=1, max_size=max_tasks).map(tuple),
    )


#: Mostly the echo server, whose connections stay open: a parked
#: connection is taken only by an open of the same server.
_KEEP_SERVER: Final = st.one_of(
    st.just(0), st.just(0), st.just(SERVERS.index("keep_3")), st.integers(0, len(SERVERS) - 1)
)


def keepalive_steps() -> st.SearchStrategy[Step]:
    """Steps of a keep-alive client: exchanges released and taken again, with the rest now and then."""
    return st.one_of(
        _step("send", st.integers(1, 48), _RARE_CANCEL),
        _step("release", st.just(0), _RARE_CANCEL),
        _step("open", _KEEP_SERVER, _RARE_CANCEL),
        _step("send", st.integers(1, 48), _RARE_CANCEL),
        _step("release", st.just(0), _RARE_CANCEL),
        _step("open", _KEEP_SERVER, _RARE_CANCEL),
        _step("recv", st.integers(1, 64), _RARE_CANCEL),
        _step("close", st.just(0), _RARE_CANCEL),
        _step("poke", st.integers(0, len(POKES) - 1)),
        _step("close_other", st.integers(0, 3)),
        _step("send_eof", st.just(0)),
        _step("sleep", st.sampled_from([0, 10, 700, 3000, 70000])),
    )


def keepalive_programs(max_tasks: int = 4, max_steps: int = 10) -> st.SearchStrategy[Program]:
    """Like `programs`, but most steps open, send, release and open again: parked connections are taken."""
    task = st.builds(
        lambda first, rest: (first, *rest),
        _step("open", _KEEP_SERVER),
        st.lists(keepalive_steps(), min_size=3, max_size=max_steps),
    )
    return st.builds(Program, configs(), st.lists(task, min_size=1, max_size=max_tasks).map(tuple))


def waiting_programs() -> st.SearchStrategy[tuple[int, list[tuple[str, int, int]]]]:
    """A per-peer limit and steps (op, arg, delta) over four peers, for the waiting room with no pool.

    "join": a task for peer ``arg`` waits; "cancel": the waiter at index
    ``arg`` (modulo those waiting) is cancelled; "count": the sockets
    counted toward peer ``arg`` change by ``delta``; "serve": the first
    servable waiter is granted.
    """
    step = st.one_of(
        st.tuples(st.just("join"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("join"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("count"), st.integers(0, 3), st.sampled_from([-1, 1, 1])),
        st.tuples(st.just("serve"), st.just(0), st.just(0)),
    )
    return st.tuples(st.integers(1, 3), st.lists(step, max_size=40))
