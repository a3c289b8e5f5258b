"""Run httpx's own async tests under trio, with the stock transport and with RecyclingTransport.

What it does: downloads the source distribution of the installed httpx
version (``pip download --no-binary :all: --no-deps``) into a temporary
folder, puts ``tools/httpx_suite_conftest.py`` next to its ``tests`` as the
root ``conftest.py``, and runs the tests marked ``anyio`` twice under trio:
once as they are, once with every ``httpx.AsyncHTTPTransport`` that an
``httpx.AsyncClient`` makes for itself replaced by a ``RecyclingTransport``
with the same keyword arguments. It prints the pass counts side by side and
how many requests went through the pool. httpx's code is only downloaded
and run, never copied into this repository; the run is not part of CI.

Run it in an environment with trio-recycle, httpx and httpx's test
dependencies::

    pip install -e '.[httpx]' pytest anyio trustme uvicorn cryptography chardet zstandard brotli h2 socksio
    python tools/run_httpx_suite.py [-- extra pytest arguments]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Final

import httpx

HERE: Final = Path(__file__).resolve().parent
CONFTEST: Final = HERE / "httpx_suite_conftest.py"


def download(version: str, folder: Path) -> Path:
    """The httpx sdist for ``version``, extracted in ``folder``."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
    subprocess.run([*argv, f"httpx=={version}", "-d", str(folder)], check=True)
    (archive,) = folder.glob(f"httpx-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    root = folder / f"httpx-{version}"
    if not (root / "tests").is_dir():
        raise SystemExit(f"the httpx {version} source distribution has no tests folder")
    return root


def run(root: Path, swap: bool, extra: list[str]) -> tuple[dict[str, int], list[str], str]:
    """Run the async tests; return the outcome counts, the failed tests and the pool totals line."""
    argv = [sys.executable, "-m", "pytest", "tests", "-m", "anyio", "-q", "-p", "no:cacheprovider", "-rf", *extra]
    env_swap = {"TRIO_RECYCLE_SWAP": "1" if swap else "0"}
    result = subprocess.run(
        argv, cwd=root, capture_output=True, text=True, env={**os.environ, **env_swap}, check=False, timeout=900
    )
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    totals = next((line for line in output.splitlines() if line.startswith("trio-recycle: ")), "")
    return counts, failed, totals


def main(extra: list[str]) -> None:
    version = httpx.__version__
    with tempfile.TemporaryDirectory(prefix="httpx-suite-") as temp:
        root = download(version, Path(temp))
        shutil.copy(CONFTEST, root / "conftest.py")
        results = {name: run(root, swap, extra) for name, swap in (("stock", False), ("RecyclingTransport", True))}
    print(f"httpx {version}: its tests marked anyio, under trio")
    for name, (counts, failed, totals) in results.items():
        shown = ", ".join(f"{n} {word}" for word, n in counts.items())
        print(f"  {name:20} {shown}")
        for test in failed:
            print(f"  {'':20}   failed: {test}")
        if totals:
            print(f"  {'':20} {totals}")
    stock_failed, pool_failed = set(results["stock"][1]), set(results["RecyclingTransport"][1])
    if pool_failed - stock_failed:
        print(f"failing only with RecyclingTransport: {sorted(pool_failed - stock_failed)}")
        sys.exit(1)
    print("no test fails with RecyclingTransport that passes with the stock transport")


if __name__ == "__main__":
    main(sys.argv[1:])
