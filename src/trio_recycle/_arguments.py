"""Every check of an argument a user passes to trio-recycle, each raising an error that names the argument."""

# One place, so that one mistake gets one message wherever it is made: the
# pool's options, an open's host/port/local_address/happy_eyeballs_delay,
# and the per-connection socket options of trio_recycle.httpx all go
# through the functions below.
#
# Numbers. The pool keeps its times as floats (trio's deadlines are
# floats), so an int too large for a float (10**400) would fail with an
# OverflowError deep inside; it is refused here as a ValueError that names
# the argument and says what to write instead (math.inf for "no limit").
#
# Socket options. setsockopt() takes C ints: Python raises TypeError or
# OverflowError for anything wider, and only once a socket exists. And the
# kernel alone knows which (level, option) pairs it accepts: an unknown one
# (ENOPROTOOPT) would fail every open of the pool, long after the mistake,
# with a message about connecting. So the pool tries its options once when
# it opens, on one throwaway TCP socket per address family they apply to,
# and refuses them there, naming the triple.

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Union, cast

# The same per-family and per-type skips as when the pool makes a socket,
# so that the probe tries exactly what the pool will set.
from ._pooled_socket import _FOREIGN_LEVELS_BY_FAMILY, _FOREIGN_LEVELS_BY_TYPE

if TYPE_CHECKING:
    from ._pooled_socket import SocketOption

__all__ = [
    "HttpcoreSocketOption",
    "check_bool",
    "check_capacity",
    "check_httpcore_socket_options",
    "check_number",
    "check_socket_options",
    "probe_socket_options",
    "validate_delay",
    "validate_endpoint",
    "validate_local_address",
]

#: setsockopt() takes C ints (32-bit signed).
C_INT_MIN: Final = -(2**31)
C_INT_MAX: Final = 2**31 - 1

#: httpcore's socket options: ``(level, option, int)``, ``(level, option,
#: bytes)`` and ``(level, option, None, optlen)``, as for
#: :meth:`socket.socket.setsockopt`.
HttpcoreSocketOption = Union[  # noqa: UP007 - a runtime alias, as in httpcore
    tuple[int, int, int],
    tuple[int, int, Union[bytes, bytearray]],  # noqa: UP007
    tuple[int, int, None, int],
]

#: setsockopt() errors that mean "this triple is wrong" rather than "this
#: process may not": ValueError. The others (EPERM for SO_MARK without
#: CAP_NET_ADMIN, ...) stay OSErrors with their errno.
_BAD_OPTION_ERRNOS: Final = frozenset({errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP, errno.EDOM})


def check_bool(name: str, value: object) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {value!r}")


def check_number(name: str, value: object, *, integer: bool, positive: bool = False) -> None:
    """Check a count or a duration: an int (or a float when not ``integer``), >= 0 (> 0 if ``positive``), not NaN.

    Raises:
      TypeError: not an int (or float); a bool is refused.
      ValueError: negative, zero when ``positive``, NaN, or an int too large
          for a float; the message names ``name``.
    """
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, not {value!r}")
    assert isinstance(value, (int, float))
    try:
        float(value)
    except OverflowError:
        instead = "" if integer else " (math.inf means no limit)"
        raise ValueError(f"{name} is too large: {value!r} does not fit a float{instead}") from None
    if math.isnan(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'>' if positive else '>='} 0, not {value!r}")


def check_capacity(capacity: object, capacity_per_peer: object) -> None:
    """Check ``capacity`` (an int >= 1) and ``capacity_per_peer`` (None, or an int from 1 to ``capacity``)."""
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, not {capacity!r}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, not {capacity!r}")
    if capacity_per_peer is None:
        return
    if not isinstance(capacity_per_peer, int) or isinstance(capacity_per_peer, bool):
        raise TypeError(f"capacity_per_peer must be an int or None, not {capacity_per_peer!r}")
    if capacity_per_peer < 1:
        raise ValueError(f"capacity_per_peer must be >= 1 or None, not {capacity_per_peer!r}")
    if capacity_per_peer > capacity:
        # Not clamped: a per-peer bound above the whole pool's is a mistake
        # about one of the two, and the pool cannot tell which.
        raise ValueError(
            f"capacity_per_peer={capacity_per_peer!r} is larger than capacity={capacity!r}: "
            "one peer can never have more sockets than the whole pool (None means no per-peer limit)"
        )


