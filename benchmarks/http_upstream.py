"""The upstream of bench_httpx.py when nginx is not installed: a small HTTP/1.1 server.

    python benchmarks/http_upstream.py --mode close|keep-alive [--size N]

It prints ``listening on 127.0.0.1:PORT`` and serves until SIGTERM/SIGINT.
Every request (a GET without a body) gets the same 200 response of
``--size`` bytes. ``close``: with ``Connection: close``, and the server
closes first, at once; ``keep-alive``: the connection stays open for the
next request until the client closes it.

Plain stdlib sockets on one epoll loop, so that the server costs a few
microseconds per request and is not what the benchmark measures (the same
design as cycle_server.py).
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
from typing import Final

#: Connections accepted per readiness event before the loop looks at others.
ACCEPT_BATCH: Final = 64


def response(size: int, *, close: bool) -> bytes:
    body = b"x" * size
    head = [b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Content-Length: %d" % size]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def serve(mode: str, size: int) -> None:
    close = mode == "close"
    answer = response(size, close=close)
    selector = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if close and hasattr(socket, "TCP_DEFER_ACCEPT"):
        # Hand a connection to accept() only once its request is there.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    buffers: dict[socket.socket, bytes] = {}
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)

    def drop(sock: socket.socket) -> None:
        if sock in buffers:
            selector.unregister(sock)
            del buffers[sock]
        sock.close()

    def handle(sock: socket.socket) -> None:
        """Read what is there; answer each complete request head."""
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            if sock not in buffers:
                buffers[sock] = b""
                selector.register(sock, selectors.EVENT_READ, "conn")
            return
        except OSError:
            drop(sock)
            return
        if not data:
            drop(sock)
            return
        pending = buffers.get(sock, b"") + data
        while (end := pending.find(b"\r\n\r\n")) >= 0:
            pending = pending[end + 4 :]
            try:
                # Small responses: the send buffer always takes them whole.
                sock.sendall(answer)
            except OSError:
                drop(sock)
                return
            if close:
                drop(sock)
                return
        if sock in buffers:
            buffers[sock] = pending
        else:
            buffers[sock] = pending
            selector.register(sock, selectors.EVENT_READ, "conn")

    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running:
        for key, _ in selector.select(timeout=0.5):
            if key.data is None:
                for _ in range(ACCEPT_BATCH):
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    handle(sock)
            else:
                assert isinstance(key.fileobj, socket.socket)
                handle(key.fileobj)
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("close", "keep-alive"), required=True)
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    args = parser.parse_args(argv)
    serve(args.mode, args.size)


if __name__ == "__main__":
    main()
