"""Root conftest for httpx's own test suite, written next to it by run_httpx_suite.py.

Runs httpx's async tests under trio and, when ``TRIO_RECYCLE_SWAP=1``, makes
every ``httpx.AsyncHTTPTransport`` an ``httpx.AsyncClient`` creates for
itself a ``RecyclingTransport`` with the same keyword arguments, over a
pool that lives as long as the test's trio run (a system task). Not part of
trio-recycle: a file copied into a temporary checkout of httpx.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import httpx._client
import pytest
import trio

import trio_recycle
from trio_recycle.httpx import RecyclingTransport

SWAP = os.environ.get("TRIO_RECYCLE_SWAP") == "1"
#: Totals over the session, printed at the end.
TOTALS = {"transports": 0, "requests": 0, "created": 0, "reused": 0, "recycled": 0, "in_use_at_exit": 0}
_POOLS: dict[object, trio_recycle.SocketPool] = {}


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def _pool_for_this_run() -> trio_recycle.SocketPool:
    """One pool per trio run, opened in a system task that lives as long as the run."""
    root = trio.lowlevel.current_root_task()
    if root not in _POOLS:
        ready = trio.Event()

        async def keep_pool() -> None:
            async with trio_recycle.open_socket_pool(capacity=128) as pool:
                _POOLS[root] = pool
                ready.set()
                try:
                    await trio.sleep_forever()
                finally:
                    stats = pool.statistics()
                    for name in ("created", "reused", "recycled"):
                        TOTALS[name] += getattr(stats, name)
                    TOTALS["in_use_at_exit"] += stats.in_use
                    del _POOLS[root]

        trio.lowlevel.spawn_system_task(keep_pool)
        await ready.wait()
    return _POOLS[root]


class LazyRecyclingTransport(httpx.AsyncBaseTransport):
    """Built without a pool (AsyncClient makes transports in __init__); the pool is found at the first request."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._transport: RecyclingTransport | None = None
        # Bad arguments fail now, as they would for AsyncHTTPTransport.
        httpx.AsyncHTTPTransport(**kwargs)
        TOTALS["transports"] += 1

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = RecyclingTransport(await _pool_for_this_run(), **self._kwargs)
        TOTALS["requests"] += 1
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


if SWAP:
    httpx._client.AsyncHTTPTransport = LazyRecyclingTransport  # type: ignore[attr-defined,assignment]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SWAP:
        terminalreporter.write_line(f"trio-recycle: {TOTALS}")
