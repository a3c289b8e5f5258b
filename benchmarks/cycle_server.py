"""The server side of bench_cycles.py: answer one request per connection, then close first.

bench_cycles.py starts this script in its own process and drives it through
stdin/stdout, one line each way:

    listen        ->  port <n>              a new listener on 127.0.0.1, port 0
    close <n>     ->  served <count>        stop listening on <n>; connections answered
    (EOF)                                   exit

Every connection is served the same way: read until the request's final
newline, send ``--response-bytes`` bytes, close. Closing first is the point:
it is the case where the client may recycle its socket.

The server is plain stdlib sockets on one epoll loop, so that it costs a few
microseconds per connection and is never what the benchmark measures. With
``TCP_DEFER_ACCEPT`` the kernel hands a connection to ``accept()`` only once
its request has arrived, so almost every connection is accepted, read,
answered and closed without going back to epoll.

Run it by hand with ``python benchmarks/cycle_server.py`` and type
``listen``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import sys
from typing import Final

#: Connections accepted per readiness event before the loop looks at others.
ACCEPT_BATCH: Final = 64
_LISTENER: Final = "listener"
_CONTROL: Final = "control"


class Server:
    """Listeners and half-read connections on one selector."""

    def __init__(self, response: bytes, backlog: int) -> None:
        self.response = response
        self.backlog = backlog
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[int, socket.socket] = {}
        self.served: dict[int, int] = {}
        self.pending: dict[socket.socket, tuple[int, bytes]] = {}
        self.control = b""
        self.running = True

    def listen(self) -> int:
        """Open a new listener on 127.0.0.1 and return its port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError, AttributeError):
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(self.backlog)
        listener.setblocking(False)
        port: int = listener.getsockname()[1]
        self.listeners[port] = listener
        self.served[port] = 0
        self.selector.register(listener, selectors.EVENT_READ, (_LISTENER, port))
        return port

    def close(self, port: int) -> int:
        """Stop listening on ``port``; return how many connections it answered."""
        listener = self.listeners.pop(port)
        self.selector.unregister(listener)
        listener.close()
        for conn, (conn_port, _) in list(self.pending.items()):
            if conn_port == port:
                self.drop(conn)
        return self.served.pop(port)

    def accept(self, listener: socket.socket, port: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED: the client gave up first
                continue
            conn.setblocking(False)
            self.serve(conn, port, b"")

    def serve(self, conn: socket.socket, port: int, received: bytes) -> None:
        """Read what has arrived; answer and close once the request is complete."""
        try:
            while True:
                data = conn.recv(4096)
                if not data:  # the client went away without a request
                    self.drop(conn)
                    return
                received += data
                if received.endswith(b"\n"):
                    break
        except (BlockingIOError, InterruptedError):
            if conn not in self.pending:
                self.selector.register(conn, selectors.EVENT_READ, (conn, port))
            self.pending[conn] = (port, received)
            return
        except OSError:
            self.drop(conn)
            return
        try:
            sent = conn.send(self.response)
            if sent < len(self.response):  # never on a fresh loopback socket
                conn.setblocking(True)
                conn.settimeout(5.0)
                conn.sendall(self.response[sent:])
        except OSError:
            self.drop(conn)
            return
        self.drop(conn)
        if port in self.served:
            self.served[port] += 1

    def drop(self, conn: socket.socket) -> None:
        if self.pending.pop(conn, None) is not None:
            self.selector.unregister(conn)
        conn.close()

    def command(self, line: str) -> str:
        match line.split():
            case ["listen"]:
                return f"port {self.listen()}"
            case ["close", port]:
                return f"served {self.close(int(port))}"
            case _:
                return f"error unknown command {line!r}"

    def read_control(self) -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            self.running = False
            return
        self.control += data
        while b"\n" in self.control:
            line, self.control = self.control.split(b"\n", 1)
            reply = self.command(line.decode())
            os.write(sys.stdout.fileno(), reply.encode() + b"\n")

    def run(self) -> None:
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, (_CONTROL, 0))
        while self.running:
            for key, _ in self.selector.select():
                what, port = key.data
                if what == _CONTROL:
                    self.read_control()
                elif what == _LISTENER:
                    self.accept(self.listeners[port], port)
                else:
                    assert isinstance(what, socket.socket)
                    _, received = self.pending[what]
                    self.serve(what, port, received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--response-bytes", type=int, default=64, help="size of each answer (default: 64)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (default: 4096)")
    args = parser.parse_args()
    response = b"x" * (args.response_bytes - 1) + b"\n"
    Server(response, args.backlog).run()


if __name__ == "__main__":
    main()
