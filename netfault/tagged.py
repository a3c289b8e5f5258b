"""The tagged protocol of the harness: every answer byte says which request it belongs to (I1)."""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["REQUEST", "answer_for", "parse_request", "request_for", "wrong_bytes"]

#: A request: 8-byte tag, 4-byte answer size, big-endian.
REQUEST: Final = struct.Struct("!QI")


def request_for(tag: int, size: int) -> bytes:
    return REQUEST.pack(tag, size)


def parse_request(data: bytes) -> tuple[int, int]:
    tag, size = REQUEST.unpack(data)
    return tag, size


def answer_for(tag: int, size: int) -> bytes:
    """``size`` bytes: the tag's 8 bytes over and over."""
    unit = struct.pack("!Q", tag)
    return (unit * (size // 8 + 1))[:size]


def wrong_bytes(tag: int, data: bytes) -> int:
    """How many bytes of ``data`` (an answer from offset 0) are not the tag's: 0 when I1 holds."""
    expected = answer_for(tag, len(data))
    if data == expected:
        return 0
    return sum(1 for x, y in zip(data, expected, strict=True) if x != y)