def check_socket_options(socket_options: object) -> tuple[SocketOption, ...]:
    """Check the pool's ``socket_options``: ``(level, option, int | bytes)`` triples, returned as a tuple.

    Raises:
      TypeError: not an iterable, or an entry of another shape.
      ValueError: an int that does not fit a C int.
    """
    return cast("tuple[SocketOption, ...]", _check_options(socket_options, httpcore_shapes=False))


def check_httpcore_socket_options(socket_options: object) -> tuple[HttpcoreSocketOption, ...]:
    """Check httpcore's ``socket_options`` (its three shapes: `HttpcoreSocketOption`), returned as a tuple.

    Raises:
      TypeError: not an iterable, or an entry of none of the three shapes.
      ValueError: an int that does not fit a C int, or a negative optlen.
    """
    return cast("tuple[HttpcoreSocketOption, ...]", _check_options(socket_options, httpcore_shapes=True))


def _check_options(socket_options: object, *, httpcore_shapes: bool) -> tuple[object, ...]:
    # A tuple, in case the options came as an iterator.
    if not isinstance(socket_options, Iterable):
        options = None
    else:
        try:
            options = tuple(socket_options)
        except TypeError:
            options = None
    if options is None:
        shapes = "tuples" if httpcore_shapes else "(level, option, value) triples"
        raise TypeError(f"socket_options must be an iterable of {shapes}, not {socket_options!r}")
    for item in options:
        valid = isinstance(item, tuple) and all(isinstance(part, int) for part in item[:2])
        if valid and len(item) == 3:
            valid = isinstance(item[2], (int, bytes, bytearray) if httpcore_shapes else (int, bytes))
        elif valid and len(item) == 4 and httpcore_shapes:
            valid = item[2] is None and isinstance(item[3], int)
        else:
            valid = False
        if not valid:
            if httpcore_shapes:
                shapes = "(level, option, int), (level, option, bytes) or (level, option, None, optlen)"
            else:
                shapes = "(level: int, option: int, value: int | bytes)"
            raise TypeError(f"socket_options entries must be {shapes}, not {item!r}")
        ints = [part for part in item if isinstance(part, int)]
        if not all(C_INT_MIN <= part <= C_INT_MAX for part in ints) or (len(item) == 4 and ints[-1] < 0):
            raise ValueError(f"socket_options entries must hold C int values (32-bit signed), not {item!r}")
    return options


def _families() -> tuple[int, ...]:
    return (socket.AF_INET, socket.AF_INET6) if socket.has_ipv6 else (socket.AF_INET,)


def probe_socket_options(options: Iterable[SocketOption]) -> None:
    """Set the pool's options on one throwaway TCP socket per family they apply to, then close it.

    The same options are skipped per family as when the pool makes its
    sockets (IPv6 options on IPv4 sockets, UDP options on TCP ones); a
    family the machine lacks (no IPv6) is skipped. UDP sockets are not
    probed: a wrong UDP-only option still fails at `SocketPool.open_udp_socket`.

    Raises:
      ValueError: the kernel does not know the triple (ENOPROTOOPT,
          EINVAL, ...); the message names ``socket_options`` and the triple.
      OSError: the kernel refused it for another reason (EPERM: a
          privileged option), with that errno, naming the same.
    """
    options = tuple(options)
    if not options:
        return
    skip_type = _FOREIGN_LEVELS_BY_TYPE.get(socket.SOCK_STREAM, frozenset())
    for family in _families():
        skip = skip_type | _FOREIGN_LEVELS_BY_FAMILY.get(family, frozenset())
        mine = [option for option in options if option[0] not in skip]
        if not mine:
            continue
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # this family is not available here: nothing to apply the options to
        with sock:
            for option in mine:
                try:
                    sock.setsockopt(*option)
                except OSError as exc:
                    family_name = socket.AddressFamily(family).name
                    message = (
                        f"socket_options entry {option!r} is refused by setsockopt() on an {family_name} "
                        f"TCP socket: {exc.strerror or exc}"
                    )
                    if exc.errno in _BAD_OPTION_ERRNOS:
                        raise ValueError(message) from exc
                    raise OSError(exc.errno, message) from exc


