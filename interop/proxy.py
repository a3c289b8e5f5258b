"""``examples/reverse_proxy.py`` in front of a server, in each of its modes, under a load of our own.

The proxy runs as its own process with ``--capacity`` `CAPACITY`; the load
comes from `CONNECTIONS` kept-alive client connections (h11), each answer
checked as in ``interop/clients.py``. At the end the proxy gets SIGINT and
prints its counts and its pool's statistics, which are checked to add up.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Final

import h11
import trio

from interop import netstat
from interop.clients import RUN_LIMIT, Outcome, accounting_problems
from interop.content import body, path_for
from interop.servers import ROOT

if TYPE_CHECKING:
    from collections.abc import Sequence

PROXY: Final = ROOT / "examples" / "reverse_proxy.py"
#: The proxy's modes (reverse_proxy.MODES) and their switches.
MODES: Final = {
    "keepalive": [],
    "keepalive-no-recycle": ["--no-recycle"],
    "recycle": ["--no-keepalive"],
    "no-recycle": ["--no-keepalive", "--no-recycle"],
    "plain": ["--plain"],
}
CAPACITY: Final = 16
CONNECTIONS: Final = 16
RECEIVE: Final = 65536


class _ClientError(Exception):
    pass


async def _exchange(stream: trio.SocketStream, conn: h11.Connection, path: str) -> None:
    request = h11.Request(method="GET", target=path, headers=[("Host", "proxy")])
    await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    status = 0
    data = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise _ClientError(f"{type(event).__name__} from the proxy")
    if status != 200:
        raise _ClientError(f"status {status}")
    if data != body(path):
        raise _ClientError(f"wrong body for {path}: {bytes(data[:40])!r}")
    conn.start_next_cycle()


class _Client:
    """One kept-alive connection to the proxy, opened again after a failure."""

    def __init__(self, port: int, outcome: Outcome) -> None:
        self.port = port
        self.outcome = outcome
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, path: str) -> None:
        self.outcome.requests += 1
        try:
            if self.stream is None:
                self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                self.conn = h11.Connection(h11.CLIENT)
            await _exchange(self.stream, self.conn, path)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError, _ClientError) as exc:
            kind = str(exc).split(" ", 2)[0:2] if isinstance(exc, _ClientError) else [type(exc).__name__]
            self.outcome.fail(" ".join(kind), str(exc))
            await self.close()

    async def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.aclose()
        self.stream = None


_FIELD = re.compile(r"(\w+)=(\d+)")


def _parse_report(text: str, outcome: Outcome, mode: str) -> None:
    for line in text.splitlines():
        if line.startswith("proxy:"):
            match = re.search(r"(\d+) retried", line)
            outcome.retried = int(match.group(1)) if match else 0
        elif line.startswith("upstream socket() calls:"):
            outcome.sockets = int(line.rsplit(":", 1)[1])
        elif line.startswith("upstream (") and "PoolStatistics(" in line:
            outcome.stats = {name: int(value) for name, value in _FIELD.findall(line.split("PoolStatistics(", 1)[1])}
    if mode != "plain" and outcome.stats is None:
        outcome.fail("proxy report", f"no pool statistics in {text[-300:]!r}")


async def run_proxy(
    server: str, port: int, mode: str, *, requests: int = 0, pauses: Sequence[float] = (), case: str
) -> Outcome:
    """The proxy in ``mode`` in front of ``port``: ``requests`` GETs (1 KiB), or bursts with ``pauses``."""
    outcome = Outcome(server, f"proxy {mode}", case)
    before = netstat.snapshot(port)
    command = [sys.executable, str(PROXY), "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{port}"]
    command += ["--capacity", str(CAPACITY), *MODES[mode]]
    process = await trio.lowlevel.open_process(
        command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output = bytearray()
    clients: list[_Client] = []
    try:
        with trio.fail_after(RUN_LIMIT + sum(pauses)):
            while b"listening on " not in output or not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some(RECEIVE)
                if not chunk:
                    raise _ClientError(f"the proxy exited: {output.decode(errors='replace')[-300:]}")
                output += chunk
            proxy_port = int(output.decode().split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
            clients = [_Client(proxy_port, outcome) for _ in range(CONNECTIONS)]
            await _load(clients, requests, pauses)
    except trio.TooSlowError:
        outcome.fail("hang", f"run not done within {RUN_LIMIT + sum(pauses):g} s")
    except _ClientError as exc:
        outcome.fail("proxy start", str(exc))
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.close()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            with trio.move_on_after(15):
                while chunk := await process.stdout.receive_some(RECEIVE):
                    output += chunk
                await process.wait()
            if process.poll() is None:
                process.kill()
                outcome.fail("proxy stop", "did not exit within 15 s of SIGINT")
            await process.wait()
            await process.stdout.aclose()
    _parse_report(output.decode(errors="replace"), outcome, mode)
    if process.returncode not in (0, -signal.SIGKILL):
        outcome.fail("proxy exit", f"status {process.returncode}")
    if outcome.stats is not None:
        outcome.accounting = accounting_problems(outcome.stats, None)
    outcome.left = await netstat.settle(port, before)
    return outcome


async def _load(clients: list[_Client], requests: int, pauses: Sequence[float]) -> None:
    if pauses:
        number = 0
        for pause in (None, *pauses):
            if pause is not None:
                await trio.sleep(pause)
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.get, path_for(number, 1024))
                    number += 1
        return
    numbers = iter(range(requests))

    async def worker(client: _Client) -> None:
        for number in numbers:
            await client.get(path_for(number, 1024))

    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(worker, client)
