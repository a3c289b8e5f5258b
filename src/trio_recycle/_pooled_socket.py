"""PooledSocket: one descriptor the pool owns, and how it is made, reset and closed."""

# Everything here is synchronous on purpose. Recycling a socket whose peer
# has already sent its FIN is a handful of system calls with no await in
# between, so no cancellation can ever stop it half way: that is a stronger
# guarantee than running the same calls under a shielded cancel scope.
#
# Socket options and disconnect (checked on Linux 6.x, see
# tests/test_kernel_facts.py): TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE,
# TCP_USER_TIMEOUT, TCP_NOTSENT_LOWAT, SO_RCVBUF, SO_LINGER survive
# tcp_disconnect(); TCP_MAXSEG (tp->rx_opt.user_mss) and TCP_WINDOW_CLAMP
# (tp->window_clamp) are reset to 0. The pool re-applies its own options of
# the second kind after every disconnect.
#
# An option that a user sets through one stream must not reach the socket's
# next user. We restore the options we know to round-trip exactly through
# getsockopt()/setsockopt() (small integers with no kernel-side scaling) and
# refuse to recycle a socket on which anything else was set: SO_RCVBUF and
# SO_SNDBUF read back doubled and lock autotuning once set, SO_LINGER and
# SO_BINDTODEVICE are structures or strings, and unknown options are unknown.
#
# UDP (udp_disconnect() -> __udp_disconnect(), checked on Linux 6.18, see
# tests/test_udp.py) differs in three ways. It drops the peer and, unless
# the address was bound explicitly, the local address; unless the *port*
# was bound explicitly (the pool never does that) it unhashes the socket
# and forgets its port, so from then on no datagram can reach it: a
# datagram sent to the old port finds no socket, and the next connect()
# picks a new ephemeral port. It does NOT purge the receive queue:
# datagrams that arrived before the disconnect are still there and a
# recv() after the next connect() would return them. So we drain the queue
# right after every disconnect. It also resets sk_bound_dev_if, so
# SO_BINDTODEVICE is the UDP option to re-apply (tcp_disconnect() keeps it,
# so a user's SO_BINDTODEVICE on a TCP stream taints the socket). An ICMP
# error pending in sk_err (ECONNREFUSED after a port unreachable) survives
# the disconnect too; reading SO_ERROR clears it, as for TCP.
#
# https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/udp.c (__udp_disconnect)
# https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c (tcp_disconnect)

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Final, Union

import attrs

from ._addresses import format_address
from ._close import drain_datagrams
from ._disconnect import disconnect
from ._in_flight import poller
from ._isn import renew_isn
from ._lifecycle import State
from ._tcp_state import TcpState, tcp_state

if TYPE_CHECKING:
    import select
    from collections.abc import Callable, Iterable

__all__ = ["TCP_DEFAULTS", "OpenKey", "OptionValue", "PoolKey", "PooledSocket", "SocketOption"]

#: A value accepted by ``setsockopt``: an integer or a bytes-like buffer.
OptionValue = Union[int, bytes]  # noqa: UP007 - a runtime alias, `|` needs 3.10+ objects
#: ``(level, option, value)`` as given to ``setsockopt``.
SocketOption = tuple[int, int, OptionValue]
#: What an idle socket must match to be reused: (family, type, proto,
#: local address or None, peer address or None when affinity is off).
PoolKey = tuple[int, int, int, object, object]
#: What a parked live connection must match to be taken: the ``host``,
#: ``port`` and ``local_address`` of the open that made it.
OpenKey = tuple[Union[str, bytes], int, Union[str, None]]  # noqa: UP007 - runtime alias


def _opt(level_name: str, option_name: str) -> tuple[int, int] | None:
    level = getattr(socket, level_name, None)
    option = getattr(socket, option_name, None)
    if level is None or option is None:
        return None  # pragma: no cover - a platform (or old Python) without this option
    return (level, option)


