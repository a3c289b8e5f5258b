"""The invariants every pool test checks, in one place: the only test module that looks inside a pool.

The shape of trio's ``testing/_check_streams.py``: each check is a plain
function over a live pool, run at a checkpoint of the test. A sum written
out in four files drifts; one checker does not.

* `check_pool`: I3 (idle means disconnected), I4 (the counts add up to the
  descriptors the pool owns, parked connections included, at most
  ``capacity``), I9 (parked means established, watched, nothing queued),
  and the ledger's counts by state and by peer against a recount.
* `assert_dead`: I2 (a closed handle raises ClosedResourceError and
  touches no socket).
* Accessors for the tests that need to reach one socket of a pool (to look
  at its kernel state): `sockets_in`, `idle_sockets`, `parked_sockets`,
  `owned_sockets`, `peer_count`.
* The peers the tests connect to without a server task: `listener` (a
  plain stdlib listening socket) and `silent_address` / `silent_listener`
  (an address whose SYNs the kernel drops).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
from collections import Counter
from typing import TYPE_CHECKING

import pytest
import trio

from trio_recycle._lifecycle import PEER_STATES, State

if TYPE_CHECKING:
    import select
    from collections.abc import Iterator

    from trio_recycle import PoolStatistics, RecyclingStream, RecyclingUDPSocket, SocketPool
    from trio_recycle._pooled_socket import PooledSocket

__all__ = [
    "State",
    "assert_capacity",
    "assert_counts",
    "assert_dead",
    "assert_idle_disconnected",
    "assert_parked_clean",
    "bytes_queued",
    "check_pool",
    "drains_cut",
    "counts_add_up",
    "fd_inodes",
    "idle_sockets",
    "listener",
    "owned_count",
    "owned_sockets",
    "parked_sockets",
    "peer_count",
    "pooled_socket_of",
    "socket_inode",
    "stored_sockets",
    "watch_closed",
    "watch_epoll",
    "silent_address",
    "silent_listener",
    "sockets_in",
    "watching",
]

_IN_USE_STATES = frozenset({State.CONNECTING, State.HANDED, State.IN_USE})
_TCP_ESTABLISHED = 1
_TCP_CLOSE = 7


def fd_inodes() -> dict[int, str]:
    """This process's open descriptors and what each points to (``socket:[inode]``, ...)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed between listdir and readlink
            continue
    return found


def socket_inode(sock: socket.socket) -> str:
    """``socket:[inode]`` of a socket, as /proc/self/fd shows it."""
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


