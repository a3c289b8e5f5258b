"""Tests of the harness itself: the relay's fault decisions, and (as root) faults the kernel sees.

Run by ``nox -s netfault`` before the profile (``pytest netfault/test_harness.py``).
"""

from __future__ import annotations

import os
import struct

import pytest

from .relay import ACK, FIN, RST, SYN, Direction, Relay
from .run import namespaces, one_run, relay, tcp_counters

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root, ip netns and /dev/net/tun"
)


def tcp_packet(flags: int, src: int = 1, dst: int = 2, sport: int = 40000, dport: int = 80) -> bytes:
    """A minimal IPv4 + TCP header (no checksums: the relay never checks them)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, bytes([198, 18, 0, src]), bytes([198, 18, 0, dst]))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 65535, 0, 0)
    return ip + tcp


def relay_with(faults: dict[str, Direction]) -> Relay:
    return Relay(-1, -1, faults, seed=7)


def test_loss_and_duplication_are_counted() -> None:
    """Every packet lost at loss=1, every one doubled at duplicate=1, and the counters say so."""
    lossy = relay_with({"ab": Direction(loss=1.0)})
    assert all(lossy._faulty("ab", tcp_packet(ACK)) == [] for _ in range(10))
    assert lossy.counters["ab"]["lost"] == 10
    doubled = relay_with({"ba": Direction(duplicate=1.0)})
    assert len(doubled._faulty("ba", tcp_packet(ACK))) == 2
    assert doubled.counters["ba"]["duplicated"] == 1
    assert doubled.counters["ab"]["packets"] == 0


def test_flag_drops_hit_only_their_flag() -> None:
    """drop_flags {"fin": 1}: every FIN dropped and counted, a SYN or an ACK passes."""
    r = relay_with({"ab": Direction(drop_flags={"fin": 1.0})})
    assert r._faulty("ab", tcp_packet(FIN | ACK)) == []
    assert len(r._faulty("ab", tcp_packet(SYN))) == 1
    assert len(r._faulty("ab", tcp_packet(ACK))) == 1
    c = r.counters["ab"]
    assert (c["fin_seen"], c["fin_dropped"], c["syn_seen"], c["syn_dropped"]) == (1, 1, 1, 0)


def test_delay_and_reordering_schedule_later_release() -> None:
    """A reordered packet is released after a plain one that came later."""
    r = relay_with({"ab": Direction(delay_ms=10, reorder=1.0, reorder_ms=5)})
    ((late, _),) = r._faulty("ab", tcp_packet(ACK))
    r.faults["ab"] = Direction(delay_ms=10)
    ((early, _),) = r._faulty("ab", tcp_packet(ACK))
    assert early < late
    assert r.counters["ab"]["reordered"] == 1


def test_rst_before_the_peers_fin_is_counted() -> None:
    """An RST counts as impolite until the peer's FIN reached the sender; a new SYN starts over."""
    r = relay_with({})
    client, server = (
        {"src": 1, "dst": 2, "sport": 40000, "dport": 80},
        {"src": 2, "dst": 1, "sport": 80, "dport": 40000},
    )
    r._on_delivered("ab", tcp_packet(SYN, **client))
    r._on_delivered("ab", tcp_packet(RST, **client))  # SYN_SENT answering a challenge ACK
    assert (r.counters["ab"]["rst_before_peer_fin"], r.counters["ab"]["rst_in_syn_sent"]) == (0, 1)
    r._on_delivered("ab", tcp_packet(SYN, **client))
    r._on_delivered("ba", tcp_packet(SYN | ACK, **server))
    r._on_delivered("ab", tcp_packet(RST, **client))
    assert r.counters["ab"]["rst_before_peer_fin"] == 1
    r._on_delivered("ab", tcp_packet(SYN, **client))
    r._on_delivered("ba", tcp_packet(SYN | ACK, **server))
    r._on_delivered("ba", tcp_packet(FIN | ACK, **server))
    r._on_delivered("ab", tcp_packet(RST, **client))
    assert r.counters["ab"]["rst_before_peer_fin"] == 1


def _sum(counters: dict[str, int], *names: str) -> int:
    return sum(counters.get(name, 0) for name in names)


@needs_root
def test_configured_loss_shows_in_the_kernels_retransmissions() -> None:
    """10% loss: the relay counts its drops and the client's kernel retransmits (Tcp RetransSegs)."""
    with namespaces() as ns:
        with relay(ns, {"ab": Direction(loss=0.1), "ba": Direction(loss=0.1)}, seed=3) as counters:
            result = one_run(ns, "control", "cycle", exchanges=100, tasks=8)
        assert result["exchanges"] == 100, result
        assert counters["ab"]["lost"] + counters["ba"]["lost"] > 0
        assert result["client_retrans"] > 0


@needs_root
def test_configured_duplication_shows_in_the_kernels_dsack_counters() -> None:
    """20% duplication: the relay counts its copies and the kernels report duplicate segments (D-SACK)."""
    names = ("TcpExt.TCPDSACKOldSent", "TcpExt.TCPDSACKRecv", "TcpExt.TCPDSACKOfoSent")
    with namespaces() as ns:
        before = [tcp_counters(n) for n in ns]
        with relay(ns, {"ab": Direction(duplicate=0.2), "ba": Direction(duplicate=0.2)}, seed=4) as counters:
            result = one_run(ns, "control", "cycle", exchanges=100, tasks=8)
        after = [tcp_counters(n) for n in ns]
        assert result["exchanges"] == 100, result
        assert counters["ab"]["duplicated"] + counters["ba"]["duplicated"] > 0
        seen = sum(_sum(a, *names) - _sum(b, *names) for a, b in zip(after, before, strict=True))
        assert seen > 0