def _opts(*pairs: tuple[str, str]) -> frozenset[tuple[int, int]]:
    found = (_opt(level, name) for level, name in pairs)
    return frozenset(pair for pair in found if pair is not None)


# TCP defaults, the same as trio.SocketStream's (trio issue #72); both
# survive a disconnect, so they are set once per socket, not per use.
TCP_DEFAULTS: Final[tuple[SocketOption, ...]] = tuple(
    (socket.IPPROTO_TCP, option, value)
    for option, value in (
        (socket.TCP_NODELAY, 1),
        (getattr(socket, "TCP_NOTSENT_LOWAT", None), 2**14),
    )
    if option is not None
)
#: Integer options that read back exactly what was set and that we can
#: therefore put back before the socket's next use.
RESTORABLE_OPTIONS: Final = _opts(
    ("SOL_SOCKET", "SO_KEEPALIVE"),
    ("SOL_SOCKET", "SO_OOBINLINE"),
    ("SOL_SOCKET", "SO_PRIORITY"),
    ("SOL_SOCKET", "SO_MARK"),
    ("IPPROTO_TCP", "TCP_NODELAY"),
    ("IPPROTO_TCP", "TCP_CORK"),
    ("IPPROTO_TCP", "TCP_KEEPIDLE"),
    ("IPPROTO_TCP", "TCP_KEEPINTVL"),
    ("IPPROTO_TCP", "TCP_KEEPCNT"),
    ("IPPROTO_TCP", "TCP_USER_TIMEOUT"),
    ("IPPROTO_TCP", "TCP_NOTSENT_LOWAT"),
    ("IPPROTO_TCP", "TCP_QUICKACK"),
    ("IPPROTO_IP", "IP_TOS"),
    ("IPPROTO_IPV6", "IPV6_TCLASS"),
)
# Not restorable although they are small integers: IP_TTL and
# IPV6_UNICAST_HOPS read back 64 when unset (-1, "follow the sysctl"), so
# writing the value read would pin them.

#: Options whose setting changes another option too: Linux's IP_TOS also
#: sets sk_priority (rt_tos2priority). Saving one saves the others first,
#: and the first of a group is restored first, so that the last write of
#: each option is its original value.
_COUPLED: Final[dict[tuple[int, int], tuple[tuple[int, int], ...]]] = {
    tos: (tos, priority)
    for tos in _opts(("IPPROTO_IP", "IP_TOS"), ("IPPROTO_IPV6", "IPV6_TCLASS"))
    for priority in _opts(("SOL_SOCKET", "SO_PRIORITY"))
}
_RESTORE_FIRST: Final = frozenset(_COUPLED)

#: Options that tcp_disconnect() resets by itself.
RESET_BY_TCP_DISCONNECT: Final = _opts(
    ("IPPROTO_TCP", "TCP_MAXSEG"),
    ("IPPROTO_TCP", "TCP_WINDOW_CLAMP"),
)
#: Options that the UDP disconnect resets by itself.
RESET_BY_UDP_DISCONNECT: Final = _opts(
    ("SOL_SOCKET", "SO_BINDTODEVICE"),
)

#: Option levels that do not apply to a socket type, or to a family.
_FOREIGN_LEVELS_BY_TYPE: Final[dict[int, frozenset[int]]] = {
    socket.SOCK_STREAM: frozenset({socket.IPPROTO_UDP}),
    socket.SOCK_DGRAM: frozenset({socket.IPPROTO_TCP}),
}
_FOREIGN_LEVELS_BY_FAMILY: Final[dict[int, frozenset[int]]] = {
    socket.AF_INET: frozenset({socket.IPPROTO_IPV6}),
}


def reset_by_disconnect(type: int) -> frozenset[tuple[int, int]]:
    """The options that the disconnect of a socket of this type resets."""
    if type == socket.SOCK_STREAM:
        return RESET_BY_TCP_DISCONNECT
    if type == socket.SOCK_DGRAM:
        return RESET_BY_UDP_DISCONNECT
    return frozenset()


