"""What the figures were measured on, in one shape for every benchmark."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import trio

import trio_recycle


def source_version() -> str:
    """The git commit of the trio_recycle being measured, and whether src/ differs from it."""
    src = Path(trio_recycle.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes in src" if dirty else commit


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(**extra: object) -> dict[str, object]:
    """The machine, the versions, the commit and the load at the start; ``extra`` entries added."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "trio_recycle": trio_recycle.__version__,
        "can_recycle": trio_recycle.can_recycle(),
        "source": source_version(),
        "loadavg_start": load_average(),
        **extra,
    }


def describe(info: dict[str, object]) -> str:
    """One sentence for a report's header."""
    others = {k: v for k, v in info.items() if k not in _SHOWN}
    text = (
        f"{info.get('nproc')} CPUs ({info.get('cpu')}), Linux {info.get('kernel')}, Python {info.get('python')},"
        f" trio {info.get('trio')}, trio-recycle {info.get('trio_recycle')} ({info.get('source')});"
        f" load average at start {info.get('loadavg_start')}, at end {info.get('loadavg_end')}"
    )
    if others:
        text += "; " + ", ".join(f"{k} {v}" for k, v in others.items())
    return text + "."


_SHOWN = {"nproc", "cpu", "kernel", "python", "trio", "trio_recycle", "source", "loadavg_start", "loadavg_end"}
