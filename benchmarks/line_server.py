"""The server side of bench_keepalive.py and bench_scale.py: a fixed answer per request line, never closing first.

Run as ``python benchmarks/line_server.py [--peers N] [--response-bytes B]``.
It serves N loopback addresses (127.0.0.1, 127.0.0.2, ... 127.0.0.250,
127.0.1.1, ...), prints ``peers <host:port> ...`` and then ``listening on
<first host:port>``, and answers every newline-terminated request line with
B bytes (the last one a newline), on one epoll loop with stdlib sockets. It
closes a connection only after the client did: the keep-alive case, where a
connection serves exchange after exchange. Commands on stdin, one a line:
``open`` answers ``open <n>``, the connections it holds; EOF ends it.

One peer has a listener of its own on 127.0.0.1. More peers share one
listener on the wildcard address, bound to the loopback device
(SO_BINDTODEVICE "lo": nothing from outside reaches it), port 0: a
connection to 127.x.y.z on that port is accepted whatever x.y.z, so 10,000
peers cost one descriptor, not 10,000 (bench_scale's server must fit, with
16,384 connections, in the machine's RLIMIT_NOFILE).
"""

from __future__ import annotations

import argparse
import os
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
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.peers == 1:
        listener.bind(("127.0.0.1", 0))
    else:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        listener.bind(("0.0.0.0", 0))  # bound to the loopback device above
    listener.listen(4096)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    selector = selectors.EpollSelector()
    selector.register(listener, selectors.EVENT_READ, "listener")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    addresses = [f"{address(i)}:{port}" for i in range(args.peers)]
    print("peers " + " ".join(addresses), flush=True)
    print("listening on " + addresses[0], flush=True)
    pending: dict[socket.socket, bytes] = {}
    commands = b""
    while True:
        for key, _ in selector.select():
            if key.data == "stdin":
                chunk = os.read(sys.stdin.fileno(), 4096)
                if not chunk:
                    return
                commands += chunk
                while b"\n" in commands:
                    line, _, commands = commands.partition(b"\n")
                    if line.strip() == b"open":
                        print(f"open {len(pending)}", flush=True)
                continue
            sock = key.fileobj
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