def validate_open(host: object, port: object, happy_eyeballs_delay: object, local_address: object) -> None:
    """Check `SocketPool.open_tcp_stream`'s arguments: the common case at once, else each in full."""
    if (
        type(host) is str
        and type(port) is int
        and 1 <= port <= 65535
        and local_address is None
        and type(happy_eyeballs_delay) is float
        and 0 <= happy_eyeballs_delay < math.inf
        and not host.startswith("[")
    ):
        return  # every keep-alive exchange passes here
    validate_endpoint(host, port)
    validate_delay(happy_eyeballs_delay)
    validate_local_address(local_address)


def validate_endpoint(host: object, port: object) -> None:
    """Check ``host``/``port`` like trio.open_tcp_stream, naming the argument.

    Raises:
      TypeError: host is not str or bytes, or port is not an int.
      ValueError: port is outside 1-65535, or host is a bracketed IPv6
          address (``"[::1]"``): the brackets belong to URLs, not addresses.
    """
    # The common case first, for the keep-alive path's sake: a str host
    # with no bracket and an int port in range.
    if type(host) is str and type(port) is int and 1 <= port <= 65535 and not host.startswith("["):
        return
    if not isinstance(host, (str, bytes)):
        raise TypeError(f"host must be str or bytes, not {host!r}")
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be int, not {port!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in range 1-65535, not {port!r}")
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    if text.startswith("[") and text.endswith("]"):
        raise ValueError(
            f"host {host!r}: brackets are not part of an address, they only set it apart in a URL; pass {text[1:-1]!r}"
        )


_LOCAL_CACHE_SIZE = 512
_local_addresses: set[str] = set()


def validate_local_address(local_address: object) -> None:
    """Check ``local_address``: None, or an IPv4 or IPv6 literal (a scope ID allowed).

    A host name is refused rather than resolved: ``bind()`` would resolve
    it with a blocking lookup inside the event loop. NUL bytes are refused
    because the C library would silently cut the string there.

    Raises:
      TypeError: not a str.
      ValueError: not an IP literal; the message names ``local_address``.
    """
    if local_address is None:
        return
    # Before the cache lookup: an unhashable value would fail there with a
    # message that does not name the argument.
    if not isinstance(local_address, str):
        raise TypeError(f"local_address must be str or None, not {local_address!r}")
    if local_address in _local_addresses:
        return
    if "\x00" not in local_address:
        try:
            socket.getaddrinfo(local_address, 0, flags=socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            pass
        else:
            if len(_local_addresses) >= _LOCAL_CACHE_SIZE:
                _local_addresses.clear()
            _local_addresses.add(local_address)
            return
    brackets = ""
    if local_address.startswith("[") and local_address.endswith("]"):
        brackets = f"; brackets are not part of an address: pass {local_address[1:-1]!r}"
    raise ValueError(
        f"local_address must be an IPv4 or IPv6 address literal such as '127.0.0.1' or '::1', "
        f"not {local_address!r} (a host name is not resolved: bind() would block the event loop){brackets}"
    )


def validate_delay(happy_eyeballs_delay: object) -> None:
    """Check ``happy_eyeballs_delay``: None, or a number >= 0 that is not NaN."""
    if happy_eyeballs_delay is None or (type(happy_eyeballs_delay) is float and 0 <= happy_eyeballs_delay < math.inf):
        return  # None, or a finite float >= 0 (NaN fails the comparison): the common case, at once
    if not isinstance(happy_eyeballs_delay, (int, float)) or isinstance(happy_eyeballs_delay, bool):
        raise TypeError(f"happy_eyeballs_delay must be a number or None, not {happy_eyeballs_delay!r}")
    check_number("happy_eyeballs_delay", happy_eyeballs_delay, integer=False)
