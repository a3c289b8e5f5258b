"""What the kernel says about this process and the machine: descriptors, TIME_WAIT, socket() calls, TCP counters.

Only the standard library: ``tests/conftest.py`` imports the TIME_WAIT
counter from here.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator

FD_DIR: Final = "/proc/self/fd"
#: The kernel's TCP_TIME_WAIT, as /proc/net/tcp{,6} shows it (hex).
TIME_WAIT_STATE: Final = b"06"
#: Seconds a TIME_WAIT entry lives on Linux (TCP_TIMEWAIT_LEN).
TW_LIFETIME: Final = 60.0
#: TcpExt counters whose increase makes some figure doubtful.
WATCHED_COUNTERS: Final = ("TCPTimeWaitOverflow", "ListenOverflows", "ListenDrops")

_TCP_LINE: Final = re.compile(rb"^ *\d+: [0-9A-F]+:([0-9A-F]{4}) [0-9A-F]+:([0-9A-F]{4}) ([0-9A-F]{2}) ", re.MULTILINE)


def count_fds() -> int:
    """Descriptors open in this process (the listing's own included, always)."""
    return len(os.listdir(FD_DIR))


@attrs.define
class FdPeak:
    """The most descriptors seen open; ``sample()`` it, or run ``watch`` in a trio task."""

    peak: int = 0

    def sample(self) -> None:
        self.peak = max(self.peak, count_fds())

    async def watch(self, deadline: float, interval: float = 0.005) -> None:
        """Sample every ``interval`` s until cancelled or ``deadline`` (``time.perf_counter``)."""
        import trio

        while time.perf_counter() < deadline:
            self.sample()
            await trio.sleep(interval)


def time_wait_entries() -> Iterator[tuple[int, int]]:
    """(local port, remote port) of every TIME_WAIT entry in /proc/net/tcp and /proc/net/tcp6."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        for local, remote, state in _TCP_LINE.findall(data):
            if state == TIME_WAIT_STATE:
                yield int(local, 16), int(remote, 16)


def time_wait_count(port: int, remote_ports: Collection[int] | None = None) -> int:
    """TIME_WAIT entries whose local port is ``port`` (a server's side), optionally only of ``remote_ports``.

    Only the local port: a server's entries from earlier connections can
    carry a *remote* port that bind(0) later hands to a new listener, which
    would count them for the wrong server.
    """
    return sum(
        1 for local, remote in time_wait_entries() if local == port and (remote_ports is None or remote in remote_ports)
    )


@attrs.frozen
class TimeWait:
    """TIME_WAIT entries whose local (server side) or remote (client side) port is a port, and in all."""

    server_side: int
    client_side: int
    everywhere: int

    @property
    def total(self) -> int:
        return self.server_side + self.client_side

    @classmethod
    def for_port(cls, port: int | None = None) -> TimeWait:
        server_side = client_side = everywhere = 0
        for local, remote in time_wait_entries():
            everywhere += 1
            if local == port:
                server_side += 1
            elif remote == port:
                client_side += 1
        return cls(server_side, client_side, everywhere)


def tcp_counters() -> dict[str, int]:
    """The WATCHED_COUNTERS from /proc/net/netstat (empty when unreadable)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            pairs = zip(names.split()[1:], values.split()[1:], strict=False)
            found.update({name: int(value) for name, value in pairs if name in WATCHED_COUNTERS})
    return found


def counter_warnings(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """A warning for every WATCHED_COUNTERS entry that grew between two tcp_counters() readings."""
    warnings = []
    for name in WATCHED_COUNTERS:
        grown = after.get(name, 0) - before.get(name, 0)
        if grown:
            what = "TIME_WAIT counts may be low" if name == "TCPTimeWaitOverflow" else "a listen queue overflowed"
            warnings.append(f"TcpExt {name} grew by {grown} during the run (the counter is machine-wide): {what}")
    return warnings


def tw_bucket_limit() -> int | None:
    """net.ipv4.tcp_max_tw_buckets: past it the kernel drops TIME_WAIT entries."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_max_tw_buckets").read_text())
    except (OSError, ValueError):
        return None


async def wait_for_time_wait_room(expected: int, room: float = 0.75) -> None:
    """Wait (bounded: one TIME_WAIT lifetime) until ``expected`` more entries fit under ``room`` of the limit.

    Past ``tcp_max_tw_buckets`` the kernel silently drops new entries, and
    the counts would come out low; so a long run pauses between
    measurements (never inside one) while old entries expire.
    """
    import trio

    limit = tw_bucket_limit()
    if limit is None:
        return
    deadline = time.perf_counter() + TW_LIFETIME + 5
    announced = False
    while time.perf_counter() < deadline:
        present = sum(1 for _ in time_wait_entries())
        if present + expected <= room * limit:
            return
        if not announced:
            print(f"      ({present} TIME_WAIT entries on this machine: pausing while they expire)", flush=True)
            announced = True
        await trio.sleep(1.0)


@attrs.define
class SocketCounter:
    """Counts ``socket.socket()`` constructions through the ``socket.__new__`` audit event.

    An audit hook cannot be removed, so there is one per process
    (`socket_counter`), installed before any measurement: it costs every
    variant the same, one Python call per audited event.
    """

    count: int = 0

    def hook(self, event: str, args: tuple[object, ...]) -> None:
        if event == "socket.__new__":
            self.count += 1


_COUNTER: SocketCounter | None = None


def socket_counter() -> SocketCounter:
    """This process's one SocketCounter, its audit hook installed on first use."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = SocketCounter()
        sys.addaudithook(_COUNTER.hook)
    return _COUNTER


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default) so far."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
