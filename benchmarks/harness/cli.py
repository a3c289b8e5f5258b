"""One command-line shape for every benchmark: ``--quick``, ``--repeats``, ``--out``, ``--from-json``.

A script gives its own arguments and three functions: settings from the
arguments, ``measure(settings) -> document`` and ``render(document) ->
Report``; `main` does the rest (Linux check, measuring or loading, writing,
the exit status).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from . import report as _report

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

RESULTS: Final = Path(__file__).resolve().parent.parent / "results"
S = TypeVar("S")


class _Parser(argparse.ArgumentParser):
    # The one signature of the overloaded parse_args that the scripts use.
    def parse_args(self, args: Sequence[str] | None = None, namespace: None = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if parsed.out is None:
            # A smoke run never overwrites the results the docs quote.
            parsed.out = RESULTS / "quick" if parsed.quick else RESULTS
        return parsed


def parser(doc: str | None, *, quick: str, repeats: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the four common options; the script adds its own."""
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a smoke run of seconds: {quick}")
    p.add_argument("--repeats", type=int, help=f"repeats, interleaved, the median reported ({repeats})")
    p.add_argument("--out", type=Path, help=f"output directory (default {RESULTS}; --quick: its quick/)")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: rebuild the report in --out from an earlier JSON",
    )
    return p


def repeats(args: argparse.Namespace, full: int, quick: int = 1) -> int:
    """--repeats, or the default for a full or a --quick run; at least 1."""
    value: int = args.repeats if args.repeats is not None else quick if args.quick else full
    if value < 1:
        raise SystemExit("--repeats must be >= 1")
    return value


def main(
    name: str,
    args: argparse.Namespace,
    settings: S,
    measure: Callable[[S], _report.Document],
    render: Callable[[_report.Document], _report.Report],
    *,
    fail_on: Callable[[_report.Report], bool] = lambda report: False,
) -> int:
    """Measure (or load), render, print, write ``name``.md/.json; the exit status (1 when ``fail_on``)."""
    if not sys.platform.startswith("linux"):
        print(f"bench_{name}.py measures Linux only (/proc, and the pool recycles only there)", file=sys.stderr)
        return 2
    doc = _report.load(args.from_json) if args.from_json is not None else measure(settings)
    report = render(doc)
    if doc["command"].split().count("--quick"):
        report.warnings.append("a --quick run: a smoke test of the benchmark, its figures are no verdict")
    text = _report.write(args.out, name, doc, report)
    print()
    print(text)
    print(f"wrote {args.out / f'{name}.md'} and {args.out / f'{name}.json'}")
    return 1 if fail_on(report) else 0
