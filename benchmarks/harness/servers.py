"""One launcher for every child server: the benchmark's servers run in their own process.

A server is a command line. It may print ``listening on HOST:PORT`` when
it accepts connections (``ready=True``), and it may speak a line protocol
on stdin/stdout (`ChildServer.ask`, cycle_server.py's ``listen``). It is
stopped by EOF on stdin and a signal (SIGTERM unless told otherwise), then
killed after a bound. nginx runs through ``nginx_upstream.py``, the same
way, so that its temporary configuration is made and removed in one place.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

HERE: Final = Path(__file__).resolve().parent.parent
NGINX_UPSTREAM: Final = HERE / "nginx_upstream.py"
READY: Final = re.compile(rb"listening on (\S+):(\d+)\n")
#: Seconds a server gets to say it listens, to answer a line, and to stop.
TIMEOUT: Final = 10.0


class ServerError(RuntimeError):
    """A child server did not start, answer or stop as it should."""


@attrs.define(eq=False)
class ChildServer:
    """A server process; ``port`` is the one it announced, if it did."""

    process: subprocess.Popen[bytes]
    port: int = 0
    output: bytes = b""
    stopped: bool = False

    def _read_until(self, pattern: re.Pattern[bytes], what: str, timeout: float = TIMEOUT) -> re.Match[bytes]:
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while (match := pattern.search(self.output)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise ServerError(f"{what}: no answer within {timeout} s; output {self.output[-500:]!r}")
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                raise ServerError(f"{what}: the server exited (status {self.process.poll()}): {self.output[-500:]!r}")
            self.output += chunk
        return match

    def ask(self, line: str) -> str:
        """Send one command line, return the answer line (blocking, between measurements only)."""
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()
        match = self._read_until(re.compile(rb"([^\n]*)\n"), repr(line))
        self.output = self.output[match.end() :]
        return match[1].decode()

    def stop(self, sign: int = signal.SIGTERM) -> bytes:
        """EOF on stdin and ``sign``; kill after TIMEOUT. Returns what it printed that was not read.

        Stopping a stopped server returns the same output again.
        """
        if self.stopped:
            return self.output
        self.stopped = True
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.poll() is None:
            self.process.send_signal(sign)
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
        rest = b""
        if self.process.stdout is not None:
            rest = self.process.stdout.read()
            self.process.stdout.close()
        self.output += rest
        return self.output


@contextlib.contextmanager
def child_server(
    argv: Sequence[str], *, ready: bool = True, stop_signal: int = signal.SIGTERM
) -> Iterator[ChildServer]:
    """Start ``argv``; wait for its ``listening on`` line when ``ready``; stop it on exit."""
    process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    server = ChildServer(process)
    try:
        if ready:
            server.port = int(server._read_until(READY, f"{Path(argv[1]).name} starting")[2])
        yield server
    finally:
        server.stop(stop_signal)


def python_server(script: Path | str, *args: str) -> list[str]:
    """The command line of a Python server script (or ``-c`` code) under this interpreter."""
    if isinstance(script, Path):
        return [sys.executable, str(script), *args]
    return [sys.executable, "-c", script, *args]


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or in /usr/sbin (not on a normal user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_server(*args: str) -> list[str]:
    """The command line of nginx_upstream.py (``--keepalive-timeout``, ``--size``, ... in ``args``)."""
    return python_server(NGINX_UPSTREAM, "--listen", "127.0.0.1:0", *args)
