"""RecyclingUDPSocket: a connected UDP socket from a pool, and its close protocol."""

# What recycling a UDP socket means, from udp_disconnect() ->
# __udp_disconnect() (net/ipv4/udp.c; IPv6 uses the same function), checked
# on Linux 6.18 in tests/test_udp.py:
#
# * The peer is forgotten, and so is the local port, because the pool never
#   binds a port explicitly: the socket is unhashed, a datagram sent to the
#   old port finds no socket (the sender gets ICMP port unreachable), and
#   the next connect() auto-binds a fresh ephemeral port. So no datagram can
#   arrive while the socket is idle.
# * The receive queue is NOT purged. Datagrams that arrived before the
#   disconnect, from the old peer, would be returned by the next owner's
#   recv(). PooledSocket.reset_for_reuse() therefore drains the queue right
#   after the disconnect (invariant I3: an idle socket holds no datagram).
# * sk_bound_dev_if is reset: a pool's SO_BINDTODEVICE is set again.
# * A pending ICMP error (sk_err) survives; reading SO_ERROR clears it.
#
# One gap remains that the kernel leaves open: a softirq on another CPU
# that looked the socket up just before the unhash can still queue its
# datagram after our drain (the hash tables are RCU-protected; the unhash
# does not wait for readers). So a reused socket is drained once more right
# after its new connect(), before anyone can have learned its new port:
# anything queued at that instant is left over from the previous owner.
#
# Errors: a UDP error is about one datagram (EMSGSIZE) or is an ICMP report
# delivered once (ECONNREFUSED after a port unreachable); the socket stays
# usable. So, like trio.socket and unlike a stream, such an OSError is
# raised as it is; only a descriptor that is gone becomes
# trio.ClosedResourceError.
#
# https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/udp.c (__udp_disconnect)
# https://elixir.bootlin.com/linux/v6.18/source/net/ipv6/udp.c (udpv6_prot.disconnect)

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Final, NoReturn, final

import attrs
import trio

from ._close import StreamEnd
from ._errors import CLOSED_ERRNOS, translate_oserror, wrong_run_error
from ._socket_access import DEFAULT_RECEIVE_SIZE, Home, SocketAccess

if TYPE_CHECKING:
    import socket

    from ._pooled_socket import PooledSocket

__all__ = ["RecyclingUDPSocket"]

# As in _stream.py: every public method checks the run first.
_current_trio_token = trio.lowlevel.current_trio_token

# Errors that concern one datagram, or report an ICMP error once; the
# socket is as good as before. Any other error closes it instead of
# recycling it, to be safe.
_DATAGRAM_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EMSGSIZE,
        errno.ENOBUFS,
        errno.EPERM,
        errno.EACCES,
    }
)


@final
@attrs.define(eq=False, repr=False)
class RecyclingUDPSocket(SocketAccess, trio.abc.AsyncResource):
    """A connected UDP socket that came from, and goes back to, a `SocketPool`.

    You do not construct it yourself: `SocketPool.open_udp_socket` returns
    it. It sends datagrams to, and receives datagrams from, the one peer it
    is connected to; the kernel drops datagrams from anybody else.

    Closing it (`aclose`, or leaving ``async with sock:``) disconnects the
    socket with ``connect(AF_UNSPEC)`` and discards every datagram still
    queued on it before the pool reuses it, so the next owner never
    receives a datagram meant for this one. The port is given up too: the
    next owner gets a new one. In the fallback (``recycle=False``, or a
    platform without `can_recycle`) the socket is simply closed.

    The socket is closed the moment `aclose` is called: every later call
    raises `trio.ClosedResourceError` and can never reach the socket's next
    owner, and tasks blocked in `send` or `receive` are woken with
    `trio.ClosedResourceError`.

    Errors follow `trio.socket`, not `trio.abc.Stream`, because a UDP error
    does not break the socket: an ICMP "port unreachable" for an earlier
    datagram is reported once as :exc:`ConnectionRefusedError` by the next
    `send` or `receive`, a datagram too large raises :exc:`OSError`
    ``EMSGSIZE``, and the socket can be used again afterwards.
    """

    _home: Home
    _psock: PooledSocket
    _sock: socket.socket
    _closed: bool = False
    _closed_by_pool: bool = False
    _healthy: bool = True
    #: The pool's run, the only one this socket may be used from.
    _token: trio.lowlevel.TrioToken = attrs.field(factory=_current_trio_token)

    def __repr__(self) -> str:
        return f"<trio_recycle.RecyclingUDPSocket {self._describe()}>"

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one datagram to the connected peer.

        A datagram is sent whole or not at all. When the socket's send
        buffer is full this waits until it is not.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.ClosedResourceError: the socket was closed, before or during
              the call.
          trio.BusyResourceError: another task is already blocked in `send`
              on this socket.
          OSError: the kernel refused the datagram, for example
              :exc:`ConnectionRefusedError` (the peer's port was unreachable
              for an earlier datagram) or ``EMSGSIZE``. The socket stays
              usable.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingUDPSocket")
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        while True:
            if self._closed:
                await trio.lowlevel.cancel_shielded_checkpoint()
                raise self._closed_error()
            try:
                sock.send(data)
            except BlockingIOError:
                await self._wait_on(trio.lowlevel.wait_writable)
            except OSError as exc:
                # A failing call is a checkpoint too, as in trio.socket.
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._raise_for(exc)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return

    async def receive(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        """Wait for the next datagram from the connected peer and return it.

        Args:
          max_bytes: The most bytes returned; the rest of a longer datagram
              is discarded, as with :meth:`socket.socket.recv`. 65536 by
              default, more than any UDP payload, so nothing is cut.

        Returns:
          bytes: one datagram. ``b""`` is an empty datagram, not an end of
          stream: UDP has none.

        Raises:
          RuntimeError: called from a trio.run other than the pool's.
          trio.ClosedResourceError: the socket was closed, before or during
              the call.
          trio.BusyResourceError: another task is already blocked in
              `receive` on this socket.
          OSError: an ICMP error for an earlier datagram, for example
              :exc:`ConnectionRefusedError`. The socket stays usable.
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingUDPSocket")
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
            raise TypeError(f"max_bytes must be an int, not {type(max_bytes).__name__}")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        while True:
            if self._closed:
                await trio.lowlevel.cancel_shielded_checkpoint()
                raise self._closed_error()
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                await self._wait_on(trio.lowlevel.wait_readable)
            except OSError as exc:
                # A failing call is a checkpoint too, as in trio.socket.
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._raise_for(exc)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data

    def _raise_for(self, exc: OSError) -> NoReturn:
        """Raise what a failed send()/recv() means; note if the socket is done for."""
        if exc.errno in CLOSED_ERRNOS:
            raise translate_oserror(exc) from exc
        if exc.errno not in _DATAGRAM_ERRNOS:
            self._healthy = False
        raise exc

    async def aclose(self) -> None:
        """Close the socket and hand it back to the pool.

        The disconnect and the drain of queued datagrams are synchronous, so
        they finish even when this call is cancelled (like every trio
        ``aclose``, it closes even then).
        """
        if _current_trio_token() is not self._token:
            raise wrong_run_error("RecyclingUDPSocket")
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            # UDP has no FIN to wait for: the socket is ready to recycle.
            self._home.return_socket(self._psock, StreamEnd(eof_seen=True, eof_sent=True, healthy=self._healthy))
        await trio.lowlevel.checkpoint()
