"""The floors pyproject.toml declares are the versions `nox -s tests_min` tests (.ci/constraints-min.txt)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: `name>=version` in a dependency string of pyproject.toml.
FLOOR = re.compile(r'"([A-Za-z0-9_.-]+)>=([0-9][^",;\s]*)')


def _declared_floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    runtime = text.split("[project.optional-dependencies]")[0].split("dependencies = [", 1)[1].split("]", 1)[0]
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    # The tests extra is tooling, not what users install: not pinned there.
    extras = "\n".join(line for line in extras.splitlines() if not line.startswith("tests"))
    return {name.lower(): version for name, version in FLOOR.findall(runtime + extras)}


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_declared_floors_are_the_tested_versions() -> None:
    """Every runtime and extra floor has its pin in the constraints file, with the same version, and nothing else."""
    floors = _declared_floors()
    assert {"trio", "attrs", "outcome", "httpx", "httpcore", "h11"} <= set(floors)
    assert _pinned() == floors
