"""What every server serves, the same bytes whether from a file or from an app.

A request for ``/d/<n>/<size>`` is answered with ``size`` bytes that start
with the path itself and a newline and go on with dots, so that a byte of
another request's answer (cross-talk, I1) shows up as a wrong body. The
static servers serve files written by `write_docroot`; the app servers
(``interop/apps.py``, ``interop/node_server.js``) compute the same bytes.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

#: Distinct paths per body size: enough that a misrouted answer is seen.
PATHS: Final = 32
#: Body sizes requested (1 KiB and 256 KiB, the issue's).
SIZES: Final = (1024, 262144)


def path_for(number: int, size: int) -> str:
    return f"/d/{number % PATHS}/{size}"


def body(path: str) -> bytes:
    """The answer to ``path``: the path, a newline, dots up to the size the path names."""
    head = f"{path}\n".encode()
    size = int(path.rsplit("/", 1)[1])
    return head + b"." * max(0, size - len(head))


def write_docroot(root: Path) -> Path:
    """Write every path's body under ``root/docroot``, readable by a server's unprivileged workers."""
    docroot = root / "docroot"
    for size in SIZES:
        for number in range(PATHS):
            path = path_for(number, size)
            target = docroot / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body(path))
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return docroot


def free_port() -> int:
    """A port the kernel hands out on 127.0.0.1, for servers that cannot report the one they got."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
