"""The life cycle of a pooled socket: its states, the moves allowed between them, and the ledger that applies them."""

# Everything that changes a pooled socket's state goes through this file,
# as everything that changes an h11 connection's state goes through
# h11/_state.py. The rules:
#
# * A socket is in exactly one State at a time, `psock.state`, written only
#   by Ledger.move (and Ledger.add for a new socket).
# * A move not in MOVES raises LifecycleError: a bug in the pool, never a
#   user's mistake, caught before it corrupts the counts.
# * Every state but CLOSED counts toward `capacity` (I4); every state but
#   IDLE and CLOSED counts toward the socket's peer (capacity_per_peer, the
#   per-peer statistics). IDLE sockets are disconnected: they have no peer.
# * The ledger keeps the per-state and per-peer counts and the lifetime
#   counters behind SocketPool.statistics(); nothing else writes them, so
#   the counts cannot drift from the states.
# * Where a socket is stored (the SocketStore for IDLE and PARKED, a drain
#   task for DRAINING, a stream for IN_USE) is the coordinator's business;
#   the state says which of those places holds it.
#
# The states:
#
#   IDLE        disconnected, in the store, any open of its key may take it
#   CONNECTING  taken for an open: connect() in progress (or about to be)
#   HANDED      a released live connection given straight to a task
#               waiting for the same open: no connect needed
#   IN_USE      behind an open RecyclingStream or RecyclingUDPSocket
#   PARKED      a released live connection in the store, watched
#   DRAINING    closed before the peer's FIN: a drain task waits for it
#   CLOSED      the descriptor is closed; the end of every path
#
# https://github.com/python-hyper/h11/blob/master/h11/_state.py

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar, final

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["MOVES", "PEER_STATES", "Ledger", "LifecycleError", "PeerCounts", "State", "Tracked"]


class State(enum.Enum):
    """Where a pooled socket is in its life."""

    IDLE = "idle"
    CONNECTING = "connecting"
    HANDED = "handed"
    IN_USE = "in use"
    PARKED = "parked"
    DRAINING = "draining"
    CLOSED = "closed"

    # Members are singletons: hash by identity, in C. Enum's own __hash__
    # is Python code, and every move hashes states several times.
    __hash__ = object.__hash__


IDLE, CONNECTING, HANDED, IN_USE, PARKED, DRAINING, CLOSED = State

# start-moves (docs/how-it-works.rst includes this table)
#: The allowed moves: from a state, the states it may go to.
MOVES: Final[dict[State, frozenset[State]]] = {
    # A new socket starts in CONNECTING (Ledger.add).
    IDLE: frozenset({CONNECTING, CLOSED}),  # taken by an open; evicted or the pool's exit
    CONNECTING: frozenset({IN_USE, CLOSED}),  # connected, wrapped in a stream; failed, cancelled or taken over
    HANDED: frozenset({IN_USE, CLOSED}),  # the waiter makes its stream; the waiter is gone
    IN_USE: frozenset(
        {
            IDLE,  # closed after the peer's FIN: disconnected
            PARKED,  # released clean
            HANDED,  # released clean to a task waiting for the same open
            DRAINING,  # closed before the peer's FIN
            CLOSED,  # closed unhealthy, dropped, or the pool's exit
        }
    ),
    PARKED: frozenset(
        {
            IN_USE,  # taken alive by an open of the same host and port
            IDLE,  # the peer closed it (FIN), or it was idle and had to go: disconnected
            DRAINING,  # unsolicited bytes, or expired with bytes in flight: our FIN, then the drain
            CLOSED,  # evicted (ended by the disconnect, or our FIN), broken, or the pool's exit
        }
    ),
    DRAINING: frozenset({IDLE, CLOSED}),  # the FIN came: disconnected; it did not, or the pool's exit
    CLOSED: frozenset(),
}
# end-moves

# Ledger.park and Ledger.take_parked write out two of these moves.
assert PARKED in MOVES[IN_USE]
assert IN_USE in MOVES[PARKED]

#: States that count toward the socket's peer.
PEER_STATES: Final = frozenset({CONNECTING, HANDED, IN_USE, PARKED, DRAINING})


class Tracked(Protocol):
    """What the ledger needs of a socket (PooledSocket): its state and its peer."""

    state: State
    peer: object

    def __hash__(self) -> int: ...


S = TypeVar("S", bound=Tracked)


#: PeerCounts' field for each state counted toward a peer.
_PEER_FIELD: Final = {CONNECTING: "in_use", HANDED: "in_use", IN_USE: "in_use", PARKED: "parked", DRAINING: "draining"}
#: Peers whose counts are kept once they own no socket: beyond it, the
#: counts of a peer that owns none are forgotten (a crawler meets peers
#: without end).
PEER_RECORDS: Final = 4096


@final
@attrs.define(eq=False)
class PeerCounts:
    """The ledger's counts for one peer address: sockets by state now, and opens over the pool's life."""

    in_use: int = 0
    parked: int = 0
    draining: int = 0
    opens: int = 0
    reused: int = 0
    kept_alive: int = 0
    evicted: int = 0


class LifecycleError(RuntimeError):
    """A move that the table does not allow: a bug in trio_recycle."""


