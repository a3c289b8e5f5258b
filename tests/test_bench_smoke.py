"""The benchmark behind `nox -s bench` runs end to end (a --quick smoke run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cycles.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmark reads /proc")
def test_bench_cycles_quick_run_writes_its_tables(tmp_path: Path) -> None:
    """`bench_cycles.py --quick` exits 0 and writes the table, the JSON and (maybe) the plot."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pool.open_tcp_stream" in result.stdout
    assert "cycles/s" in result.stdout

    table = (tmp_path / "cycles.md").read_text()
    assert "| tasks | variant |" in table
    for label in ("raw trio socket", "trio.open_tcp_stream", "pool.open_tcp_stream"):
        assert label in table

    document = json.loads((tmp_path / "cycles.json").read_text())
    rows = {(row["variant"], row["concurrency"]): row for row in document["rows"]}
    assert set(rows) == {(v, c) for v in ("raw", "trio", "pool") for c in (1, 8, 32, 64, 256)}
    assert all(row["rate"] > 0 for row in rows.values())
    # The audit hook sees one socket() per cycle for the baselines, none for a warm pool.
    assert rows["raw", 1]["socket_calls_per_1000"] == 1000.0
    assert rows["pool", 32]["socket_calls_per_1000"] == 0.0
    assert rows["pool", 256]["capacity"] == 32

    plotted = (tmp_path / "sweep.png").exists()
    assert plotted or "matplotlib is not installed" in result.stdout


KEEPALIVE = BENCH.parent / "bench_keepalive.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool's watch is epoll")
def test_bench_keepalive_quick_run_prints_its_table() -> None:
    """`bench_keepalive.py --quick` exits 0 and reports the three variants at 1 and 32 tasks."""
    result = subprocess.run(
        [sys.executable, str(KEEPALIVE), "--quick"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 32 |")]
    assert len(rows) == 6
    assert sum("pool open + release()" in row for row in rows) == 2


STALE = BENCH.parent / "bench_stale.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the upstream example and the benchmark are Linux's")
def test_bench_stale_quick_run_loses_no_request_with_the_retry(tmp_path: Path) -> None:
    """`bench_stale.py --quick`: the pool with the kept_alive retry loses nothing; the tables are written."""
    result = subprocess.run(
        [sys.executable, str(STALE), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads((tmp_path / "stale.json").read_text())
    retried = document["runs"]["pool + retry"]
    assert [sum(run["failures"].values()) for run in retried] == [0]
    assert retried[0]["requests"] == 200
    assert "| pool + retry | 200 | 0 |" in (tmp_path / "stale.md").read_text()
    transport = document["runs"]["RecyclingTransport"]
    assert [sum(run["failures"].values()) for run in transport] == [0]
