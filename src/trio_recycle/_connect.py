"""Connecting pooled sockets: address resolution, happy eyeballs (TCP), first-that-accepts (UDP)."""

# This follows trio.open_tcp_stream (trio/_highlevel_open_tcp_stream.py)
# step for step, so that swapping one for the other changes nothing but
# where the sockets come from:
#
# * getaddrinfo(host, port, type=SOCK_STREAM), then RFC 6555 section 5.4
#   ordering: the first address, then the first address of the other
#   family, then the rest in resolver order.
# * RFC 6555 "happy eyeballs": start the first attempt; whenever an attempt
#   fails, or `happy_eyeballs_delay` seconds pass without one succeeding,
#   start the next; the first to connect wins and the others are cancelled.
# * When every attempt fails, one OSError names each address and its error,
#   chained from an ExceptionGroup of the individual errors (from the one
#   error itself when there was a single address); its errno is theirs
#   when they agree, so `except ConnectionRefusedError` works.
#
# Three differences, all about the pool:
#
# * Each attempt takes its socket from the pool, so an attempt may wait for
#   capacity like any other open. A losing attempt that connected anyway is
#   closed (never recycled: its peer sent no FIN).
# * When the pool is full, a new attempt takes over the place of its own
#   open's oldest attempt still connecting instead of waiting for it.
# * A numeric host (an IP literal) is resolved synchronously with
#   AI_NUMERICHOST, which never touches DNS, and the answer is cached; with
#   a single address there is no nursery, no thread and no Event, which is
#   what keeps the pool's hot path close to a raw socket loop.

from __future__ import annotations

import math
import os
import socket
import sys
from typing import TYPE_CHECKING, Protocol

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

# The argument checks live in _arguments; imported here under their old
# names, which the tests use.
from ._arguments import validate_endpoint as validate_endpoint
from ._arguments import validate_local_address as validate_local_address
from ._close import drain_datagrams
from ._lifecycle import State

if TYPE_CHECKING:
    from ._pooled_socket import OpenKey, PooledSocket

__all__ = [
    "all_failed",
    "connect_pooled",
    "connect_socket",
    "connect_udp",
    "resolve",
    "validate_endpoint",
    "validate_local_address",
]

Target = tuple[int, int, int, object]  # family, type, proto, sockaddr

_NUMERIC_CACHE_SIZE = 512
_numeric_cache: dict[tuple[str | bytes, int, int], list[Target]] = {}


class SocketSource(Protocol):
    """The part of the pool the connection logic uses."""

    async def acquire(
        self,
        family: int,
        type: int,
        proto: int,
        local_address: str | None,
        peer: object,
        *,
        replacing: PooledSocket | None = None,
        origin: OpenKey | None = None,
    ) -> PooledSocket: ...

    def discard_socket(self, psock: PooledSocket) -> None: ...

    @property
    def closed(self) -> bool: ...


