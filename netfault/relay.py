"""A userspace relay between two TUN devices that delays, jitters, loses, duplicates and reorders packets.

Run as root by netfault/run.py (``python -m netfault.relay CONFIG_JSON
STATS_PATH``): it opens one TUN device per namespace, moves each into its
namespace, addresses it, prints ``ready`` and relays IPv4 packets until
SIGTERM, then writes its counters as JSON to STATS_PATH.
"""

# Why a relay and not netem: this kernel has no sch_netem, and a relay sees
# every packet, so each fault it injects is counted where it happens (the
# harness's own tests compare those counts with the kernel's retransmission
# counters). Faults apply per direction: "ab" is from namespace A (clients)
# to B (server), "ba" the way back. Delay is held in a heap keyed by release
# time; reordering is an extra delay for a fraction of packets, so later
# packets overtake them; a duplicate is a second copy released at once.
#
# The relay also reads TCP flags to count what the pool's politeness rule
# (I7) is about: an RST sent by one side on an established connection (a
# SYN-ACK was delivered) whose peer's FIN that side has not yet received
# ("rst_before_peer_fin"). A SYN without ACK starts a connection's record
# afresh, since 4-tuples are reused; the RST a SYN_SENT socket answers a
# challenge ACK with (RFC 5961 section 4: a new SYN met the peer's old
# socket) is counted apart, as "rst_in_syn_sent".

from __future__ import annotations

import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Final, TypedDict

__all__ = ["Direction", "Relay", "main"]

_TUNSETIFF: Final = 0x400454CA
_IFF_TUN: Final = 0x0001
_IFF_NO_PI: Final = 0x1000
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
ACK: Final = 0x10
_FLAG_NAMES: Final = {"fin": FIN, "syn": SYN, "rst": RST}


class Direction(TypedDict, total=False):
    """The faults of one direction (every field optional; probabilities in [0, 1])."""

    delay_ms: float
    jitter_ms: float
    loss: float
    duplicate: float
    reorder: float
    reorder_ms: float
    drop_flags: dict[str, float]  # "syn" / "fin" / "rst" -> probability of dropping such a packet


def _new_counters() -> dict[str, int]:
    names = ["packets", "bytes", "lost", "duplicated", "reordered", "tcp"]
    for flag in _FLAG_NAMES:
        names += [f"{flag}_seen", f"{flag}_dropped"]
    names += ["rst_before_peer_fin", "rst_in_syn_sent"]
    return dict.fromkeys(names, 0)


