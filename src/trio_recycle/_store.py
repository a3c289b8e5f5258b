"""SocketStore: the pool's idle sockets and parked live connections, in one eviction order."""

# Two kinds of sockets wait in the pool between owners:
#
# * idle: disconnected, found by PoolKey (family, type, proto, local
#   address, peer address or None). Any open of the same key may take one.
# * parked: still connected, released by a stream for another exchange with
#   the same peer, found by OpenKey (host, port, local_address as the open
#   gave them). Only an open with the same OpenKey may take one.
#
# Within a key the most recently stored socket is taken first (a stack): a
# warm socket is more likely to be alive, and the cold ones age out at the
# bottom. Across both kinds one dict in insertion order is the least
# recently used order, oldest first: when the pool is full, `oldest()` is
# the socket to evict, whatever its kind. Every operation is O(1) except
# removing a socket from the middle of its stack (eviction, the watch),
# which is O(sockets of that key).

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar, final

import attrs

if TYPE_CHECKING:
    from ._pooled_socket import OpenKey, PooledSocket, PoolKey

__all__ = ["SocketStore"]

_K = TypeVar("_K")


@final
@attrs.define(eq=False)
class SocketStore:
    """Idle and parked sockets by key, with one least-recently-used order over both."""

    _idle: dict[PoolKey, list[PooledSocket]] = attrs.field(factory=dict)
    _parked: dict[OpenKey, list[PooledSocket]] = attrs.field(factory=dict)
    #: Every stored socket, least recently stored first; the value says
    #: whether it is parked.
    _lru: dict[PooledSocket, bool] = attrs.field(factory=dict)
    parked_count: int = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def idle_count(self) -> int:
        """Idle (disconnected) sockets stored."""
        return len(self._lru) - self.parked_count

    def put_idle(self, psock: PooledSocket) -> None:
        """Store a disconnected socket under its PoolKey."""
        stack = self._idle.get(psock.key)
        if stack is None:
            self._idle[psock.key] = [psock]
        else:
            stack.append(psock)
        self._lru[psock] = False

    def take_idle(self, key: PoolKey) -> PooledSocket | None:
        """Remove and return the most recently stored idle socket of ``key``, if any."""
        stack = self._idle.get(key)
        if not stack:
            return None
        psock = stack.pop()
        if not stack:
            del self._idle[key]
        del self._lru[psock]
        return psock

    def park(self, psock: PooledSocket, key: OpenKey) -> None:
        """Store a live connection under the OpenKey of the open that made it."""
        stack = self._parked.get(key)
        if stack is None:
            self._parked[key] = [psock]
        else:
            stack.append(psock)
        self._lru[psock] = True
        self.parked_count += 1

    def has_parked(self, key: OpenKey) -> bool:
        """Whether a live connection of ``key`` is parked."""
        return key in self._parked

    def take_parked(self, key: OpenKey) -> PooledSocket | None:
        """Remove and return the most recently parked connection of ``key``, if any."""
        stack = self._parked.get(key)
        if not stack:
            return None
        psock = stack.pop()
        if not stack:
            del self._parked[key]
        del self._lru[psock]
        self.parked_count -= 1
        return psock

    def remove(self, psock: PooledSocket) -> bool:
        """Remove a stored socket; return whether it was parked (KeyError if not stored)."""
        parked = self._lru.pop(psock)
        if parked:
            assert psock.open_key is not None
            self._remove_from(self._parked, psock.open_key, psock)
            self.parked_count -= 1
        else:
            self._remove_from(self._idle, psock.key, psock)
        return parked

    @staticmethod
    def _remove_from(stacks: dict[_K, list[PooledSocket]], key: _K, psock: PooledSocket) -> None:
        stack = stacks[key]
        stack.remove(psock)
        if not stack:
            del stacks[key]

    def oldest(self) -> PooledSocket | None:
        """The least recently stored socket, idle or parked (the one to evict)."""
        return next(iter(self._lru), None)

    def oldest_parked_for(self, peer: object) -> PooledSocket | None:
        """The least recently parked connection to ``peer`` (O(stored sockets))."""
        for psock, parked in self._lru.items():
            if parked and psock.peer == peer:
                return psock
        return None

    def is_parked(self, psock: PooledSocket) -> bool:
        """Whether ``psock`` is stored as a parked connection."""
        return self._lru.get(psock, False)

    def sockets(self, *, parked: bool | None = None) -> list[PooledSocket]:
        """The stored sockets, oldest first: all, or only parked or only idle ones."""
        if parked is None:
            return list(self._lru)
        return [psock for psock, is_parked in self._lru.items() if is_parked is parked]

    def clear(self) -> list[PooledSocket]:
        """Forget every stored socket and return them (the pool's exit closes them)."""
        stored = list(self._lru)
        self._idle.clear()
        self._parked.clear()
        self._lru.clear()
        self.parked_count = 0
        return stored
