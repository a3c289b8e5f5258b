"""The interop harness's own parts (``interop/``): what its servers serve and how it counts TIME_WAIT."""

from __future__ import annotations

import socket
from typing import Any

from interop import netstat
from interop.apps import asgi, wsgi
from interop.content import body, path_for

from . import checks


async def test_asgi_app_serves_the_body_the_path_names() -> None:
    """The ASGI app answers /d/<n>/<size> with content.body: the check every client makes."""
    path = path_for(5, 1024)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await asgi({"type": "http", "path": path}, receive, send)
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == body(path)
    assert len(body(path)) == 1024
    assert body(path).startswith(path.encode() + b"\n")


def test_wsgi_app_serves_the_same_bytes() -> None:
    """The WSGI app (gunicorn) answers as the ASGI one and the static files do."""
    path = path_for(40, 262144)
    statuses: list[str] = []
    data = b"".join(wsgi({"PATH_INFO": path}, lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"]
    assert data == body(path)
    assert len(data) == 262144


async def test_settle_counts_a_server_time_wait_once_per_connection() -> None:
    """A server that closes first leaves one TIME_WAIT entry, counted on the server's side, and none before."""
    with checks.listener() as listener:
        port = listener.getsockname()[1]
        before = netstat.snapshot(port)
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = listener.accept()
            server.close()
            assert client.recv(1) == b""
            client.close()
        left = await netstat.settle(port, before)
        assert (left.server_time_wait, left.client_time_wait) == (3, 0)
        # Nothing new since: the same entries are not counted again.
        again = await netstat.settle(port, netstat.snapshot(port))
        assert (again.server_time_wait, again.client_time_wait, again.lingering) == (0, 0, {})
