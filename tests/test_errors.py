"""OSError from a socket call mapped the way trio.SocketStream maps it."""

from __future__ import annotations

import errno

import pytest
import trio

from trio_recycle._errors import closed_stream_error, translate_oserror


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOTSOCK])
def test_gone_descriptor_means_closed(code: int) -> None:
    """EBADF/ENOTSOCK: the resource was closed under us."""
    assert isinstance(translate_oserror(OSError(code, "x")), trio.ClosedResourceError)


@pytest.mark.parametrize("code", [errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, None])
def test_anything_else_means_broken(code: int | None) -> None:
    """Any other error: the connection broke, and the message keeps the original."""
    error = translate_oserror(OSError(code, "boom"))
    assert isinstance(error, trio.BrokenResourceError)
    assert "boom" in str(error)


def test_closed_stream_error_says_closed() -> None:
    """The error for calls after aclose names the cause."""
    assert "closed" in str(closed_stream_error())
