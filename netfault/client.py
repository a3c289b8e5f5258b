"""The harness's clients (``python -m netfault.client JSON``), run inside namespace A; prints a JSON result.

The JSON argument: ``impl`` (``pool`` or ``control``: trio.open_tcp_stream),
``mode`` (``cycle``: read the answer to the server's EOF; ``early``: close on
the last byte of the answer, the server's FIN close behind; ``abort``:
close right after the request, the answer and the server's FIN on their
way (our FIN crosses the server's); ``keepalive``:
`RecyclingStream.release` after each answer, against a keep-alive server),
``host``, ``port``, ``exchanges``, ``tasks``, ``size``, ``timeout``
(seconds one exchange may take before it counts as a hang).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

import trio_recycle

from .tagged import request_for, wrong_bytes

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

#: An open that takes longer than this waited for a SYN retransmission (1 s).
SLOW_CONNECT: float = 0.9


@attrs.define
class Result:
    exchanges: int = 0
    failures: dict[str, int] = attrs.field(factory=dict)
    wrong_bytes: int = 0
    hangs: int = 0
    slow_connects: int = 0
    retried: int = 0
    durations: list[float] = attrs.field(factory=list)

    def fail(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.failures[name] = self.failures.get(name, 0) + 1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _read_n(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _read_to_eof(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
        if len(data) > limit:
            break
    return bytes(data)


async def run(config: dict[str, Any]) -> dict[str, Any]:
    impl, mode = config["impl"], config["mode"]
    host, port, size = config["host"], int(config["port"]), int(config["size"])
    result = Result()
    tags = iter(range(1, int(config["exchanges"]) + 1))
    fds_before = _fds()
    stats: dict[str, int] = {}

    async def exchange(open_stream: Callable[[], Awaitable[trio.abc.HalfCloseableStream]], tag: int) -> None:
        started = time.monotonic()
        stream = await open_stream()
        if time.monotonic() - started > SLOW_CONNECT:
            result.slow_connects += 1
        try:
            await stream.send_all(request_for(tag, size))
            if mode == "abort":
                await stream.aclose()
                result.durations.append(time.monotonic() - started)
                return
            if mode == "cycle":
                data = await _read_to_eof(stream, size)
            else:
                data = await _read_n(stream, size)
            if len(data) != size:
                raise EOFError(f"{len(data)} of {size} bytes")
        except BaseException:
            await stream.aclose()  # closes at once even when cancelled (trio's rule)
            raise
        result.wrong_bytes += wrong_bytes(tag, data)
        if mode == "keepalive" and isinstance(stream, trio_recycle.RecyclingStream):
            await stream.release()
        else:
            await stream.aclose()
        result.durations.append(time.monotonic() - started)

    async def worker(open_stream: Callable[[], Awaitable[trio.abc.HalfCloseableStream]]) -> None:
        for tag in tags:
            try:
                with trio.fail_after(float(config["timeout"])):
                    try:
                        await exchange(open_stream, tag)
                    except (trio.BrokenResourceError, EOFError):
                        # A kept-alive connection the server closed meanwhile (the stale
                        # race): retried once, as an HTTP client retries an idempotent request.
                        if mode != "keepalive":
                            raise
                        result.retried += 1
                        await exchange(open_stream, tag)
                result.exchanges += 1
            except trio.TooSlowError:
                result.hangs += 1
            except (OSError, trio.BrokenResourceError, EOFError) as exc:
                result.fail(exc)

    tasks = int(config["tasks"])
    if impl == "pool":
        async with trio_recycle.open_socket_pool(capacity=tasks) as pool:

            async def open_pooled() -> trio.abc.HalfCloseableStream:
                return await pool.open_tcp_stream(host, port)

            async with trio.open_nursery() as nursery:
                for _ in range(tasks):
                    nursery.start_soon(worker, open_pooled)
            s = pool.statistics()
            stats = {f.name: getattr(s, f.name) for f in attrs.fields(type(s))}
    else:

        async def open_plain() -> trio.abc.HalfCloseableStream:
            return await trio.open_tcp_stream(host, port)

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker, open_plain)
    durations = sorted(result.durations) or [0.0]
    return {
        "exchanges": result.exchanges,
        "failures": result.failures,
        "failed": sum(result.failures.values()),
        "wrong_bytes": result.wrong_bytes,
        "hangs": result.hangs,
        "slow_connects": result.slow_connects,
        "retried": result.retried,
        "p50_ms": round(1000 * durations[len(durations) // 2], 1),
        "p99_ms": round(1000 * durations[min(len(durations) - 1, int(len(durations) * 0.99))], 1),
        "fd_leak": _fds() - fds_before,
        "pool": stats,
    }


if __name__ == "__main__":
    print(json.dumps(trio.run(run, json.loads(sys.argv[1]))))
