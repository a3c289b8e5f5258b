"""PoolStatistics: the frozen snapshot that SocketPool.statistics() returns."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import attrs

from ._lifecycle import State

if TYPE_CHECKING:
    from ._lifecycle import Ledger, PeerCounts, S

__all__ = ["PeerStatistics", "PoolStatistics"]


@final
@attrs.frozen
class PoolStatistics:
    """A snapshot of a `SocketPool`, from `SocketPool.statistics`.

    The fields from ``capacity`` to ``tasks_waiting`` and ``parked`` are
    the state now; the others are counts over the pool's life. The sockets
    the pool owns are ``idle + in_use + draining + parked``.

    Attributes:
      capacity: The most sockets the pool may own at once.
      idle: Disconnected sockets waiting to be reused.
      in_use: Sockets handed out: connecting, or behind an open stream.
      draining: Closed streams whose socket waits for the peer's FIN.
      tasks_waiting: Tasks blocked because ``capacity`` sockets are owned
          (or ``capacity_per_peer`` sockets toward their peer).
      created: ``socket()`` calls made.
      reused: Opens served by an idle socket instead of a new one.
      recycled: Disconnects that put a socket back idle, or straight into
          the hands of a task waiting for the same peer.
      discarded: Sockets closed instead of recycled (failed connects,
          peers that sent no FIN in time, evictions, the pool's exit).
      evicted: Sockets ended to make room for an open: idle sockets and
          parked connections (least recently used first; a parked one
          with nothing in flight is ended by the disconnect and may serve
          that open), and drains that gave way to a waiting task. Counted
          apart from the failures; most are in ``discarded`` too.
      parked: Live connections released with `RecyclingStream.release`
          and waiting, watched, for an open of the same host and port.
      kept_alive: Opens served by a parked connection: no DNS, no
          ``connect()``.
      not_parked: `RecyclingStream.release` calls that ran the close
          protocol instead of parking (something unread, an EOF, an error,
          an option that cannot be undone, a task waiting, the pool's exit).
    """

    capacity: int
    idle: int
    in_use: int
    draining: int
    tasks_waiting: int
    created: int
    reused: int
    recycled: int
    discarded: int
    parked: int = 0
    kept_alive: int = 0
    not_parked: int = 0
    evicted: int = 0

    @classmethod
    def _of(cls, capacity: int, ledger: Ledger[S], tasks_waiting: int) -> PoolStatistics:
        """The snapshot of a pool with this ``capacity``, ``ledger`` and number of waiters."""
        count = ledger.count
        return cls(
            capacity=capacity,
            idle=count(State.IDLE),
            in_use=count(State.CONNECTING) + count(State.HANDED) + count(State.IN_USE),
            draining=count(State.DRAINING),
            tasks_waiting=tasks_waiting,
            created=ledger.created,
            reused=ledger.reused,
            recycled=ledger.recycled,
            discarded=ledger.discarded,
            parked=count(State.PARKED),
            kept_alive=ledger.kept_alive,
            not_parked=ledger.not_parked,
            evicted=ledger.evicted,
        )


@final
@attrs.frozen
class PeerStatistics:
    """A snapshot of a `SocketPool`'s sockets toward one peer address, from `SocketPool.peer_statistics`.

    ``in_use``, ``parked`` and ``draining`` are the state now; the others
    are counts over the pool's life (forgotten for a peer that owns no
    socket once more than 4,096 peers were seen: a crawler meets peers
    without end).

    Attributes:
      peer: The peer's socket address, as `RecyclingStream.getpeername`
          gives it.
      in_use: Sockets toward it connecting or behind an open stream.
      parked: Live connections to it waiting for an open.
      draining: Closed streams' sockets waiting for its FIN.
      opens: Opens served toward it: connected, or kept alive.
      reused: Of those, served by an idle socket instead of a new one.
      kept_alive: Of those, served by a parked connection (no connect).
      evicted: Its parked connections (or drains) ended to make room for
          another open.
    """

    peer: object
    in_use: int = 0
    parked: int = 0
    draining: int = 0
    opens: int = 0
    reused: int = 0
    kept_alive: int = 0
    evicted: int = 0

    @classmethod
    def _of(cls, peer: object, counts: PeerCounts | None) -> PeerStatistics:
        if counts is None:
            return cls(peer)
        return cls(
            peer,
            counts.in_use,
            counts.parked,
            counts.draining,
            counts.opens,
            counts.reused,
            counts.kept_alive,
            counts.evicted,
        )
