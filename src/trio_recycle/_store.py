"""SocketStore: the pool's idle sockets and parked connections in one eviction order, and the parked ones' watch."""

# Two kinds of sockets wait in the pool between owners:
#
# * idle: disconnected, found by PoolKey (family, type, proto, local
#   address, peer address or None). Any open of the same key may take one.
# * parked: still connected, released by a stream for another exchange with
#   the same peer, found by OpenKey (host, port, local_address as the open
#   gave them). Only an open with the same OpenKey may take one.
#
# Where the oldest entry is looked for (the LRU order, the oldest parked
# connection of a peer) the dict is an OrderedDict: a plain dict finds its
# first item by skipping the holes that deletions at the front left behind,
# so evicting the oldest over and over costs O(n) a time (3.4 us at 16,384
# against 0.85, measured), where an OrderedDict's linked list is O(1).
#
# Within a key the most recently stored socket is taken first (a stack): a
# warm socket is more likely to be alive, and the cold ones age out at the
# bottom. Across both kinds one dict in insertion order is the least
# recently used order, oldest first: when the pool is full, `oldest()` is
# the socket to evict, whatever its kind. Every stack is a dict in
# insertion order too (popitem() takes the newest, del removes one from the
# middle), and parked connections are also kept by peer address, so that
# every operation, evicting the oldest parked connection of a peer
# included, is O(1) whatever the number stored (capacity 16,384, 10,000
# peers: benchmarks/bench_scale.py).
#
# The store owns the Watch of its parked connections: parking registers a
# connection with it, and every way out of the store (taken, removed,
# found ready, expired, cleared) unregisters it, so "parked means watched"
# (I9) holds by construction and no caller keeps the two in step.

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, TypeVar, final

import attrs

from ._watch import Watch

if TYPE_CHECKING:
    from collections.abc import Callable

    import trio

    from ._pooled_socket import OpenKey, PooledSocket, PoolKey

__all__ = ["SocketStore"]

_K = TypeVar("_K")
_D = TypeVar("_D", bound="dict[PooledSocket, None]")


