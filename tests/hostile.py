"""Hostile loopback servers for the randomized tests: tagged echoes, resets, floods, silence.

Every server is a real listening socket served by trio's own SocketStream
(never the pool). Each connection that answers at all starts its answer
with a tag ``<N>`` unique in the whole test process, followed by an echo of
what it received (or, for the flood, the tag again and again), so a client
that reads a byte of any other connection can tell (I1). Each connection
records what it received and whether it saw a reset before it had closed
its own side (I7).

Servers answer only after the client has sent something, so a client
socket holds unread data at close only if its own program left it there;
the politeness check relies on that.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = [
    "ALL_KINDS",
    "POLITE_KINDS",
    "Conn",
    "HostileServer",
    "dead_address",
    "start_hostile_server",
]

#: Every behaviour; "dead" is an address where nothing listens.
ALL_KINDS: Final = (
    "echo",
    "answer_close",
    "half_close",
    "close_later",
    "never_close",
    "answer_reset",
    "flood",
    "accept_close",
    "keep_3",
    "dead",
)
#: Kinds whose connections must never see a reset before they have sent
#: their FIN (I7). A half-closing server is reset after its FIN, by design
#: (`Conn.done` is set then). The flood is the one exception: the client
#: closes it with unread data past ``drain_limit``, and the kernel answers
#: that close with a reset, as it would for trio's own SocketStream.
POLITE_KINDS: Final = frozenset(ALL_KINDS) - {"flood", "dead"}
#: How long "close_later" keeps a connection open before closing it.
CLOSE_LATER_DELAY: Final = 1.0

_tags = itertools.count(1)


@attrs.define(eq=False)
class Conn:
    """One accepted connection, as the server saw it."""

    tag: bytes
    peer: object
    received: bytearray = attrs.field(factory=bytearray)
    #: The server has sent its FIN or closed (so a later reset is harmless).
    done: bool = False
    got_eof: bool = False
    #: A reset (ECONNRESET/EPIPE) arrived while the server had not closed.
    reset: bool = False
    #: Any other error the server's side saw.
    errors: list[BaseException] = attrs.field(factory=list)


@attrs.define(eq=False)
class HostileServer:
    """A listening loopback server of one behaviour and every connection it accepted."""

    kind: str
    host: str
    port: int
    conns: list[Conn] = attrs.field(factory=list)
    #: Server-side descriptors open now (accepted and not yet closed).
    open_conns: int = 0
    #: Seconds "never_close" holds a connection after the client's EOF; None: forever.
    hold: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}@{self.port}"


def _is_reset(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    return isinstance(cause, OSError) and cause.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)


async def _read(stream: trio.SocketStream, conn: Conn) -> bytes:
    data = await stream.receive_some(65536)
    if data:
        conn.received += data
    else:
        conn.got_eof = True
    return data


async def _echo_until_eof(stream: trio.SocketStream, conn: Conn) -> None:
    first = await _read(stream, conn)
    if not first:
        return
    await stream.send_all(conn.tag + first)
    while data := await _read(stream, conn):
        await stream.send_all(data)


async def _echo(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    await _echo_until_eof(stream, conn)


async def _answer_close(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    if data := await _read(stream, conn):
        await stream.send_all(conn.tag + data)


async def _answer_reset(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    if data := await _read(stream, conn):
        await stream.send_all(conn.tag + data)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _never_close(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    await _echo_until_eof(stream, conn)
    if server.hold is None:
        await trio.sleep_forever()
    await trio.sleep(server.hold)


async def _half_close(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    if data := await _read(stream, conn):
        await stream.send_all(conn.tag + data)
        await stream.send_eof()
        conn.done = True  # our FIN is out: the recycle's reset is expected
        while await _read(stream, conn):
            pass


async def _flood(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    if await _read(stream, conn):
        block = conn.tag * (65536 // len(conn.tag))
        await stream.send_all(conn.tag)
        while True:
            await stream.send_all(block)


async def _accept_close(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    await trio.lowlevel.checkpoint()


async def _close_later(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    with trio.move_on_after(CLOSE_LATER_DELAY):
        await _echo_until_eof(stream, conn)


#: How many reads "keep_3" echoes before it closes (a keep-alive server's request limit).
KEEP_REQUESTS: Final = 3


async def _keep_3(stream: trio.SocketStream, conn: Conn, server: HostileServer) -> None:
    first = await _read(stream, conn)
    if not first:
        return
    await stream.send_all(conn.tag + first)
    for _ in range(KEEP_REQUESTS - 1):
        data = await _read(stream, conn)
        if not data:
            return
        await stream.send_all(data)


_HANDLERS: Final[dict[str, Callable[[trio.SocketStream, Conn, HostileServer], Awaitable[None]]]] = {
    "echo": _echo,
    "answer_close": _answer_close,
    "answer_reset": _answer_reset,
    "never_close": _never_close,
    "half_close": _half_close,
    "flood": _flood,
    "accept_close": _accept_close,
    "close_later": _close_later,
    "keep_3": _keep_3,
}


def dead_address(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """A bound socket that does not listen, and its port: connecting there is refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


async def start_hostile_server(
    nursery: trio.Nursery, kind: str, host: str = "127.0.0.1", *, hold: float | None = None
) -> HostileServer:
    """Start a server of behaviour ``kind`` in ``nursery`` (not "dead": see `dead_address`)."""
    handler = _HANDLERS[kind]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    await sock.bind((host, 0))
    sock.listen(4096)
    server = HostileServer(kind, host, sock.getsockname()[1], hold=hold)
    listener = trio.SocketListener(sock)

    async def run_one(stream: trio.SocketStream) -> None:
        try:
            peer: object = stream.socket.getpeername()
        except OSError:
            # Reset before this task ran: an idle keep-alive connection the
            # pool ended by the disconnect (I7 as of 0.3) can be one.
            peer = None
        conn = Conn(b"<%d>" % next(_tags), peer)
        server.conns.append(conn)
        if peer is None:
            conn.reset = True
            conn.done = True
            await trio.aclose_forcefully(stream)
            server.open_conns -= 1
            return
        try:
            await handler(stream, conn, server)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if _is_reset(exc):
                if not conn.done:
                    conn.reset = True
            else:
                conn.errors.append(exc)
        finally:
            conn.done = True
            if kind == "answer_reset":
                stream.socket.close()
            else:
                await trio.aclose_forcefully(stream)
            server.open_conns -= 1

    async def accept_loop() -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                server.open_conns += 1
                nursery.start_soon(run_one, stream)

    nursery.start_soon(accept_loop)
    return server
