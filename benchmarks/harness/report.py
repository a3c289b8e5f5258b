"""A benchmark's report: tables, the targets' verdicts, and the .md/.json pair it writes.

The JSON holds everything measured (settings, machine, every sample), so
that ``--from-json`` rebuilds the report without measuring: a script's
``render`` takes the document alone.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import attrs

from .machine import describe
from .targets import Verdict, verdict_rows

Document = dict[str, Any]


def text_table(headers: list[str], cells: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)
    return "\n".join(lines)


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(line) + " |" for line in cells)
    return "\n".join(lines)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@attrs.define
class Report:
    """A title, markdown sections, and the verdicts on the targets."""

    title: str
    sections: list[str] = attrs.field(factory=list)
    verdicts: list[Verdict] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)

    def add(self, *parts: str) -> None:
        self.sections.extend(parts)

    def table(self, headers: list[str], cells: list[list[str]], caption: str = "") -> None:
        if caption:
            self.sections.append(caption)
        self.sections.append(markdown_table(headers, cells))

    @property
    def missed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.result != "met"]

    def body(self) -> str:
        parts = list(self.sections)
        if self.verdicts:
            parts += ["Targets (benchmarks/harness/targets.py):", markdown_table(*verdict_rows(self.verdicts))]
        if self.warnings:
            parts += ["Warnings:", "\n".join(f"- {w}" for w in self.warnings)]
        return "\n\n".join(parts)

    def markdown(self, document: Document) -> str:
        header = [
            f"# {self.title}",
            f"Measured {document['started']} in {document.get('seconds', 0):.0f} s with `{document['command']}`",
        ]
        if document.get("from_json"):
            header[-1] += f" (rebuilt from its samples with `--from-json {document['from_json']}`)"
        header[-1] += "."
        header.append(f"Machine: {describe(document['machine'])}")
        return "\n\n".join([*header, self.body()]) + "\n"


def encode(value: object) -> object:
    """JSON for the attrs values and paths a document holds."""
    if attrs.has(type(value)):
        return attrs.asdict(value)  # type: ignore[arg-type]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot encode {value!r}")


def document(
    name: str, settings: object, machine: dict[str, object], started: str, seconds: float, **data: object
) -> Document:
    """The JSON document of one run: what any --from-json needs, plus the script's own ``data``."""
    raw = json.loads(
        json.dumps(
            {
                "benchmark": name,
                "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
                "started": started,
                "seconds": round(seconds, 1),
                "machine": machine,
                "settings": settings,
                **data,
            },
            default=encode,
        )
    )
    assert isinstance(raw, dict)
    return raw


def write(out: Path, name: str, doc: Document, report: Report) -> str:
    """Write ``name``.md and ``name``.json into ``out``; return the markdown (also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(doc)
    doc = {**doc, "verdicts": [attrs.asdict(v) for v in report.verdicts], "warnings": report.warnings}
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=encode) + "\n")
    return text


def load(path: Path) -> Document:
    """An earlier run's document, marked as rebuilt."""
    doc = json.loads(path.read_text())
    assert isinstance(doc, dict)
    doc["from_json"] = path.name
    return doc