def bytes_queued(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue (FIONREAD)."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


# ----------------------------------------------------------------------
# Peers without a server task


@contextlib.contextmanager
def listener(host: str = "127.0.0.1", *, port: int = 0, backlog: int | None = None) -> Iterator[socket.socket]:
    """A stdlib TCP socket bound to ``(host, port)`` and listening, closed at the end of the block.

    The test accepts (or never accepts) by hand. No option is set: unlike
    `socket.create_server`, no SO_REUSEADDR, which a fresh port never needs.

    Args:
        host: A loopback address; IPv6 when it has a colon.
        port: 0, the default, lets the kernel choose a free port; a given one
            is for a peer that must share its port with a server on another
            loopback address.
        backlog: The ``listen()`` backlog. None means Python's default
            (128 on Linux): room for every test that connects a few sockets
            before it accepts; pass more when it connects more.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, port))
        if backlog is None:
            sock.listen()
        else:
            sock.listen(backlog)
        yield sock


@contextlib.contextmanager
def silent_listener(host: str = "127.0.0.1", port: int = 0) -> Iterator[socket.socket]:
    """A listener whose accept queue is full, so that the kernel drops every SYN sent to it.

    A connect to it gets no SYN-ACK and no RST: it stays in SYN_SENT and
    resends its SYN (at 1 s, 3 s, 7 s, ...) until it times out, the one
    peer whose connect hangs rather than fails. Linux counts an accept queue
    full only once it holds more than the backlog (``sk_acceptq_is_full``),
    so ``listen(0)`` leaves room for one connection: a filler connection
    takes it, and from then on ``tcp_conn_request()`` drops each SYN (with
    or without SYN cookies). ``accept()`` once and there is room again: the
    next SYN resent gets in.

    Args:
        host: A loopback address; IPv6 when it has a colon.
        port: As for `listener`: 0 for a free port, or a server's port to
            give a name a second address with that port.
    """
    with listener(host, port=port, backlog=0) as sock, socket.socket(sock.family) as filler:
        filler.connect(sock.getsockname())
        yield sock


@contextlib.contextmanager
def silent_address(host: str = "127.0.0.1", port: int = 0) -> Iterator[tuple[str, int]]:
    """The ``(host, port)`` of a `silent_listener`: a connect there stays in SYN_SENT for the whole block."""
    with silent_listener(host, port) as sock:
        yield host, sock.getsockname()[1]


# ----------------------------------------------------------------------
# Accessors


def sockets_in(pool: SocketPool, *states: State) -> list[PooledSocket]:
    """The pool's sockets in ``states`` (every owned one when none is given)."""
    return list(pool._ledger.sockets(*states))


def idle_sockets(pool: SocketPool) -> list[socket.socket]:
    """The stdlib sockets stored idle, oldest first."""
    return [psock.sock for psock in pool._store.sockets(parked=False)]


def parked_sockets(pool: SocketPool) -> list[socket.socket]:
    """The stdlib sockets of the parked connections, oldest first."""
    return [psock.sock for psock in pool._store.sockets(parked=True)]


def owned_sockets(pool: SocketPool) -> list[socket.socket]:
    """Every stdlib socket the pool owns, whatever its state."""
    return [psock.sock for psock in pool._ledger.sockets()]


def pooled_socket_of(handle: RecyclingStream | RecyclingUDPSocket) -> PooledSocket:
    """The pool's record of the socket behind a stream or UDP socket (to look at its state or its kernel socket)."""
    return handle._psock


def stored_sockets(pool: SocketPool) -> list[PooledSocket]:
    """The idle sockets and parked connections, least recently stored first (the eviction order)."""
    return pool._store.sockets()


def watch_epoll(pool: SocketPool) -> select.epoll | None:
    """The keep-alive watch's private epoll (None before the first park)."""
    return pool._store._watch._epoll


def watch_closed(pool: SocketPool) -> bool:
    """Whether the keep-alive watch was closed (the pool's exit)."""
    return pool._store._watch.closed


def drains_cut(pool: SocketPool) -> int:
    """Drains that gave way to a waiting task (their sockets closed before the peer's FIN)."""
    return pool._ledger.drains_cut


def peer_count(pool: SocketPool, peer: object) -> int:
    """The sockets the pool counts toward ``peer`` (its capacity_per_peer)."""
    return pool._ledger.per_peer.get(peer, 0)


def watching(pool: SocketPool, psock: PooledSocket) -> bool:
    """Whether the pool's keep-alive watch watches ``psock``."""
    return pool._store.watching(psock)


# ----------------------------------------------------------------------
# Invariants


def assert_idle_disconnected(pool: SocketPool) -> None:
    """I3: every idle socket is disconnected, CLOSE, SO_ERROR 0, empty."""
    for sock in idle_sockets(pool):
        with pytest.raises(OSError) as info:
            sock.getpeername()
        assert info.value.errno == errno.ENOTCONN
        if sock.type == socket.SOCK_STREAM:
            assert _tcp_state(sock) == _TCP_CLOSE
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert bytes_queued(sock) == 0


def assert_parked_clean(pool: SocketPool) -> None:
    """I9: every parked connection is watched, and established with nothing queued unless the watch has it ready.

    It was clean when it was parked (release() looked); a peer can close or
    send at any time after that, and then the watch, level-triggered, has
    the connection ready until its task ends it (and a take that comes
    first looks at it alone). Nothing else is watched.
    """
    for psock in pool._store.sockets(parked=True):
        assert psock.state is State.PARKED, psock
        assert watching(pool, psock)
        if _tcp_state(psock.sock) != _TCP_ESTABLISHED or bytes_queued(psock.sock):
            assert psock.pending(), f"{psock!r}: dirty, and the watch does not have it ready"
    for psock in pool._store.sockets(parked=False):
        assert psock.state is State.IDLE, psock
        assert not watching(pool, psock)


def owned_count(stats: PoolStatistics) -> int:
    """The sockets a pool owns, from its statistics: every state but closed, parked ones included."""
    return stats.idle + stats.in_use + stats.draining + stats.parked


def counts_add_up(stats: PoolStatistics) -> bool:
    """I4 from statistics() alone (no look at /proc: listing it takes a descriptor)."""
    owned = owned_count(stats)
    return owned <= stats.capacity and stats.created - stats.discarded == owned


def assert_counts(stats: PoolStatistics) -> None:
    """`counts_add_up`, as an assertion that shows the statistics."""
    assert counts_add_up(stats), stats


def assert_capacity(pool: SocketPool) -> None:
    """I4: idle + in_use + draining + parked <= capacity, each an open descriptor the pool owns, counted right."""
    stats = pool.statistics()
    assert_counts(stats)
    owned = owned_count(stats)
    socks = sockets_in(pool)
    assert len(socks) == owned, (socks, stats)
    # The ledger's counts against a recount of the states themselves.
    by_state = Counter(psock.state for psock in socks)
    assert State.CLOSED not in by_state
    assert by_state[State.IDLE] == stats.idle == pool._store.idle_count
    assert by_state[State.PARKED] == stats.parked == pool._store.parked_count
    assert by_state[State.DRAINING] == stats.draining
    assert by_state[State.CONNECTING] + by_state[State.HANDED] + by_state[State.IN_USE] == stats.in_use
    peers = Counter(psock.peer for psock in socks if psock.state in PEER_STATES)
    assert dict(peers) == pool._ledger.per_peer
    # Per-peer statistics against the same recount.
    for peer, stats_of_peer in pool.statistics_by_peer().items():
        mine = [psock for psock in socks if psock.peer == peer and psock.state in PEER_STATES]
        assert stats_of_peer.in_use == sum(p.state in _IN_USE_STATES for p in mine), (peer, stats_of_peer)
        assert stats_of_peer.parked == sum(p.state is State.PARKED for p in mine), (peer, stats_of_peer)
        assert stats_of_peer.draining == sum(p.state is State.DRAINING for p in mine), (peer, stats_of_peer)
        assert stats_of_peer.reused + stats_of_peer.kept_alive <= stats_of_peer.opens, (peer, stats_of_peer)
    assert set(peers) <= set(pool.statistics_by_peer())
    open_fds = fd_inodes()
    for psock in socks:
        fd = psock.sock.fileno()
        assert fd in open_fds, psock
        assert open_fds[fd] == socket_inode(psock.sock)


def check_pool(pool: SocketPool) -> None:
    """Every invariant a pool must keep at a checkpoint: I3, I4 (with the recount), I9."""
    assert_capacity(pool)
    assert_idle_disconnected(pool)
    assert_parked_clean(pool)


async def assert_dead(handle: RecyclingStream | RecyclingUDPSocket) -> None:
    """I2: a closed stream or UDP socket raises ClosedResourceError on every call and reaches no socket."""
    from trio_recycle import RecyclingStream

    with pytest.raises(trio.ClosedResourceError):
        handle.getsockname()
    with pytest.raises(trio.ClosedResourceError):
        handle.getpeername()
    with pytest.raises(trio.ClosedResourceError):
        handle.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0)
    if isinstance(handle, RecyclingStream):
        with pytest.raises(trio.ClosedResourceError):
            await handle.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await handle.receive_some(1)
        with pytest.raises(trio.ClosedResourceError):
            await handle.send_eof()
    else:
        with pytest.raises(trio.ClosedResourceError):
            await handle.send(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await handle.receive()