def _format_host_port(host: str | bytes, port: int) -> str:
    text = host.decode() if isinstance(host, bytes) else host
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _numeric_targets(host: str | bytes, port: int, type: int) -> list[Target] | None:
    key = (host, port, type)
    cached = _numeric_cache.get(key)
    if cached is not None:
        return cached
    try:
        infos = socket.getaddrinfo(host, port, type=type, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    targets = _unique([(f, t, p, addr) for f, t, p, _, addr in infos])
    if len(_numeric_cache) >= _NUMERIC_CACHE_SIZE:
        _numeric_cache.clear()
    _numeric_cache[key] = targets
    return targets


def _unique(targets: list[Target]) -> list[Target]:
    seen: set[Target] = set()
    result = []
    for target in targets:
        if target not in seen:
            seen.add(target)
            result.append(target)
    return result


def _reorder_for_rfc_6555(targets: list[Target]) -> None:
    # Same as trio's reorder_for_rfc_6555_section_5_4.
    for i in range(1, len(targets)):
        if targets[i][0] != targets[0][0]:
            if i != 1:
                targets.insert(1, targets.pop(i))
            break


async def resolve(host: str | bytes, port: int, type: int) -> list[Target]:
    """Resolve like trio.open_tcp_stream; raise OSError when nothing is found."""
    return await _resolve(host, port, type, _numeric_targets(host, port, type))


async def _resolve(host: str | bytes, port: int, type: int, numeric: list[Target] | None) -> list[Target]:
    """`resolve`, given `_numeric_targets`' answer (None: not an IP literal)."""
    targets = numeric
    if targets is None:
        infos = await trio.socket.getaddrinfo(host, port, type=type)
        targets = _unique([(f, t, p, addr) for f, t, p, _, addr in infos])
        _reorder_for_rfc_6555(targets)
    else:
        targets = list(targets)
        _reorder_for_rfc_6555(targets)
    if not targets:
        raise OSError(f"no results found for hostname lookup: {_format_host_port(host, port)}")
    return targets


async def connect_socket(sock: socket.socket, sockaddr: object) -> None:
    """Non-blocking connect with trio's checkpoint pattern.

    Raises:
      OSError: the connection failed; the message names ``sockaddr``.
      trio.ClosedResourceError: the pool closed the socket meanwhile (its
          exit, or a later happy-eyeballs attempt of the same open took
          over the socket's place in a full pool).
    """
    # Not redundant with acquire_socket's: a task that waited for capacity
    # may have been cancelled after it was handed its socket.
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        sock.connect(sockaddr)  # type: ignore[arg-type]
    except BlockingIOError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, f"Error connecting to {sockaddr!r}: {exc.strerror}") from None
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()
        if sock.fileno() == -1:  # the pool's exit, during that checkpoint
            raise trio.ClosedResourceError("the socket was closed while it was connecting")
        return
    await trio.lowlevel.wait_writable(sock)
    if sock.fileno() == -1:
        # Woken by the connect's completion, then closed by the pool before
        # this task ran: notify_closing() no longer reached us.
        raise trio.ClosedResourceError("the socket was closed while it was connecting")
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Error connecting to {sockaddr!r}: {os.strerror(err)}")


async def _attempt(
    source: SocketSource, target: Target, local_address: str | None, origin: OpenKey | None
) -> PooledSocket:
    family, type, proto, sockaddr = target
    psock = await source.acquire(family, type, proto, local_address, sockaddr, origin=origin)
    if psock.state is State.HANDED:
        return psock  # a released connection of the same open, handed to this waiter
    try:
        await connect_socket(psock.sock, sockaddr)
    except BaseException:
        source.discard_socket(psock)
        raise
    return psock


async def connect_udp(source: SocketSource, host: str | bytes, port: int, *, local_address: str | None) -> PooledSocket:
    """Connect a pooled UDP socket to the first address of ``host:port`` that accepts.

    A UDP connect sends nothing, so there is nothing to race: the addresses
    are tried in resolver order, each failure named in the final OSError.
    """
    targets = await resolve(host, port, socket.SOCK_DGRAM)
    errors: list[tuple[object, OSError]] = []
    for family, type, proto, sockaddr in targets:
        try:
            psock = await source.acquire(family, type, proto, local_address, sockaddr)
        except OSError as exc:
            errors.append((sockaddr, exc))
            continue
        try:
            await connect_socket(psock.sock, sockaddr)
            psock.uses += 1
            # A reused socket: see "One gap remains" in _udp.py.
            if psock.uses > 1 and not drain_datagrams(psock.sock):
                raise OSError(f"datagrams keep arriving at a new port connected to {sockaddr!r}")
        except OSError as exc:
            source.discard_socket(psock)
            errors.append((sockaddr, exc))
            continue
        except BaseException:
            source.discard_socket(psock)
            raise
        return psock
    raise all_failed(host, port, errors) from errors[-1][1]


class _Abandoned(OSError):
    """An attempt whose place in a full pool a later attempt took over."""


def all_failed(host: str | bytes, port: int, errors: list[tuple[object, OSError]]) -> OSError:
    details = "; ".join(f"{addr!r}: {exc}" for addr, exc in errors)
    message = f"all attempts to connect to {_format_host_port(host, port)} failed: {details}"
    # An abandoned attempt has no errno of its own: it does not stop the
    # others' common errno (ECONNREFUSED, say) from being the error's.
    codes = {exc.errno for _, exc in errors if not isinstance(exc, _Abandoned)}
    if len(codes) == 1 and None not in codes:
        return OSError(codes.pop(), message)
    return OSError(message)


