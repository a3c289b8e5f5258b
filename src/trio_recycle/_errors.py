"""Turning OSError from a socket call into trio's stream exceptions."""

from __future__ import annotations

import errno

import trio

# trio's SocketStream does the same: a descriptor that is gone means the
# resource was closed under us; anything else means the connection broke.
CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def translate_oserror(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """Return the trio exception that stands for ``exc`` (raise it ``from exc``)."""
    if exc.errno in CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def closed_stream_error(*, by_pool: bool = False) -> trio.ClosedResourceError:
    """The error for any call on a stream or socket after its ``aclose``.

    ``by_pool``: it was closed by its pool's exit, not by its own ``aclose``.
    """
    if by_pool:
        return trio.ClosedResourceError(
            "this stream was closed by its pool: the `async with open_socket_pool()` block has exited"
        )
    return trio.ClosedResourceError("this stream was already closed")


def pool_closed_error() -> trio.ClosedResourceError:
    """The error for a call on a pool whose block has exited (a new object each time: it collects a traceback)."""
    return trio.ClosedResourceError("this SocketPool is closed: the `async with open_socket_pool()` block has exited")


def wrong_run_error(what: str) -> RuntimeError:
    """The error for a call from a trio.run other than the pool's."""
    whose = "was opened in another trio.run" if what == "SocketPool" else "belongs to a pool opened in another trio.run"
    return RuntimeError(
        f"this trio_recycle.{what} {whose}: a pool, its streams and its UDP sockets may only be used "
        "from the run (the thread) that opened the pool"
    )


def check_run(token: trio.lowlevel.TrioToken, what: str) -> None:
    """For synchronous methods: raise `wrong_run_error` inside a run that is not ``token``'s.

    Outside any run (a plain thread, or after the run) nothing is checked:
    there is no event loop to confuse.
    """
    try:
        current = trio.lowlevel.current_trio_token()
    except RuntimeError:
        return
    if current is not token:
        raise wrong_run_error(what)
