"""The AF_UNSPEC disconnect system call and the platform probe."""

# On Linux, connect(2) with an address whose family is AF_UNSPEC "dissolves
# the association" of a connected socket (connect(2), NOTES). For TCP the
# kernel runs tcp_disconnect(): an RST to the peer if the connection is still
# synchronised, queues purged, an auto-bound local port released, state back
# to CLOSE, and sk_err set to ECONNRESET (read once through SO_ERROR). The
# descriptor stays open and can be connect()ed again.
#
# Python's socket.connect() refuses AF_UNSPEC, so we call libc's connect()
# with a zeroed `struct sockaddr` through ctypes.
#
# Other platforms do not give us this: macOS' disconnectx() sends a FIN
# instead of a reset, BSD TCP answers a second connect() with EISCONN, and
# Windows has no equivalent. can_recycle() therefore probes the real kernel
# once, with a full connect / peer-close / disconnect / reconnect cycle on
# loopback, and the pool falls back to plain close() where it fails.
#
# https://man7.org/linux/man-pages/man2/connect.2.html
# https://elixir.bootlin.com/linux/v6.6/source/net/ipv4/tcp.c (tcp_disconnect)

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import warnings
from typing import TYPE_CHECKING, Final, Protocol

from ._tcp_state import TcpState, tcp_state

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["can_recycle", "disconnect"]

#: Set to a true value (``1``, ``true``, ``yes``, ``on``) to make
#: :func:`can_recycle` return False, forcing every pool into its
#: close-instead fallback.
DISABLE_ENV_VAR = "TRIO_RECYCLE_DISABLE"
_TRUE_VALUES: Final = frozenset({"1", "true", "yes", "on"})
_FALSE_VALUES: Final = frozenset({"", "0", "false", "no", "off"})
#: The unrecognised values already warned about: one warning per value,
#: not one per pool.
_warned_values: set[str] = set()


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


# A zeroed struct sockaddr (16 bytes) has sa_family == AF_UNSPEC == 0. The
# kernel only reads it, so one buffer serves every call.
_UNSPEC_SOCKADDR = ctypes.create_string_buffer(16)
# Passing the address as a plain int spares ctypes a conversion per call.
_UNSPEC_ADDRESS = ctypes.addressof(_UNSPEC_SOCKADDR)
_libc_connect: Callable[[int, object, int], int] | None = None


def _load_connect() -> Callable[[int, object, int], int]:
    """Look libc's connect() up (once: `disconnect` calls this only while ``_libc_connect`` is None)."""
    global _libc_connect
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.connect
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
    fn.restype = ctypes.c_int
    _libc_connect = fn
    return fn


def disconnect(sock: _HasFileno) -> None:
    """Disconnect a socket with ``connect(fd, {AF_UNSPEC}, ...)``, keeping it open.

    This is the bare system call: no checks of the connection's state, no
    politeness. A TCP socket that is still connected sends an RST to its peer
    and loses whatever was queued in either direction. Use it on a socket
    whose peer has already sent its FIN, or accept the reset.

    Args:
      sock: A :class:`socket.socket`, a :mod:`trio.socket` socket, or any
          object with a ``fileno()`` method.

    Raises:
      OSError: The call failed; ``errno`` is the kernel's (for example
          ``EBADF`` for a closed socket, ``EOPNOTSUPP`` for a kTLS socket,
          ``EBUSY`` on some 6.4-6.6 kernels while another thread blocks on
          the socket).
    """
    fd = sock.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    if (_libc_connect or _load_connect())(fd, _UNSPEC_ADDRESS, 16) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_probe_result: bool | None = None


def _probe() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with socket.socket() as listener, socket.socket() as client:
            listener.bind(("127.0.0.1", 0))
            listener.listen(2)
            for _ in range(2):
                client.settimeout(2.0)
                client.connect(listener.getsockname())
                server_side, _ = listener.accept()
                server_side.close()
                if client.recv(1) != b"":
                    return False  # pragma: no cover - defensive: the server side closed, the read is EOF
                disconnect(client)
                if tcp_state(client) is not TcpState.CLOSE:
                    return False
                client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                try:
                    client.getpeername()
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        return False  # pragma: no cover - only a kernel whose disconnect misbehaves
                else:  # pragma: no cover - a kernel whose disconnect leaves the peer set
                    return False
    except (OSError, AttributeError):
        return False
    return True


def _disabled_by_environment() -> bool:
    raw = os.environ.get(DISABLE_ENV_VAR, "")
    value = raw.strip().lower()
    if value in _FALSE_VALUES:
        return False
    if value not in _TRUE_VALUES and raw not in _warned_values:
        _warned_values.add(raw)
        warnings.warn(
            f"{DISABLE_ENV_VAR}={raw!r} is not one of 1/0, true/false, yes/no, on/off:"
            " taken as set, so recycling is disabled",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def can_recycle() -> bool:
    """Whether this platform can disconnect and reconnect a socket.

    The first call probes the kernel with a real connection on loopback
    (connect, peer close, :func:`disconnect`, reconnect); later calls return
    the cached answer. Setting the environment variable
    ``TRIO_RECYCLE_DISABLE=1`` (or ``true``, ``yes``, ``on``, in any case)
    makes it return False without probing, which forces every pool into its
    close-instead fallback; ``0``, ``false``, ``no``, ``off`` and the empty
    string mean not set. Any other value also disables recycling, with a
    `RuntimeWarning` (once per value): it is a switch for turning recycling
    off, so a value it cannot read errs on the side of the fallback.

    Returns:
      True on Linux kernels where ``connect(AF_UNSPEC)`` works as described;
      False elsewhere (macOS, the BSDs, Windows) or when disabled.
    """
    global _probe_result
    if _disabled_by_environment():
        return False
    if _probe_result is None:
        _probe_result = _probe()
    return _probe_result
