"""The targets docs/benchmarks.md shows are the harness's table (benchmarks/harness/targets.py), and judged alike."""

from __future__ import annotations

from pathlib import Path

from harness import targets

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def test_docs_show_the_harness_targets() -> None:
    """docs/benchmarks.md holds targets.docs_block() (to rewrite it: python benchmarks/harness/targets.py)."""
    assert targets.docs_block_in(DOCS.read_text()) == targets.docs_block()


def test_every_target_has_a_unique_key() -> None:
    """One (benchmark, key) per target, so that a script's lookup is unambiguous."""
    keys = [(t.benchmark, t.key) for t in targets.TARGETS]
    assert len(keys) == len(set(keys))


def test_a_ratio_is_met_only_when_both_estimates_meet_it() -> None:
    """met / UNSURE / MISSED by how many of the estimates pass; an unreached aim is a note, not a miss."""
    t = targets.target("cycles", "pool/trio@1")
    assert targets.judge(t, 2.1, 2.2).result == "met"
    assert targets.judge(t, 1.6, 1.4).result == "UNSURE"
    assert targets.judge(t, 1.2, 1.4).result == "MISSED"
    assert "aim" in targets.judge(t, 1.6, 1.7).note
    assert targets.judge(targets.target("cycles", "time_wait"), 0).result == "met"
    assert targets.judge(targets.target("cycles", "time_wait"), 3).result == "MISSED"
