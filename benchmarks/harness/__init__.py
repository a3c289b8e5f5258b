"""The benchmarks' shared harness: what the kernel says, the machine, child servers, runs, targets, reports.

Every ``benchmarks/bench_*.py`` is the measurement it exists for and calls
this package for the rest (STYLE.md: counters, servers, runs, report,
targets). The scripts run as ``python benchmarks/bench_x.py``, so the
package is imported as ``harness``; ``tests/conftest.py`` finds it through
pytest's ``pythonpath`` (pyproject.toml).
"""