def open_tun(name: str) -> int:
    """A TUN device (no packet-info header) in this process's namespace; its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def place_tun(name: str, netns: str, address: str, peer: str) -> None:
    """Move a TUN device into ``netns``, with ``address`` and a host route to ``peer`` only (no route out)."""
    _ip("link", "set", name, "netns", netns)
    _ip("-n", netns, "addr", "add", f"{address}/32", "dev", name)
    _ip("-n", netns, "link", "set", name, "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "route", "add", f"{peer}/32", "dev", name)


class Relay:
    """The relay's state: two fds, the faults per direction, the held packets, the counters."""

    def __init__(self, fd_a: int, fd_b: int, faults: dict[str, Direction], seed: int) -> None:
        self.fds = {"ab": (fd_a, fd_b), "ba": (fd_b, fd_a)}
        self.faults = faults
        self.random = random.Random(seed)
        self.counters = {"ab": _new_counters(), "ba": _new_counters()}
        self._held: list[tuple[float, int, str, bytes]] = []
        self._seq = 0
        # (connection key) -> set of directions whose FIN was delivered.
        self._fins: dict[tuple[bytes, bytes], set[str]] = {}

    def _conn_key(self, packet: bytes, ihl: int) -> tuple[bytes, bytes]:
        a = packet[12:16] + packet[ihl : ihl + 2]
        b = packet[16:20] + packet[ihl + 2 : ihl + 4]
        return (a, b) if a < b else (b, a)

    def _on_delivered(self, direction: str, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 6:
            return
        ihl = (packet[0] & 0x0F) * 4
        flags = packet[ihl + 13]
        key = self._conn_key(packet, ihl)
        if flags & SYN:
            if not flags & ACK:
                self._fins[key] = set()
            else:
                self._fins.setdefault(key, set()).add("established")
        if flags & FIN:
            self._fins.setdefault(key, set()).add(direction)
        if flags & RST:
            other = "ba" if direction == "ab" else "ab"
            seen = self._fins.get(key, set())
            if "established" not in seen:
                self.counters[direction]["rst_in_syn_sent"] += 1
            elif other not in seen:
                self.counters[direction]["rst_before_peer_fin"] += 1

    def _faulty(self, direction: str, packet: bytes) -> list[tuple[float, bytes]]:
        """What to release, and when, for one packet read from a device."""
        faults = self.faults.get(direction, Direction())
        counters = self.counters[direction]
        rnd = self.random
        counters["packets"] += 1
        counters["bytes"] += len(packet)
        if len(packet) >= 20 and packet[0] >> 4 == 4 and packet[9] == 6:
            counters["tcp"] += 1
            flags = packet[(packet[0] & 0x0F) * 4 + 13]
            for name, bit in _FLAG_NAMES.items():
                if flags & bit:
                    counters[f"{name}_seen"] += 1
                    if rnd.random() < faults.get("drop_flags", {}).get(name, 0.0):
                        counters[f"{name}_dropped"] += 1
                        return []
        if rnd.random() < faults.get("loss", 0.0):
            counters["lost"] += 1
            return []
        delay = faults.get("delay_ms", 0.0)
        jitter = faults.get("jitter_ms", 0.0)
        if jitter:
            delay = max(0.0, delay + rnd.uniform(-jitter, jitter))
        if rnd.random() < faults.get("reorder", 0.0):
            counters["reordered"] += 1
            delay += faults.get("reorder_ms", 5.0)
        now = time.monotonic()
        out = [(now + delay / 1000, packet)]
        if rnd.random() < faults.get("duplicate", 0.0):
            counters["duplicated"] += 1
            out.append((now + delay / 1000, packet))
        return out

    def _write(self, direction: str, packet: bytes) -> None:
        try:
            os.write(self.fds[direction][1], packet)
        except OSError:
            return  # a device's queue full or going down: a loss the kernel will repair
        self._on_delivered(direction, packet)

    def run(self, stop: list[bool]) -> None:
        poller = select.epoll()
        by_fd = {fd_in: direction for direction, (fd_in, _) in self.fds.items()}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        with poller:
            while not stop[0]:
                now = time.monotonic()
                while self._held and self._held[0][0] <= now:
                    _, _, direction, packet = heapq.heappop(self._held)
                    self._write(direction, packet)
                timeout = 0.2 if not self._held else max(0.0, self._held[0][0] - now)
                for fd, _ in poller.poll(timeout):
                    direction = by_fd[fd]
                    for _ in range(64):
                        try:
                            packet = os.read(fd, 65536)
                        except BlockingIOError:
                            break
                        for release, copy in self._faulty(direction, packet):
                            if release <= time.monotonic() and not self._held:
                                self._write(direction, copy)
                            else:
                                self._seq += 1
                                heapq.heappush(self._held, (release, self._seq, direction, copy))


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    stats_path = argv[1]
    fd_a = open_tun(config["tun_a"])
    fd_b = open_tun(config["tun_b"])
    place_tun(config["tun_a"], config["ns_a"], config["addr_a"], config["addr_b"])
    place_tun(config["tun_b"], config["ns_b"], config["addr_b"], config["addr_a"])
    relay = Relay(fd_a, fd_b, config.get("faults", {}), config.get("seed", 1))
    stop = [False]

    def on_term(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("ready", flush=True)
    try:
        relay.run(stop)
    finally:
        with open(stats_path, "w") as f:
            json.dump(relay.counters, f)
        os.close(fd_a)
        os.close(fd_b)


if __name__ == "__main__":
    main(sys.argv[1:])
