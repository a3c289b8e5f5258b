"""Run every example end to end against local servers; exit 1 if one breaks.

What it shows: how each example is meant to be run, and that it still
works. It starts the servers the examples need on 127.0.0.1 (the
``upstream_server.py`` example, ``python -m http.server``, a port that
refuses connections), runs each example as a subprocess pointed at them,
and checks exit statuses and output, every check bounded in time. ``curl``
is used too when it is installed. An example file that no check covers
fails the run: an example that nothing runs is an example that rots.

Run it (the proxy needs h11, from the ``examples`` extra; ``httpx_fetch.py``
needs the ``httpx`` extra)::

    nox -s examples
    python examples/run_all.py [--only reverse_proxy.py]
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

HERE: Final = Path(__file__).resolve().parent
#: Seconds any one check may take.
CHECK_TIMEOUT: Final = 60.0
#: Seconds a server gets to say it is ready.
START_TIMEOUT: Final = 10.0


class CheckFailed(Exception):
    """An example did not do what it should."""


@attrs.frozen
class Args:
    only: tuple[str, ...]


# ---------------------------------------------------------------------------
# Processes


@attrs.define(eq=False)
class Server:
    """A child process serving on ``host:port`` until the block exits."""

    process: trio.Process
    host: str = ""
    port: int = 0
    output: bytearray = attrs.field(factory=bytearray)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self) -> str:
        """Stop it with SIGINT; return its output; fail unless it exits with 0."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGINT)
        with trio.move_on_after(START_TIMEOUT):
            async for data in self.process.stdout:
                self.output += data
            await self.process.wait()
        text = self.output.decode(errors="replace")
        if self.process.returncode != 0:
            raise CheckFailed(f"{self.process.args!r} exited with {self.process.returncode} after SIGINT: {text}")
        return text


@asynccontextmanager
async def serve(argv: list[str], ready: str, *, quiet: bool = False) -> AsyncIterator[Server]:
    """Start ``argv``; wait until its output matches ``ready`` (groups: host, port).

    ``quiet`` discards what it writes to stderr.
    """
    stderr = subprocess.DEVNULL if quiet else None
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=stderr)
    try:
        server = Server(process)
        assert process.stdout is not None
        with trio.move_on_after(START_TIMEOUT):
            while (match := re.search(ready.encode(), server.output)) is None:
                data = await process.stdout.receive_some(65536)
                if not data:
                    break
                server.output += data
        if match is None:
            raise CheckFailed(f"{argv!r} did not print {ready!r}: {server.output.decode(errors='replace')}")
        server.host, server.port = match[1].decode().strip("[]"), int(match[2])
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def example(script: str, *options: str) -> list[str]:
    return [sys.executable, str(HERE / script), *options]


LISTENING: Final = r"listening on (\S+):(\d+)\n"


@asynccontextmanager
async def upstream_server(*options: str) -> AsyncIterator[Server]:
    async with serve(example("upstream_server.py", "--listen", "127.0.0.1:0", *options), LISTENING) as server:
        yield server


@asynccontextmanager
async def reverse_proxy(upstream: str, *options: str) -> AsyncIterator[Server]:
    argv = example("reverse_proxy.py", "--listen", "127.0.0.1:0", "--upstream", upstream, *options)
    async with serve(argv, LISTENING) as server:
        yield server


async def run(argv: list[str], seconds: float) -> str:
    """Run to completion within ``seconds``; return stdout; fail on a non-zero exit."""
    with trio.fail_after(seconds):
        result = await trio.run_process(argv, capture_stdout=True, check=False)
    text = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise CheckFailed(f"{argv!r} exited with {result.returncode}:\n{text}")
    return text


# ---------------------------------------------------------------------------
# A small HTTP client: raw bytes out, Content-Length-framed responses in