@final
@attrs.define(eq=False)
class Ledger(Generic[S]):
    """The only writer of sockets' states, of the counts by state and by peer, and of the lifetime counters."""

    #: The sockets in each state but CLOSED, oldest arrival first;
    #: DRAINING's ordered, since `oldest` looks there (_store.py says why).
    _members: dict[State, dict[S, None]] = attrs.field(
        factory=lambda: {state: OrderedDict() if state is DRAINING else {} for state in State if state is not CLOSED}
    )
    #: Sockets in PEER_STATES, by peer address.
    per_peer: dict[object, int] = attrs.field(factory=dict)
    #: The same sockets by state, and lifetime counts, by peer address.
    peers: dict[object, PeerCounts] = attrs.field(factory=dict)
    created: int = 0
    reused: int = 0
    recycled: int = 0
    discarded: int = 0
    kept_alive: int = 0
    not_parked: int = 0
    evicted: int = 0
    #: Of ``evicted``: drains that gave way to a waiting task.
    drains_cut: int = 0
    #: Called with a peer after every change of its count in ``per_peer``
    #: (with capacity_per_peer: the waiting room's recount, which keeps
    #: the fullness of the peers it has waiters for).
    on_peer_count: Callable[[object], None] | None = None

    def __len__(self) -> int:
        """The sockets owned: every state but CLOSED."""
        return sum(len(members) for members in self._members.values())

    def count(self, state: State) -> int:
        """How many sockets are in ``state`` (CLOSED: 0, they are forgotten)."""
        members = self._members.get(state)
        return 0 if members is None else len(members)

    def sockets(self, *states: State) -> Iterator[S]:
        """The sockets in ``states`` (all owned ones when none is given), a snapshot."""
        for state in states or tuple(self._members):
            yield from list(self._members[state])

    def add(self, psock: S, peer: object) -> None:
        """A new socket, made for an open toward ``peer``: CONNECTING, and counted in ``created``."""
        self.created += 1
        psock.state = CONNECTING
        psock.peer = peer
        self._members[CONNECTING][psock] = None
        self._count_peer(peer, 1)
        counts = self._peer(peer)
        counts.in_use += 1
        counts.opens += 1

    def move(self, psock: S, new: State, peer: object = None) -> None:
        """Move ``psock`` to ``new``; ``peer`` is the address of a socket leaving IDLE.

        Raises:
          LifecycleError: the move is not in `MOVES`.
        """
        old = psock.state
        if new not in MOVES[old]:
            raise LifecycleError(f"{psock!r} cannot go from {old.name} to {new.name}")
        del self._members[old][psock]
        psock.state = new
        if new is CLOSED:
            self.discarded += 1
        else:
            self._members[new][psock] = None
        if new is CONNECTING:  # from IDLE: reused for an open
            psock.peer = peer
            self._count_peer(peer, 1)
            self.reused += 1
            counts = self._peer(peer)
            counts.in_use += 1
            counts.opens += 1
            counts.reused += 1
        elif new is IDLE or new is CLOSED:
            if old is not IDLE:
                peer = psock.peer
                self._count_peer(peer, -1)
                counts = self.peers[peer]
                if old is PARKED:
                    counts.parked -= 1
                elif old is DRAINING:
                    counts.draining -= 1
                else:
                    counts.in_use -= 1
                if len(self.peers) > PEER_RECORDS and peer not in self.per_peer:
                    del self.peers[peer]
            psock.peer = None
            if new is IDLE:
                self.recycled += 1
        else:
            counts = self.peers[psock.peer]
            field, new_field = _PEER_FIELD[old], _PEER_FIELD[new]
            if field != new_field:
                setattr(counts, field, getattr(counts, field) - 1)
                setattr(counts, new_field, getattr(counts, new_field) + 1)
            if new is IN_USE and (old is PARKED or old is HANDED):
                self.kept_alive += 1
                counts.kept_alive += 1
                counts.opens += 1

    # The keep-alive exchange's two moves, written out: `move` does the same
    # (tests/test_lifecycle.py checks it), through the general path that
    # costs a release and a take a fifth of their Python.

    def park(self, psock: S) -> None:
        """IN_USE to PARKED: a released connection goes into the store, as ``move(psock, PARKED)``."""
        if psock.state is not IN_USE:
            raise LifecycleError(f"{psock!r} cannot go from {psock.state.name} to PARKED")
        members = self._members
        del members[IN_USE][psock]
        members[PARKED][psock] = None
        psock.state = PARKED
        counts = self.peers[psock.peer]
        counts.in_use -= 1
        counts.parked += 1

    def take_parked(self, psock: S) -> None:
        """PARKED to IN_USE: a parked connection serves an open again, as ``move(psock, IN_USE)``."""
        if psock.state is not PARKED:
            raise LifecycleError(f"{psock!r} cannot go from {psock.state.name} to IN_USE")
        members = self._members
        del members[PARKED][psock]
        members[IN_USE][psock] = None
        psock.state = IN_USE
        self.kept_alive += 1
        counts = self.peers[psock.peer]
        counts.parked -= 1
        counts.in_use += 1
        counts.kept_alive += 1
        counts.opens += 1

    def _peer(self, peer: object) -> PeerCounts:
        counts = self.peers.get(peer)
        if counts is None:
            counts = self.peers[peer] = PeerCounts()
        return counts

    def _count_peer(self, peer: object, delta: int) -> None:
        left = self.per_peer.get(peer, 0) + delta
        if left:
            self.per_peer[peer] = left
        else:
            del self.per_peer[peer]
        if self.on_peer_count is not None:
            self.on_peer_count(peer)

    def oldest(self, state: State) -> S | None:
        """The socket that has been in ``state`` longest, if any."""
        return next(iter(self._members[state]), None)

    def note_evicted(self, psock: S) -> None:
        """``psock`` is being ended to make room for an open (before its move out of its state)."""
        self.evicted += 1
        if psock.state is not IDLE:
            self.peers[psock.peer].evicted += 1

    def note_closed_at_birth(self) -> None:
        """A ``socket()`` call whose socket was closed before it could be counted CONNECTING."""
        self.created += 1
        self.discarded += 1

    def note_not_parked(self) -> None:
        """A release ran the close protocol instead of parking."""
        self.not_parked += 1
