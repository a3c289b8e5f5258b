"""Every benchmark target, in one table, and its verdict: met, MISSED, or UNSURE.

docs/benchmarks.md carries the same table between two markers;
tests/test_bench_targets.py checks that it equals `docs_block()`, and
``python benchmarks/harness/targets.py`` rewrites it. A target is a bound
on one measured figure; a ratio is measured two ways (of the medians, and
paired within repeats) and met only when both estimates meet it: on a
noisy machine they can disagree, and that is UNSURE, not a verdict.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final, Literal

import attrs

DOCS: Final = Path(__file__).resolve().parent.parent.parent / "docs" / "benchmarks.md"
BEGIN: Final = "<!-- targets: generated from benchmarks/harness/targets.py; do not edit by hand -->"
END: Final = "<!-- end of targets -->"


@attrs.frozen
class Target:
    """``figure op bound`` for one benchmark; ``aim`` is the hoped-for value, reported but not judged."""

    benchmark: str
    key: str
    figure: str
    op: Literal[">=", "<="]
    bound: float
    aim: float | None = None
    unit: str = "x"

    def passes(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def bound_text(self) -> str:
        return f"{self.op} {_number(self.bound)}{self.unit}"


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def _per_tasks(
    benchmark: str, key: str, figure: str, bounds: dict[int, float], aim: float | None = None
) -> list[Target]:
    return [
        Target(benchmark, f"{key}@{tasks}", figure.format(tasks=tasks), ">=", bound, aim)
        for tasks, bound in bounds.items()
    ]


TARGETS: Final[tuple[Target, ...]] = (
    *_per_tasks("cycles", "pool/trio", "pool/trio.open_tcp_stream cycles/s, {tasks} tasks", {1: 1.5, 32: 1.5}, 2.0),
    *_per_tasks("cycles", "pool/raw", "pool/raw trio socket cycles/s, {tasks} tasks", {1: 0.85, 32: 0.85}, 0.95),
    Target("cycles", "socket_per_1000", "socket() calls per 1000 cycles in steady state (pool)", "<=", 0, unit=""),
    Target("cycles", "time_wait", "TIME_WAIT entries left, server closes first (pool)", "<=", 0, unit=""),
    Target("cycles", "fds_over_capacity", "peak descriptors over the pool's capacity", "<=", 4, unit=""),
    *_per_tasks(
        "keepalive", "pool/stream", "pool exchange/held trio.SocketStream exchange, {tasks} tasks", {1: 0.9, 32: 1.0}
    ),
    Target("scale", "cost@4096/64", "exchange cost with 4096 parked connections / with 64", "<=", 1.3),
    *_per_tasks(
        "httpx",
        "close",
        "RecyclingTransport/stock httpx requests/s, closing upstream, {tasks} tasks",
        {1: 1.3, 16: 1.15},
    ),
    *_per_tasks(
        "httpx",
        "keep-alive",
        "RecyclingTransport/stock httpx requests/s, keep-alive upstream, {tasks} tasks",
        {1: 0.95, 16: 0.95},
    ),
    Target("httpx", "time_wait", "TIME_WAIT entries on the closing upstream (pool)", "<=", 0, unit=""),
    Target("httpx", "failed", "failed requests", "<=", 0, unit=""),
    Target("proxy", "closing", "proxy keep-alive + recycling/recycling only, closing upstream", ">=", 0.95),
    Target(
        "proxy", "keepalive", "proxy keep-alive + recycling/keep-alive recycle=False, keep-alive upstream", ">=", 1.0
    ),
    Target("proxy", "nginx-closing", "the same against nginx, keepalive_timeout 0", ">=", 0.95),
    Target("proxy", "nginx-keepalive", "the same against nginx, keepalive_timeout 75s", ">=", 1.0),
    Target("stale", "lost", "requests lost by the pool with the kept_alive retry", "<=", 0, unit=""),
)


def target(benchmark: str, key: str) -> Target:
    """The target ``key`` of ``benchmark`` (KeyError if there is none)."""
    for t in TARGETS:
        if (t.benchmark, t.key) == (benchmark, key):
            return t
    raise KeyError(f"{benchmark}: no target {key!r}")


Result = Literal["met", "MISSED", "UNSURE"]


@attrs.frozen
class Verdict:
    """A target and what was measured for it."""

    benchmark: str
    key: str
    figure: str
    bound: str
    measured: str
    result: Result
    note: str = ""


def judge(t: Target, *estimates: float, measured: str | None = None, note: str = "") -> Verdict:
    """The verdict on ``estimates`` of one figure: met when all pass, MISSED when none does, else UNSURE."""
    passed = sum(t.passes(value) for value in estimates)
    result: Result = "met" if passed == len(estimates) else "MISSED" if passed == 0 else "UNSURE"
    if t.aim is not None and estimates and min(estimates) < t.aim and result == "met":
        note = "; ".join(filter(None, [note, f"aim {_number(t.aim)}{t.unit} not reached"]))
    if measured is None:
        shown = [f"{value:.2f}{t.unit}" if t.unit else f"{value:g}" for value in estimates]
        measured = shown[0] + (f" (paired {shown[1]})" if len(shown) == 2 else "")
    return Verdict(t.benchmark, t.key, t.figure, t.bound_text(), measured, result, note)


def verdict_rows(verdicts: list[Verdict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of a report's targets table."""
    return ["target", "bound", "measured", "result"], [
        [v.figure, v.bound, v.measured, v.result + (f" ({v.note})" if v.note else "")] for v in verdicts
    ]


def docs_block() -> str:
    """The targets table as docs/benchmarks.md shows it, markers included."""
    lines = [BEGIN, "", "| benchmark | target | bound | aim |", "|---|---|---|---|"]
    for t in TARGETS:
        aim = f"{_number(t.aim)}{t.unit}" if t.aim is not None else ""
        lines.append(f"| `bench_{t.benchmark}` | {t.figure} | {t.bound_text()} | {aim} |")
    return "\n".join([*lines, "", END])


def docs_block_in(text: str) -> str | None:
    """The block between the markers in ``text``, markers included; None when absent."""
    start, end = text.find(BEGIN), text.find(END)
    return text[start : end + len(END)] if 0 <= start < end else None


def write_docs(path: Path = DOCS) -> bool:
    """Replace the block in ``path`` with `docs_block`; return whether it changed."""
    text = path.read_text()
    old = docs_block_in(text)
    if old is None:
        raise SystemExit(f"{path}: no targets block ({BEGIN!r} ... {END!r})")
    new = text.replace(old, docs_block())
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    print(f"{DOCS}: {'rewritten' if write_docs() else 'already up to date'}")
    sys.exit(0)