@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(address: str, *requests: bytes) -> list[Response]:
    """Send each request in turn on one connection; return the responses."""
    host, _, port = address.rpartition(":")
    responses = []
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            buffer = bytearray()
            for request in requests:
                await stream.send_all(request)
                responses.append(await read_response(stream, buffer))
    return responses


async def read_response(stream: trio.abc.ReceiveStream, buffer: bytearray) -> Response:
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some()
        if not data:
            raise CheckFailed(f"connection closed before a full response head: {bytes(buffer)!r}")
        buffer += data
    status_line, *lines = buffer[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise CheckFailed(f"response without Content-Length: {status_line} {headers}")
    total = end + 4 + int(headers["content-length"])
    while len(buffer) < total:
        data = await stream.receive_some()
        if not data:
            raise CheckFailed("connection closed in a response body")
        buffer += data
    body = bytes(buffer[end + 4 : total])
    del buffer[:total]
    return Response(int(status_line.split()[1]), headers, body)


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: example", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def expect_clean_exit(report: str) -> None:
    """The proxy's exit report says no upstream socket was in use."""
    expect("in_use=0" in report or "plain" in report, f"upstream sockets still in use at exit:\n{report}")
    expect(" 0 aborted" in report, f"the proxy aborted connections:\n{report}")


# ---------------------------------------------------------------------------
# The checks: one per example, or several


async def check_upstream_server() -> str:
    async with upstream_server("--size", "64") as upstream:
        (got,) = await exchange(upstream.address, get("/hello"))
        (posted,) = await exchange(upstream.address, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        report = await upstream.stop()
    expect(got.status == 200 and got.body.startswith(b"GET /hello\n") and len(got.body) == 64, f"GET: {got}")
    expect(got.headers.get("connection") == "close", f"no Connection: close: {got.headers}")
    expect(posted.body.startswith(b"POST /p\nhello"), f"POST: {posted}")
    expect("served 2 requests" in report, f"report: {report!r}")
    return "GET and POST answered with Connection: close"


async def check_fetcher() -> str:
    async with upstream_server("--size", "256") as upstream:
        output = await run(example("fetcher.py", "--upstream", upstream.address, "--requests", "400"), 60)
        await upstream.stop()
    ratio = re.search(r"pool / trio.open_tcp_stream: ([\d.]+)x", output)
    sockets = re.search(r"socket\(\) calls +(\d+) +(\d+)", output)
    time_wait = re.search(r"TIME_WAIT left on server +(\d+)", output)
    if ratio is None or sockets is None or time_wait is None:
        raise CheckFailed(f"unexpected output:\n{output}")
    expect(int(sockets[1]) <= 16 and int(sockets[2]) == 400, f"socket() calls: {sockets[0]}")
    expect(time_wait[1] == "0", f"the pool left TIME_WAIT on the server: {time_wait[0]}")
    return f"400 requests each way, pool {ratio[1]}x (noisy), {sockets[1]} vs {sockets[2]} socket() calls"


async def check_reverse_proxy() -> str:
    """Keep-alive, bodies, 400, an upstream error status, and curl."""
    async with upstream_server("--size", "100") as upstream, reverse_proxy(upstream.address) as proxy:
        first, second, posted = await exchange(
            proxy.address,
            get("/one"),
            get("/two"),
            b"POST /three HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody",
        )
        expect(first.status == 200 and first.body.startswith(b"GET /one\n"), f"first: {first}")
        expect(second.status == 200 and second.body.startswith(b"GET /two\n"), f"second: {second}")
        expect(posted.status == 200 and posted.body.startswith(b"POST /three\nbody"), f"POST: {posted}")
        (chunked,) = await exchange(
            proxy.address, b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        )
        expect(chunked.status == 411, f"the upstream's 411 for a chunked body should pass through: {chunked}")
        (bad,) = await exchange(proxy.address, b"NONSENSE\r\n\r\n")
        expect(bad.status == 400, f"malformed request: {bad}")
        used_curl = ""
        if shutil.which("curl"):
            url = f"http://{proxy.address}/curl"
            output = await run(["curl", "-sS", "--max-time", "10", url, url], 15)
            expect(output.count("GET /curl\n") == 2, f"curl got {output!r}")
            used_curl = ", curl"
        report = await proxy.stop()
    expect_clean_exit(report)
    expect("PoolStatistics(" in report and "recycled=" in report, f"no pool statistics on exit: {report!r}")
    return f"keep-alive, POST, chunked, 400{used_curl}; {report.splitlines()[-2].split(': ', 1)[1]}"


async def check_reverse_proxy_errors() -> str:
    """502 for a refused connection, 504 for a slow upstream, both on kept-alive connections."""
    with socket.socket() as refusing:
        # Bound but not listening: connections to it are refused at once.
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]
        async with reverse_proxy(f"127.0.0.1:{port}") as proxy:
            responses = await exchange(proxy.address, get("/a"), get("/b"))
            expect([r.status for r in responses] == [502, 502], f"refused upstream: {responses}")
            expect_clean_exit(await proxy.stop())
    async with upstream_server("--delay", "5") as slow, reverse_proxy(slow.address, "--timeout", "0.5") as proxy:
        start = time.monotonic()
        (timed_out,) = await exchange(proxy.address, get("/slow"))
        took = time.monotonic() - start
        expect(timed_out.status == 504 and took < 3, f"slow upstream: {timed_out} after {took:.1f} s")
        expect_clean_exit(await proxy.stop())
    return f"502 twice on one connection, 504 after {took:.1f} s"


async def check_reverse_proxy_http_server() -> str:
    """A real upstream: python -m http.server serving a directory."""
    with tempfile.TemporaryDirectory() as root:
        content = b"served by http.server\n" * 100
        await trio.Path(root, "file.txt").write_bytes(content)
        argv = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", root]
        async with serve(argv, r"Serving HTTP on (\S+) port (\d+)", quiet=True) as upstream:
            async with reverse_proxy(upstream.address) as proxy:
                found, missing, again = await exchange(proxy.address, get("/file.txt"), get("/nope"), get("/file.txt"))
                report = await proxy.stop()
            upstream.process.send_signal(signal.SIGINT)
    expect(found.status == 200 and found.body == content and again.body == content, f"file: {found.status}")
    expect(missing.status == 404, f"missing file: {missing.status}")
    expect_clean_exit(report)
    return "GET 200, 404, 200 on one connection"


async def check_demo() -> str:
    """The four default modes, one short round; and --help explains every mode."""
    output = await run(example("demo.py", "--duration", "1", "--rounds", "1"), 90)
    expect("requests/s through the proxy" in output, f"no table:\n{output}")
    expect("[ok] no failed request" in output, f"failed requests:\n{output}")
    for label in ("recycling only", "keep-alive + recycling"):
        expect(f"[ok] no TIME_WAIT on the upstream with {label}" in output, f"TIME_WAIT left:\n{output}")
    expect("[!!]" not in output, f"a check failed:\n{output}")
    ratio = re.search(r"keep-alive \+ recycling / trio.open_tcp_stream: (\S+) requests/s", output)
    usage = await run(example("demo.py", "--help"), 30)
    for mode in ("plain", "no-recycle", "recycle", "keepalive-no-recycle", "keepalive"):
        expect(f"\n  {mode} " in usage, f"--help does not explain {mode}:\n{usage}")
    words = " ".join(usage.split())
    expect("(default plain,recycle,keepalive-no-recycle,keepalive)" in words, f"--help: --modes default:\n{usage}")
    return f"four modes, no failure, no TIME_WAIT; keep-alive + recycling / plain {ratio[1] if ratio else '?'} (noisy)"


async def check_reverse_proxy_keepalive() -> str:
    """Two keep-alive upstreams in turn: connections kept alive, recycled when an upstream closes."""
    keep = ("--keepalive-requests", "3", "--size", "32")
    async with upstream_server(*keep) as first, upstream_server(*keep) as second:
        argv = ["--upstream", second.address, "--capacity-per-peer", "2"]
        async with reverse_proxy(first.address, *argv) as proxy:
            responses = await exchange(proxy.address, *[get(f"/{number}") for number in range(12)])
            report = await proxy.stop()
        served = [await first.stop(), await second.stop()]
    expect([r.status for r in responses] == [200] * 12, f"statuses: {[r.status for r in responses]}")
    expect(all(r.body.startswith(f"GET /{n}\n".encode()) for n, r in enumerate(responses)), "a body of another request")
    expect(all("served 6 requests" in text for text in served), f"not taken in turn: {served}")
    expect_clean_exit(report)
    stats = re.search(r"created=(\d+).*kept_alive=(\d+)", report)
    # Each upstream closes after 3 requests: per upstream, 6 requests are 2
    # connections of 3, the second on the first one's recycled socket.
    expect(stats is not None and stats[1] == "2" and stats[2] == "8", f"pool statistics: {report}")
    return "12 requests over 2 upstreams, 2 sockets, 8 on kept-alive connections"


async def check_keepalive_client() -> str:
    async with upstream_server("--keepalive-requests", "50") as upstream:
        argv = example("keepalive_client.py", "--upstream", upstream.address, "--requests", "1000")
        output = await run(argv, 60)
        await upstream.stop()
    counts = re.search(r"socket\(\) calls: (\d+), requests on a kept-alive connection: (\d+)", output)
    if counts is None or "0 failed" not in output:
        raise CheckFailed(f"unexpected output:\n{output}")
    expect(int(counts[1]) <= 8, f"more sockets than concurrency: {counts[0]}")
    expect(int(counts[2]) >= 900, f"too few requests on kept-alive connections: {counts[0]}")
    return f"1000 requests, {counts[1]} socket() calls, {counts[2]} on kept-alive connections"


#: Each check, and the example scripts it runs. A new example needs a line
#: here, or the run fails.
async def check_udp_query() -> str:
    """Queries against an in-process UDP echo server; every answer must match its query."""
    async with trio.open_nursery() as nursery:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        async def echo() -> None:
            with sock:
                while True:
                    data, address = await sock.recvfrom(2048)
                    await sock.sendto(b"answer " + data, address)

        nursery.start_soon(echo)
        output = await run(example("udp_query.py", "--upstream", f"127.0.0.1:{port}", "--queries", "500"), 30)
        nursery.cancel_scope.cancel()
    answered = re.search(r"(\d+) of 500 queries answered", output)
    sockets = re.search(r"socket\(\) calls: (\d+)", output)
    if answered is None or sockets is None:
        raise CheckFailed(f"unexpected output:\n{output}")
    expect(answered[1] == "500", f"unanswered queries: {output}")
    expect(int(sockets[1]) <= 32, f"too many socket() calls for capacity 32: {sockets[0]}")
    return f"500 queries answered, {sockets[1]} socket() calls"


async def check_httpx_fetch() -> str:
    """httpx through the pool against the closing upstream: every URL fetched, sockets within the tasks."""
    async with upstream_server("--size", "200") as upstream:
        argv = example("httpx_fetch.py", "--upstream", upstream.address, "--requests", "300", "--tasks", "8")
        output = await run(argv, 60)
        await upstream.stop()
    fetched = re.search(r"fetched (\d+) of 300 URLs", output)
    sockets = re.search(r"socket\(\) calls: (\d+)", output)
    if fetched is None or sockets is None or "PoolStatistics(" not in output:
        raise CheckFailed(f"unexpected output:\n{output}")
    expect(fetched[1] == "300", f"failed fetches:\n{output}")
    expect(int(sockets[1]) <= 16, f"more socket() calls than the pool's capacity: {sockets[0]}")
    return f"300 URLs fetched with httpx, {sockets[1]} socket() calls"


async def check_crawler() -> str:
    """Both server kinds over 20 peers: every answer its own, no TIME_WAIT where the servers close first."""
    summaries, fresh_isns = [], "?"
    for servers in ("close", "keepalive"):
        argv = example("crawler.py", "--peers", "20", "--requests", "600", "--concurrency", "16", "--capacity", "16")
        output = await run([*argv, "--servers", servers], 60)
        ok = re.search(r"(\d+) of 600 requests ok", output)
        fresh = re.search(r"fresh ISNs: (yes|no)", output)
        sockets = re.search(r"socket\(\) calls: (\d+)", output)
        time_wait = re.search(r"TIME_WAIT left: client (-?\d+), servers (-?\d+)", output)
        if ok is None or fresh is None or sockets is None or time_wait is None:
            raise CheckFailed(f"unexpected output:\n{output}")
        fresh_isns = fresh[1]
        expect(ok[1] == "600" and "cross-talk" not in output, f"failed requests:\n{output}")
        expect(time_wait[2] == "0", f"TIME_WAIT left on the servers:\n{output}")
        if servers == "close":
            expect(time_wait[1] == "0", f"TIME_WAIT left on the client:\n{output}")
            # With fresh ISNs any idle socket serves any peer: the pool's
            # capacity bounds the sockets. With affinity, only the peer's own.
            if fresh[1] == "yes":
                expect(int(sockets[1]) <= 32, f"more socket() calls than twice the capacity:\n{output}")
        summaries.append(f"{servers}: {sockets[1]} socket() calls, TIME_WAIT client {time_wait[1]}")
    return f"600 requests over 20 peers each way, fresh ISNs {fresh_isns}; " + ", ".join(summaries)


CHECKS: Final[list[tuple[Callable[[], Awaitable[str]], tuple[str, ...]]]] = [
    (check_upstream_server, ("upstream_server.py",)),
    (check_fetcher, ("fetcher.py",)),
    (check_reverse_proxy, ("reverse_proxy.py",)),
    (check_reverse_proxy_errors, ("reverse_proxy.py",)),
    (check_reverse_proxy_http_server, ("reverse_proxy.py",)),
    (check_reverse_proxy_keepalive, ("reverse_proxy.py", "upstream_server.py")),
    (check_keepalive_client, ("keepalive_client.py",)),
    (check_demo, ("demo.py",)),
    (check_udp_query, ("udp_query.py",)),
    (check_httpx_fetch, ("httpx_fetch.py",)),
    (check_crawler, ("crawler.py",)),
]
#: Scripts that are not examples of their own.
NOT_EXAMPLES: Final = frozenset({"run_all.py"})


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description="Run every example end to end.")
    parser.add_argument("--only", action="append", default=[], metavar="SCRIPT", help="run only checks of SCRIPT")
    return Args(tuple(parser.parse_args(argv).only))


async def main(args: Args) -> None:
    covered = {script for _, scripts in CHECKS for script in scripts}
    present = {path.name for path in HERE.glob("*.py") if not path.name.startswith("_")} - NOT_EXAMPLES
    failures = [f"{name}: no check in run_all.py runs it" for name in sorted(present - covered)]
    for name in failures:
        print(f"FAIL {name}", flush=True)
    for check, scripts in CHECKS:
        if args.only and not set(args.only) & set(scripts):
            continue
        name = check.__name__.removeprefix("check_")
        start = time.monotonic()
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                summary = await check()
        except Exception as exc:
            detail = str(exc) if isinstance(exc, CheckFailed) else traceback.format_exc()
            failures.append(name)
            print(f"FAIL {name} ({time.monotonic() - start:.1f} s): {detail}", flush=True)
        else:
            print(f"ok   {name} ({time.monotonic() - start:.1f} s): {summary}", flush=True)
    if failures:
        print(f"\n{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("\nevery example works", flush=True)


if __name__ == "__main__":
    trio.run(main, parse_args())
