"""How a benchmark measures: rotated, interleaved repeats; medians; ratios paired within a repeat.

Repeats go round every group (a concurrency, an upstream), and the order
of the variants rotates from one group to the next, so that drift on a
busy machine (another job starting, the CPU clocking down) hits every
variant alike. A ratio is reported two ways: of the medians, and the
median of the ratios within each repeat ("paired": the variants of one
repeat ran back to back, so drift that slows them all cancels).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Hashable, Iterable, Sequence

V = TypeVar("V")
G = TypeVar("G")


def rotated(items: Sequence[V], k: int) -> list[V]:
    """``items`` rotated left by ``k`` (modulo their number)."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def plan(repeats: int, groups: Sequence[G], variants: Sequence[V]) -> list[tuple[int, G, V]]:
    """(repeat, group, variant) in measuring order: every repeat goes round all groups, variants rotating."""
    return [
        (repeat, group, variant)
        for repeat in range(repeats)
        for index, group in enumerate(groups)
        for variant in rotated(variants, repeat + index)
    ]


def median(values: Iterable[float]) -> float:
    """The median, 0.0 for nothing."""
    listed = list(values)
    return statistics.median(listed) if listed else 0.0


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(min, max), (0, 0) for nothing."""
    listed = list(values)
    return (min(listed), max(listed)) if listed else (0.0, 0.0)


def paired_ratios(
    values: Iterable[tuple[Hashable, Hashable, float]], variant: Hashable, versus: Hashable
) -> list[float]:
    """``variant``/``versus`` within each repeat, from (repeat, variant, value) triples."""
    by_repeat: dict[Hashable, dict[Hashable, float]] = {}
    for repeat, name, value in values:
        by_repeat.setdefault(repeat, {})[name] = value
    return [v[variant] / v[versus] for v in by_repeat.values() if variant in v and v.get(versus)]


def paired_ratio(
    values: Iterable[tuple[Hashable, Hashable, float]], variant: Hashable, versus: Hashable
) -> float | None:
    """The median of `paired_ratios`, None when no repeat has both."""
    ratios = paired_ratios(values, variant, versus)
    return statistics.median(ratios) if ratios else None