@final
@attrs.define(eq=False)
class SocketStore:
    """Idle and parked sockets by key, with one least-recently-used order over both, and the parked ones' watch.

    ``on_wake()`` is called from the watch's task when a parked connection
    has something to read or an error, or has expired: the pool then asks
    for `expired` and `ready`.
    """

    _nursery: trio.Nursery
    _keepalive_expiry: float
    _on_wake: Callable[[], object]
    _watch: Watch = attrs.field(init=False)
    _idle: dict[PoolKey, dict[PooledSocket, None]] = attrs.field(factory=dict)
    _parked: dict[OpenKey, dict[PooledSocket, None]] = attrs.field(factory=dict)
    #: Parked connections by peer address, oldest first.
    _parked_by_peer: dict[object, OrderedDict[PooledSocket, None]] = attrs.field(factory=dict)
    #: Every stored socket, least recently stored first; the value says
    #: whether it is parked.
    _lru: OrderedDict[PooledSocket, bool] = attrs.field(factory=OrderedDict)
    parked_count: int = 0

    def __attrs_post_init__(self) -> None:
        self._watch = Watch(self._keepalive_expiry, self._on_wake)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def idle_count(self) -> int:
        """Idle (disconnected) sockets stored."""
        return len(self._lru) - self.parked_count

    def put_idle(self, psock: PooledSocket) -> None:
        """Store a disconnected socket under its PoolKey."""
        _push(self._idle, psock.key, psock)
        self._lru[psock] = False

    def take_idle(self, key: PoolKey) -> PooledSocket | None:
        """Remove and return the most recently stored idle socket of ``key``, if any."""
        psock = _pop(self._idle, key)
        if psock is not None:
            del self._lru[psock]
        return psock

    def park(self, psock: PooledSocket, key: OpenKey) -> None:
        """Store and watch a live connection under the OpenKey of the open that made it.

        Raises:
          OSError: from epoll_ctl (for example ENOMEM); nothing was stored.
        """
        self._watch.add(psock, self._nursery)
        # _push, twice, written out: every release parks.
        stack = self._parked.get(key)
        if stack is None:
            self._parked[key] = {psock: None}
        else:
            stack[psock] = None
        stack = self._parked_by_peer.get(psock.peer)
        if stack is None:
            self._parked_by_peer[psock.peer] = OrderedDict({psock: None})
        else:
            stack[psock] = None
        self._lru[psock] = True
        self.parked_count += 1

    def has_parked(self, key: OpenKey) -> bool:
        """Whether a live connection of ``key`` is parked."""
        return key in self._parked

    def take_parked(self, key: OpenKey) -> tuple[PooledSocket, float] | None:
        """Remove the most recently parked connection of ``key``, if any; return it with its expiry deadline."""
        # _pop and _remove written out: every keep-alive open takes one.
        stack = self._parked.get(key)
        if not stack:
            return None
        psock, _ = stack.popitem()
        if not stack:
            del self._parked[key]
        by_peer = self._parked_by_peer[psock.peer]
        del by_peer[psock]
        if not by_peer:
            del self._parked_by_peer[psock.peer]
        del self._lru[psock]
        self.parked_count -= 1
        return psock, self._watch.remove(psock)

    def remove(self, psock: PooledSocket) -> bool:
        """Remove a stored socket; return whether it was parked (KeyError if not stored)."""
        parked = self._lru.pop(psock)
        if parked:
            self._unpark(psock)
            self._watch.remove(psock)
        else:
            _remove(self._idle, psock.key, psock)
        return parked

    def _unpark(self, psock: PooledSocket) -> None:
        """Forget a parked connection that the watch no longer watches."""
        assert psock.open_key is not None
        _remove(self._parked, psock.open_key, psock)
        _remove(self._parked_by_peer, psock.peer, psock)
        self.parked_count -= 1

    def ready(self) -> list[tuple[PooledSocket, int]]:
        """Remove and return every parked connection with something to read or an error, with its epoll events.

        One epoll_wait(0) (more only when more than 1023 are ready): the
        watcher's round over every parked connection at once.
        """
        found = self._watch.ready()
        for psock, _ in found:
            del self._lru[psock]
            self._unpark(psock)
        return found

    def expired(self) -> list[PooledSocket]:
        """Remove and return every connection parked longer than ``keepalive_expiry``."""
        found = self._watch.expired()
        for psock in found:
            del self._lru[psock]
            self._unpark(psock)
        return found

    def watching(self, psock: PooledSocket) -> bool:
        """Whether the watch watches ``psock`` (for tests: every parked connection, nothing else)."""
        return psock in self._watch

    def oldest(self) -> PooledSocket | None:
        """The least recently stored socket, idle or parked (the one to evict)."""
        return next(iter(self._lru), None)

    def oldest_parked_for(self, peer: object) -> PooledSocket | None:
        """The least recently parked connection to ``peer``."""
        parked = self._parked_by_peer.get(peer)
        return None if parked is None else next(iter(parked))

    def is_parked(self, psock: PooledSocket) -> bool:
        """Whether ``psock`` is stored as a parked connection."""
        return self._lru.get(psock, False)

    def sockets(self, *, parked: bool | None = None) -> list[PooledSocket]:
        """The stored sockets, oldest first: all, or only parked or only idle ones."""
        if parked is None:
            return list(self._lru)
        return [psock for psock, is_parked in self._lru.items() if is_parked is parked]

    def clear(self) -> list[PooledSocket]:
        """Close the watch, forget every stored socket and return them (the pool's exit closes them)."""
        # The watch first: its epoll must not hold descriptors being closed.
        self._watch.close()
        stored = list(self._lru)
        self._idle.clear()
        self._parked.clear()
        self._parked_by_peer.clear()
        self._lru.clear()
        self.parked_count = 0
        return stored


def _push(stacks: dict[_K, dict[PooledSocket, None]], key: _K, psock: PooledSocket) -> None:
    stack = stacks.get(key)
    if stack is None:
        stacks[key] = {psock: None}
    else:
        stack[psock] = None


def _pop(stacks: dict[_K, dict[PooledSocket, None]], key: _K) -> PooledSocket | None:
    """The newest socket of ``key``, removed."""
    stack = stacks.get(key)
    if not stack:
        return None
    psock, _ = stack.popitem()
    if not stack:
        del stacks[key]
    return psock


def _remove(stacks: dict[_K, _D], key: _K, psock: PooledSocket) -> None:
    stack = stacks[key]
    del stack[psock]
    if not stack:
        del stacks[key]
