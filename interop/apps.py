"""The app servers' applications: an ASGI one (uvicorn, hypercorn) and a WSGI one (gunicorn).

Standard library only, each answering as ``interop/content.py`` says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from interop.content import body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def _answer(path: str) -> tuple[int, bytes]:
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "d" and parts[2].isdigit() and parts[3].isdigit():
        return 200, body(path)
    return 404, b"not found\n"


async def asgi(
    scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    """An ASGI 3 application."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    status, data = _answer(scope["path"])
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def wsgi(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """A WSGI application."""
    status, data = _answer(environ["PATH_INFO"])
    start_response(
        "200 OK" if status == 200 else "404 Not Found",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data)))],
    )
    return [data]