@attrs.define(eq=False, repr=False)
class PooledSocket:
    """A stdlib socket owned by a pool, with what recycling it needs to know."""

    sock: socket.socket
    key: PoolKey
    #: The pool's options that this socket type's disconnect resets
    #: (`reset_by_disconnect`), re-applied after every disconnect.
    reapply: tuple[SocketOption, ...]
    #: Original values of options a user changed through the current stream.
    saved_options: dict[tuple[int, int], int] = attrs.field(factory=dict)
    #: A user set an option we cannot restore: close instead of recycling.
    tainted: bool = False
    #: A user set an option that only a disconnect undoes (TCP_MAXSEG,
    #: TCP_WINDOW_CLAMP): the live connection must not be parked.
    unparkable: bool = False
    uses: int = 0
    #: Where the socket is in its life; written only by the pool's Ledger.
    state: State = State.CONNECTING
    #: The address the socket is connected (or connecting) to, while it is.
    peer: object = None
    #: The open that made the current connection, for parking it.
    open_key: OpenKey | None = None
    #: Disconnected: the peer whose last connection this socket's next ISN
    #: would continue (write_seq not reset yet); None when it is fresh.
    isn_of: object = None
    #: A poll object of this descriptor alone, made at its first liveness
    #: check (`pending`); the descriptor is the socket's for its whole life.
    _watching: select.poll | None = attrs.field(default=None, init=False)

    def __repr__(self) -> str:
        sock = self.sock
        kind = {socket.SOCK_STREAM: "TCP", socket.SOCK_DGRAM: "UDP"}.get(sock.type, str(sock.type))
        family = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}.get(sock.family, str(sock.family))
        fd = sock.fileno()
        parts = [self.state.name, *([f"fd={fd}"] if fd >= 0 else []), f"{kind}/{family}"]
        peer = self.key[4]
        if peer is not None:
            parts.append(f"peer={format_address(peer)}")
        if self.tainted:
            parts.append("tainted")
        return f"<trio_recycle.PooledSocket {' '.join(parts)}>"

    @classmethod
    def create(
        cls,
        family: int,
        type: int,
        proto: int,
        local_address: str | None,
        options: Iterable[SocketOption],
        key: PoolKey,
        *,
        made: Callable[[], object] | None = None,
    ) -> PooledSocket:
        """Make a non-blocking socket with the pool's options, bound if asked.

        ``made`` is called once ``socket()`` has succeeded (so that every
        ``socket()`` call is counted, even when what follows fails).

        Raises:
          OSError: from ``socket()``, ``setsockopt()`` or ``bind()``; the
              socket is closed before the error propagates.
        """
        sock = socket.socket(family, type, proto)
        if made is not None:
            made()
        try:
            sock.setblocking(False)
            # One pool serves TCP and UDP, IPv4 and IPv6: its TCP options
            # are not for UDP sockets (setsockopt would fail with
            # ENOPROTOOPT), and back, nor its IPv6 options for IPv4 sockets.
            # IPPROTO_IP options do apply to IPv6 sockets (v4-mapped).
            empty: frozenset[int] = frozenset()
            skip = _FOREIGN_LEVELS_BY_TYPE.get(type, empty) | _FOREIGN_LEVELS_BY_FAMILY.get(family, empty)
            options = tuple(o for o in options if o[0] not in skip)
            for level, option, value in options:
                sock.setsockopt(level, option, value)
            if local_address is not None:
                # Same as trio.open_tcp_stream: defer the port choice to
                # connect() so that the 4-tuple, not the 2-tuple, must be
                # unique (https://github.com/python-trio/trio/issues/275).
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
                try:
                    sock.bind((local_address, 0))
                except (OSError, UnicodeError) as exc:
                    code = exc.errno if isinstance(exc, OSError) else None
                    family_name = socket.AddressFamily(family).name
                    message = f"local_address={local_address!r} cannot be bound for {family_name}: {exc}"
                    raise OSError(code, message) from exc
        except BaseException:
            sock.close()
            raise
        reset = reset_by_disconnect(type)
        reapply = tuple(o for o in options if (o[0], o[1]) in reset)
        return cls(sock, key, reapply)

    def note_user_option(self, level: int, option: int, value: object) -> None:
        """Remember how to undo a user's ``setsockopt`` before it happens."""
        pair = (level, option)
        if pair in self.saved_options:
            return
        if pair in reset_by_disconnect(self.sock.type):
            self.unparkable = True
            return
        if pair not in RESTORABLE_OPTIONS or not isinstance(value, int):
            self.tainted = True
            return
        for level, option in _COUPLED.get(pair, (pair,)):
            if (level, option) not in self.saved_options:
                try:
                    self.saved_options[(level, option)] = self.sock.getsockopt(level, option)
                except OSError:
                    self.tainted = True
                    return

    def reset_for_reuse(self) -> bool:
        """Disconnect, verify and restore the socket; True if it may go idle.

        On False the caller must close the socket. Call this only once the
        peer's FIN has arrived (or the socket was never connected): a
        connected TCP socket sends an RST here.
        """
        if self.tainted:
            return False
        sock = self.sock
        try:
            disconnect(sock)
            if sock.type == socket.SOCK_STREAM:
                if tcp_state(sock) is not TcpState.CLOSE:
                    return False  # pragma: no cover - defensive: a successful disconnect leaves CLOSE on Linux
                # The next connect to another peer must draw a fresh ISN
                # (_isn.py): renew_isn() runs then, in `fresh_for`. A
                # connection to the same peer again needs none (it knows
                # its own sequence), so a one-peer pool never pays for it.
                self.isn_of = self.peer
            # Reading SO_ERROR clears the ECONNRESET that tcp_disconnect()
            # leaves behind (for UDP: an ICMP error not yet reported); what
            # the next user sees is then its own.
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if sock.type == socket.SOCK_DGRAM and not drain_datagrams(sock):
                return False
            if self.saved_options:
                self._restore_saved()
            for level, option, value in self.reapply:
                sock.setsockopt(level, option, value)
        except OSError:
            return False
        self.unparkable = False
        return True

    def fresh_for(self, peer: object) -> bool:
        """Before an idle socket connects to ``peer``: reset its ISN if it continues another peer's; False if it fails.

        On False the caller must close the socket: its next ISN is not
        fresh, and it may even still be in repair mode (_isn.py).
        """
        if self.isn_of is None or self.isn_of == peer:
            return True
        self.isn_of = None
        return renew_isn(self.sock)

    def pending(self) -> int:
        """The liveness check of this socket alone: one poll(0), 0 when nothing is there (_in_flight.pending)."""
        watching = self._watching
        if watching is None:
            watching = self._watching = poller(self.sock)
        found = watching.poll(0)  # pending(watching), inlined: the keep-alive path runs it twice per exchange
        return found[0][1] if found else 0

    def restore_options(self) -> bool:
        """Undo a user's options on a live connection before it is parked; True if it may be.

        The restorable options are put back as after a disconnect. An option
        that only a disconnect undoes (`unparkable`) or that cannot be
        restored at all (`tainted`) keeps the connection from being parked.
        """
        if self.tainted or self.unparkable:
            return False
        if self.saved_options:
            try:
                self._restore_saved()
            except OSError:
                return False
        return True

    def _restore_saved(self) -> None:
        saved = sorted(self.saved_options.items(), key=lambda item: item[0] not in _RESTORE_FIRST)
        for (level, option), original in saved:
            self.sock.setsockopt(level, option, original)
        self.saved_options.clear()

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        self.sock.close()
