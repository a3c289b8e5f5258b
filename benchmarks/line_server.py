"""The server side of bench_keepalive.py and bench_scale.py: a fixed answer per request line, never closing first.

Run as ``python benchmarks/line_server.py [--peers N] [--response-bytes B]``:
it listens on N loopback addresses (127.0.0.1, 127.0.0.2, ... 127.0.0.250,
127.0.1.1, ...; port 0 each), prints ``peers <host:port> ...`` and then
``listening on <first host:port>``, and answers every newline-terminated
request line with B bytes (the last one a newline), on one epoll loop with
stdlib sockets, until its stdin closes. It closes a connection only after
the client did: the keep-alive case, where a connection serves exchange
after exchange.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys


def address(i: int) -> str:
    """The ``i``-th loopback address: 127.0.0.1 first, 250 per /24."""
    return f"127.0.{i // 250}.{i % 250 + 1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--response-bytes", type=int, default=64)
    args = parser.parse_args()
    response = b"x" * (args.response_bytes - 1) + b"\n"
    selector = selectors.EpollSelector()
    addresses = []
    for i in range(args.peers):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address(i), 0))
        listener.listen(4096)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, "listener")
        host, port = listener.getsockname()
        addresses.append(f"{host}:{port}")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print("peers " + " ".join(addresses), flush=True)
    print("listening on " + addresses[0], flush=True)
    pending: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if key.data == "stdin":
                return
            assert isinstance(sock, socket.socket)
            if key.data == "listener":
                while True:
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pending[conn] = b""
                    selector.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                selector.unregister(sock)
                del pending[sock]
                sock.close()
                continue
            buffered = pending[sock] + data
            count = buffered.count(b"\n")
            pending[sock] = buffered[buffered.rfind(b"\n") + 1 :]
            if count:
                sock.sendall(response * count)


if __name__ == "__main__":
    main()