async def connect_pooled(
    source: SocketSource,
    host: str | bytes,
    port: int,
    *,
    happy_eyeballs_delay: float | None,
    local_address: str | None,
    origin: OpenKey | None = None,
) -> PooledSocket:
    """Connect a pooled TCP socket to ``host:port``; see SocketPool.open_tcp_stream.

    ``origin``: the open's (host, port, local_address). A task that waits for
    capacity may then be handed a live connection released by a stream of
    the same open (a HANDED socket), which needs no connect.
    """
    # An IP literal resolves synchronously from the cache: no coroutine,
    # no copy, nothing to reorder when there is one address.
    numeric = _numeric_targets(host, port, socket.SOCK_STREAM)
    if numeric is not None and len(numeric) == 1:
        targets = numeric
    else:
        targets = await _resolve(host, port, socket.SOCK_STREAM, numeric)
    if len(targets) == 1:
        try:
            return await _attempt(source, targets[0], local_address, origin)
        except OSError as exc:
            raise all_failed(host, port, [(targets[0][3], exc)]) from exc

    delay = math.inf if happy_eyeballs_delay is None else happy_eyeballs_delay
    winner: PooledSocket | None = None
    errors: list[tuple[object, OSError]] = []
    closed: trio.ClosedResourceError | None = None
    # This open's sockets still connecting, oldest first. When the pool is
    # full, a new attempt takes over the oldest one's place instead of
    # waiting for capacity that only that attempt's failure would free
    # (minutes of SYN retries toward a silent address).
    connecting: list[PooledSocket] = []
    # The attempts of this open still waiting for capacity. When a sibling
    # gets a place and starts connecting, each of them decides again
    # `delay` seconds later: the sibling gets the same head start as any
    # happy-eyeballs attempt, and if its SYN is still unanswered by then,
    # the waiting attempt takes over its place instead of queueing behind
    # it (two attempts queued at a full pool, the first one toward a
    # silent address, used to wait for its SYN retries to end).
    waiting: list[trio.CancelScope] = []

    async def acquire(family: int, type: int, proto: int, sockaddr: object) -> PooledSocket:
        while True:
            replacing = connecting[0] if connecting else None
            with trio.CancelScope() as scope:
                waiting.append(scope)
                try:
                    return await source.acquire(
                        family, type, proto, local_address, sockaddr, replacing=replacing, origin=origin
                    )
                finally:
                    waiting.remove(scope)

    async def attempt(target: Target, failed: trio.Event, nursery: trio.Nursery) -> None:
        nonlocal winner, closed
        family, type, proto, sockaddr = target
        try:
            psock = await acquire(family, type, proto, sockaddr)
            connecting.append(psock)
            deadline = trio.current_time() + delay
            for scope in waiting:
                scope.deadline = min(scope.deadline, deadline)
            try:
                if psock.state is not State.HANDED:
                    await connect_socket(psock.sock, sockaddr)
            except BaseException:
                source.discard_socket(psock)
                raise
            finally:
                connecting.remove(psock)
        except OSError as exc:
            errors.append((sockaddr, exc))
            failed.set()
            return
        except trio.ClosedResourceError as exc:
            if source.closed:
                closed = exc
                nursery.cancel_scope.cancel()
            else:
                errors.append((sockaddr, _Abandoned("abandoned for the next address: the pool had no room for both")))
                failed.set()
            return
        if winner is None:
            winner = psock
            nursery.cancel_scope.cancel()
        else:
            source.discard_socket(psock)

    try:
        async with trio.open_nursery() as nursery:
            for target in targets:
                failed = trio.Event()
                nursery.start_soon(attempt, target, failed, nursery)
                with trio.move_on_after(delay):
                    await failed.wait()
    except BaseException:
        if winner is not None:
            source.discard_socket(winner)
        raise
    if closed is not None:
        raise closed
    if winner is None:
        group = ExceptionGroup("every connection attempt failed", [exc for _, exc in errors])
        raise all_failed(host, port, errors) from group
    return winner
