"""TCP states toward one server port, read from /proc/net/tcp and /proc/net/tcp6.

On loopback both ends of a connection are listed: the server's entry has
the server's port as its local port, the client's as its remote port. The
kernel lists TIME_WAIT entries there too (state 06), which is how we tell
which side kept one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from typing import Final

import attrs
import trio

#: /proc/net/tcp's state numbers (include/net/tcp_states.h).
STATES: Final = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


#: /proc/net/tcp's timer field counts clock ticks.
_TICK: Final = 1 / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Entry:
    local: str
    remote: str
    local_port: int
    remote_port: int
    state: str
    #: For a TIME_WAIT entry: when it ends, on `time.monotonic`'s clock.
    ends: float


def entries(port: int) -> list[Entry]:
    """Every TCP entry with ``port`` at either end."""
    found = []
    now = time.monotonic()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                local_port = int(local.rsplit(":", 1)[1], 16)
                remote_port = int(remote.rsplit(":", 1)[1], 16)
                if port in (local_port, remote_port):
                    ends = now + int(fields[5].split(":")[1], 16) * _TICK
                    found.append(Entry(local, remote, local_port, remote_port, STATES.get(state, state), ends))
    return found


@attrs.frozen
class Snapshot:
    """The TIME_WAIT entries toward a port at one moment, by side: 4-tuple -> when it ends."""

    server: dict[tuple[str, str], float]
    client: dict[tuple[str, str], float]

    def new_since(self, before: Snapshot) -> tuple[int, int]:
        """Entries made since ``before``: new 4-tuples, and old ones whose timer started again.

        A 4-tuple can come back within a run (the kernel lets a new
        connection reuse one in TIME_WAIT), so a set difference alone would
        miss the entry it leaves.
        """
        return _new(self.server, before.server), _new(self.client, before.client)


def _new(now: dict[tuple[str, str], float], then: dict[tuple[str, str], float]) -> int:
    return sum(1 for key, ends in now.items() if key not in then or ends > then[key] + 1.0)


def snapshot(port: int) -> Snapshot:
    server: dict[tuple[str, str], float] = {}
    client: dict[tuple[str, str], float] = {}
    for entry in entries(port):
        if entry.state == "TIME_WAIT":
            (server if entry.local_port == port else client)[(entry.local, entry.remote)] = entry.ends
    return Snapshot(server, client)


@attrs.frozen
class Left:
    """What a run left toward a server: new TIME_WAIT entries by side, and sockets still closing."""

    server_time_wait: int
    client_time_wait: int
    #: Entries neither TIME_WAIT nor LISTEN after the wait, by side and state.
    lingering: dict[str, int]


async def settle(port: int, before: Snapshot, *, within: float = 3.0) -> Left:
    """Wait (at most ``within`` seconds) until nothing toward ``port`` is still closing, then count what was left.

    A socket closes in steps the kernel takes after the last system call
    (FIN_WAIT2 to TIME_WAIT when the peer's FIN comes); what is counted is
    the state once they are done, or whatever is still on the way.
    """
    lingering: Counter[str] = Counter()
    # The kernel tells no one when a socket changes state: look again.
    with trio.move_on_after(within):
        while True:
            lingering = Counter(
                f"{'server' if e.local_port == port else 'client'} {e.state}"
                for e in entries(port)
                if e.state not in ("TIME_WAIT", "LISTEN")
            )
            if not lingering:
                break
            await trio.sleep(0.02)
    server, client = snapshot(port).new_since(before)
    return Left(server, client, dict(lingering))
