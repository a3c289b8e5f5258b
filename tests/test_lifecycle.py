"""The life-cycle table and the ledger, driven with no I/O (as h11's tests/test_state.py drives ConnectionState)."""

from __future__ import annotations

import itertools
from collections import Counter

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_recycle._lifecycle import MOVES, PEER_STATES, Ledger, LifecycleError, State

IDLE, CONNECTING, HANDED, IN_USE, PARKED, DRAINING, CLOSED = State

#: A way from CONNECTING (where every socket starts) to each state.
PATHS: dict[State, list[State]] = {
    CONNECTING: [],
    IN_USE: [IN_USE],
    HANDED: [IN_USE, HANDED],
    PARKED: [IN_USE, PARKED],
    DRAINING: [IN_USE, DRAINING],
    IDLE: [IN_USE, IDLE],
    CLOSED: [CLOSED],
}


@attrs.define(eq=False)
class Thing:
    """The two attributes the ledger writes: a socket's record without the socket."""

    state: State = CONNECTING
    peer: object = None


def at(ledger: Ledger[Thing], state: State, peer: object = "peer") -> Thing:
    thing = Thing()
    ledger.add(thing, peer)
    for step in PATHS[state]:
        ledger.move(thing, step, peer)
    assert thing.state is state
    return thing


def recount(ledger: Ledger[Thing], things: list[Thing]) -> None:
    """The ledger's counts equal a count of the states themselves."""
    states = Counter(t.state for t in things)
    for state in State:
        if state is not CLOSED:
            assert ledger.count(state) == states[state], state
    assert len(ledger) == sum(n for s, n in states.items() if s is not CLOSED)
    peers = Counter(t.peer for t in things if t.state in PEER_STATES)
    assert ledger.per_peer == dict(peers)
    assert ledger.created - ledger.discarded == len(ledger)


def test_the_table_names_every_state_and_closed_is_the_end() -> None:
    """Every state has a row; CLOSED has no way out and every other state can reach it."""
    assert set(MOVES) == set(State)
    assert MOVES[CLOSED] == frozenset()
    for state in State:
        if state is not CLOSED:
            assert CLOSED in MOVES[state], state
    assert all(state is not CLOSED for state in PEER_STATES)
    assert IDLE not in PEER_STATES


@pytest.mark.parametrize(("old", "new"), list(itertools.product(State, State)))
def test_a_move_is_applied_exactly_when_the_table_allows_it(old: State, new: State) -> None:
    """Allowed moves change the state; any other raises LifecycleError and changes nothing."""
    ledger: Ledger[Thing] = Ledger()
    thing = at(ledger, old)
    before = (attrs.asdict(ledger, recurse=False, filter=lambda a, _: not a.name.startswith("_")), thing.state)
    if new in MOVES[old]:
        ledger.move(thing, new, "peer")
        assert thing.state is new
    else:
        with pytest.raises(LifecycleError, match=f"from {old.name} to {new.name}"):
            ledger.move(thing, new, "peer")
        after = (attrs.asdict(ledger, recurse=False, filter=lambda a, _: not a.name.startswith("_")), thing.state)
        assert after == before
    recount(ledger, [thing])


def test_lifetime_counters_follow_the_moves() -> None:
    """created on add, reused leaving IDLE, recycled entering IDLE, discarded entering CLOSED, kept_alive."""
    ledger: Ledger[Thing] = Ledger()
    a = at(ledger, CONNECTING, "p")
    assert (ledger.created, ledger.reused, ledger.recycled, ledger.discarded) == (1, 0, 0, 0)
    ledger.move(a, IN_USE)
    ledger.move(a, IDLE)
    assert (ledger.recycled, ledger.per_peer, a.peer) == (1, {}, None)
    ledger.move(a, CONNECTING, "q")
    assert (ledger.reused, ledger.per_peer, a.peer) == (1, {"q": 1}, "q")
    ledger.move(a, IN_USE)
    ledger.move(a, PARKED)
    ledger.move(a, IN_USE)
    ledger.move(a, HANDED)
    ledger.move(a, IN_USE)
    assert ledger.kept_alive == 2
    ledger.move(a, DRAINING)
    ledger.move(a, CLOSED)
    assert (ledger.discarded, len(ledger), ledger.per_peer) == (1, 0, {})
    ledger.note_not_parked()
    assert ledger.not_parked == 1


def test_sockets_lists_members_by_state_oldest_first() -> None:
    ledger: Ledger[Thing] = Ledger()
    first, second = at(ledger, IN_USE), at(ledger, IN_USE)
    parked = at(ledger, PARKED)
    assert list(ledger.sockets(IN_USE)) == [first, second]
    assert set(ledger.sockets()) == {first, second, parked}


@given(
    st.lists(st.tuples(st.integers(0, 5), st.sampled_from(list(State)), st.sampled_from(["a", "b", None])), max_size=60)
)
def test_any_program_of_moves_keeps_the_counts_equal_to_a_recount(program: list[tuple[int, State, object]]) -> None:
    """Random moves on six sockets, allowed or not: the counts always equal a recount of the states."""
    ledger: Ledger[Thing] = Ledger()
    things = [at(ledger, CONNECTING, f"p{i % 2}") for i in range(6)]
    for index, new, peer in program:
        thing = things[index]
        if new in MOVES[thing.state]:
            ledger.move(thing, new, peer)
        else:
            with pytest.raises(LifecycleError):
                ledger.move(thing, new, peer)
        recount(ledger, things)


@pytest.mark.parametrize(("old", "new"), [(IN_USE, PARKED), (PARKED, IN_USE)])
def test_the_written_out_keep_alive_moves_do_what_move_does(old: State, new: State) -> None:
    """Ledger.park and Ledger.take_parked (the keep-alive moves) leave what move() leaves, and refuse the rest."""
    fast, general = Ledger[Thing](), Ledger[Thing]()
    thing, other = at(fast, old), at(general, old)
    (fast.park if new is PARKED else fast.take_parked)(thing)
    general.move(other, new)
    assert thing.state is other.state is new
    assert attrs.asdict(fast, recurse=True, filter=lambda a, _: a.name != "_members") == attrs.asdict(
        general, recurse=True, filter=lambda a, _: a.name != "_members"
    )
    assert [fast.count(s) for s in State] == [general.count(s) for s in State]
    for state in State:
        if state is not old and state is not CLOSED:
            wrong = at(Ledger[Thing](), state)
            with pytest.raises(LifecycleError):
                (Ledger[Thing]().park if new is PARKED else Ledger[Thing]().take_parked)(wrong)
