"""The harness's tagged server (``python -m netfault.server MODE IDLE_S``), run inside namespace B.

MODE ``close``: one answer per connection, then the server closes first (the
pool's main use). MODE ``keepalive``: answers requests until the client is
silent for IDLE_S seconds, then closes (the idle timeout of an HTTP server).
Listens on 0.0.0.0 port 0 and prints its port.
"""

from __future__ import annotations

import sys

import trio

from .tagged import REQUEST, answer_for, parse_request


async def _read_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


async def handle(stream: trio.SocketStream, mode: str, idle: float) -> None:
    try:
        async with stream:
            while True:
                request = None
                with trio.move_on_after(idle if mode == "keepalive" else 30):
                    request = await _read_exactly(stream, REQUEST.size)
                if request is None:
                    return  # EOF, or idle: close
                tag, size = parse_request(request)
                await stream.send_all(answer_for(tag, size))
                if mode == "close":
                    return
    except trio.BrokenResourceError:
        return


async def main(mode: str, idle: float) -> None:
    listeners = await trio.open_tcp_listeners(0, host="0.0.0.0", backlog=1024)
    print(listeners[0].socket.getsockname()[1], flush=True)

    async def handler(stream: trio.SocketStream) -> None:
        await handle(stream, mode, idle)

    await trio.serve_listeners(handler, listeners)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], float(sys.argv[2]))
