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
    samples = document["samples"]
    assert {(s["variant"], s["concurrency"]) for s in samples} == {
        (v, c) for v in ("raw", "trio", "pool") for c in (1, 8, 32, 64, 256)
    }
    assert all(s["cycles"] > 0 and s["seconds"] > 0 for s in samples)
    # The audit hook sees one socket() per cycle for the baselines, none for a warm pool.
    raw_1 = next(s for s in samples if (s["variant"], s["concurrency"]) == ("raw", 1))
    assert raw_1["sockets"] == raw_1["cycles"]
    assert all(s["sockets"] == 0 and s["created"] == 0 for s in samples if s["variant"] == "pool")
    assert {s["capacity"] for s in samples if (s["variant"], s["concurrency"]) == ("pool", 256)} == {32}
    verdicts = {(v["key"], v["measured"]) for v in document["verdicts"]}
    assert ("socket_per_1000", "0 in 100 cycles (32 tasks)") in verdicts

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


def _strace_works() -> bool:
    try:
        return subprocess.run(["strace", "-o", "/dev/null", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool's watch is epoll")
@pytest.mark.skipif(not _strace_works(), reason="needs strace allowed to trace (apt-get install strace)")
def test_bench_keepalive_breakdown_counts_a_raw_exchange(tmp_path: Path) -> None:
    """`--breakdown --quick`: a held raw socket's exchange is one send, one recv, two scheduler passes."""
    result = subprocess.run(
        [sys.executable, str(KEEPALIVE), "--breakdown", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "keepalive_breakdown.json").read_text())["breakdown"]
    assert {(row["variant"], row["tasks"]) for row in rows} == {
        (v, t) for v in ("raw", "stream", "pool") for t in (1, 32)
    }
    raw = next(row for row in rows if (row["variant"], row["tasks"]) == ("raw", 1))
    assert raw["syscalls_per_exchange"]["sendto"] == pytest.approx(1.0, abs=0.1)
    assert raw["task_steps_per_exchange"] == pytest.approx(2.0, abs=0.2)
    pool = next(row for row in rows if (row["variant"], row["tasks"]) == ("pool", 1))
    assert set(pool["us_per_call"]) >= {"open_tcp_stream (take)", "release"}


SCALE = BENCH.parent / "bench_scale.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool's watch is epoll")
def test_bench_scale_quick_run_fills_every_point(tmp_path: Path) -> None:
    """`bench_scale.py --quick`: both sweeps measured, every pool filled to its capacity before the exchanges."""
    result = subprocess.run(
        [sys.executable, str(SCALE), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    samples = json.loads((tmp_path / "scale.json").read_text())["samples"]
    assert {s["sweep"] for s in samples} == {"capacity", "peers"}
    assert all(s["parked"] == s["capacity"] and s["exchanges"] > 0 for s in samples)
    assert "Sweep over peers" in (tmp_path / "scale.md").read_text()
