"""Sessions: tests, tests_min, coverage, lint, typecheck, docs, examples, build, bench, demo, interop, netfault."""

from __future__ import annotations

import glob
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

#: Every Python the suite runs on; requires-python and the classifiers in
#: pyproject.toml and the README say the same. A missing one is skipped
#: locally and is an error in CI (nox's --error-on-missing-interpreters,
#: which the CI environment variable turns on and .ci/run passes).
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

#: The Python whose run is the only one with the `ci` Hypothesis profile
#: when .ci/run asks for it: 1000 examples per property on four Pythons
#: would triple CI's time for little more than one Python finds.
HYPOTHESIS_CI_PYTHON = "3.12"


def _pyenv_interpreters_on_path() -> None:
    """Put each installed pyenv CPython 3.x on PATH as its own ``python3.x``.

    pyenv's shims answer only for the versions selected with ``pyenv global``
    or ``pyenv local``: the shim ``python3.10`` exists, but fails, when 3.10
    is installed and not selected. nox would take it for an interpreter and
    fail the session instead of skipping it. With the version directories in
    front of the shims, every installed version is found; without pyenv,
    nothing changes.
    """
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = []
    for version in PYTHONS:
        dirs = sorted(
            glob.glob(str(root / "versions" / f"{version}.*" / "bin")),
            key=lambda d: [int(p) if p.isdigit() else -1 for p in Path(d).parent.name.split(".")],
        )
        if dirs:
            found.append(dirs[-1])
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_pyenv_interpreters_on_path()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite against real loopback sockets, with branch coverage of src/.

    With no arguments the report is printed and the run fails under the
    floor in pyproject.toml ([tool.coverage.report] fail_under). With
    arguments (``nox -s tests-3.12 -- tests/test_pool.py -x``) it runs just
    those, and skips the report: a part of the suite covers a part of src/.
    """
    # The examples extra (h11) too: tests/test_examples.py runs the proxy;
    # and httpx, so that tests/test_httpx.py is never skipped here.
    # Editable, so that coverage sees src/ (and every Python's data file
    # names the same paths); `nox -s build` tests the built wheel.
    session.install("-e", ".[tests,examples,httpx]", "coverage[toml]>=7.10")
    profile = os.environ.get("HYPOTHESIS_PROFILE", "default")
    if profile == "ci" and session.python != HYPOTHESIS_CI_PYTHON:
        profile = "default"
    data_file = f".coverage-{session.python}"
    env = {"HYPOTHESIS_PROFILE": profile, "COVERAGE_FILE": data_file}
    session.run("coverage", "erase", env=env)
    session.run("coverage", "run", "-m", "pytest", *session.posargs, env=env)
    # One data file per process ([tool.coverage.run] patch: the rlimit cases
    # run in subprocesses): merged into data_file for the report and for
    # the `coverage` session.
    session.run("coverage", "combine", "--quiet", env=env)
    if not session.posargs:
        session.run("coverage", "report", env=env)


#: The lowest versions pyproject.toml declares, pinned (see the file).
MIN_CONSTRAINTS = ".ci/constraints-min.txt"


@nox.session(python=PYTHONS[0])
def tests_min(session: nox.Session) -> None:
    """Run the test suite once with the lowest declared versions (trio, attrs, outcome, httpx, httpcore, h11).

    On the oldest supported Python, with every dependency pyproject.toml
    declares pinned to its floor by .ci/constraints-min.txt; the test tools
    themselves are not pinned. Arguments go to pytest, as for ``tests``.
    """
    session.install("-c", MIN_CONSTRAINTS, ".[tests,examples,httpx]")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def coverage(session: nox.Session) -> None:
    """Combine the coverage of every ``tests`` session that ran (``nox -s tests coverage``)."""
    session.install("coverage[toml]>=7.10")
    data_files = sorted(glob.glob(".coverage-3.*"))
    if not data_files:
        session.error("no .coverage-3.* data files: run `nox -s tests` first")
    env = {"COVERAGE_FILE": ".coverage"}
    session.run("coverage", "combine", "--keep", *data_files, env=env)
    session.run("coverage", "report", env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src, tests, examples, benchmarks and this file."""
    session.install(".[tests,examples,httpx]", "mypy>=1.10", "nox")
    session.run("mypy")


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and the wheel, check them, and import the wheel in a clean venv."""
    session.install("build>=1.2", "twine>=5")
    out = Path(session.create_tmp()) / "dist"
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(out))
    sdists = sorted(out.glob("trio_recycle-*.tar.gz"))
    wheels = sorted(out.glob("trio_recycle-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        session.error(f"expected one sdist and one wheel in {out}, found {sorted(p.name for p in out.iterdir())}")
    sdist, wheel = sdists[0], wheels[0]
    session.run("twine", "check", "--strict", str(sdist), str(wheel))

    with zipfile.ZipFile(wheel) as zf:
        wheel_names = zf.namelist()
    with tarfile.open(sdist) as tf:
        sdist_names = [name.split("/", 1)[1] for name in tf.getnames() if "/" in name]
    for what, names, needed in (
        ("wheel", wheel_names, ["trio_recycle/py.typed", "LICENSE"]),
        ("sdist", sdist_names, ["src/trio_recycle/py.typed", "LICENSE"]),
    ):
        for name in needed:
            if not any(n == name or n.endswith(f"/{name}") for n in names):
                session.error(f"{name} is missing from the {what}")
        session.log(f"{what} has {', '.join(needed)}")

    # A venv of its own, not this session's: nothing but the wheel and its
    # dependencies, and run from a directory without src/ to import from.
    venv = (Path(session.create_tmp()) / "wheel-venv").resolve()
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    python = str(venv / "bin" / "python")
    session.run(python, "-m", "pip", "install", "--quiet", str(wheel), external=True)
    check = (
        "import importlib.metadata as md, importlib.resources as res, trio_recycle;"
        "assert trio_recycle.__version__ == md.version('trio-recycle'), trio_recycle.__version__;"
        "assert res.files('trio_recycle').joinpath('py.typed').is_file(), 'py.typed';"
        "assert any(f.name == 'LICENSE' for f in md.files('trio-recycle')), 'LICENSE';"
        "print('imported trio_recycle', trio_recycle.__version__, 'from', trio_recycle.__file__)"
    )
    with session.chdir(venv):
        session.run(python, "-I", "-c", check, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks on one harness: cycles, keep-alive (and its breakdown), scale, the proxy, the stale race, httpx.

    Arguments go to every script, so only the common ones make sense
    (benchmarks/harness/cli.py): ``nox -s bench -- --quick`` is a smoke run,
    ``-- --repeats 7``, ``-- --out DIR``. The keep-alive breakdown counts
    system calls with strace when it is installed (apt-get install strace).
    """
    session.install(".[examples,httpx]", "matplotlib")
    for script in BENCHMARKS:
        session.run("python", f"benchmarks/{script[0]}", *script[1:], *session.posargs)


#: What ``nox -s bench`` runs, in order: the script and its own arguments.
BENCHMARKS = [
    ("bench_cycles.py",),
    ("bench_keepalive.py",),
    ("bench_keepalive.py", "--breakdown"),
    ("bench_scale.py",),
    ("bench_proxy.py",),
    ("bench_stale.py",),
    ("bench_httpx.py",),
]


@nox.session(python=HYPOTHESIS_CI_PYTHON)
def netfault(session: nox.Session) -> None:
    """The packet-fault harness (root: ip netns, /dev/net/tun): its own tests, then a profile.

    ``nox -s netfault`` runs the quick profile (a few minutes, as .ci/run
    does); ``nox -s netfault -- --profile full`` the full one, the table
    in docs/reliability.md; any other arguments go to ``netfault/run.py``.
    Without root it is skipped locally and an error in CI.
    """
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists() or shutil.which("ip") is None:
        message = "netfault needs root, /dev/net/tun and iproute2 (ip, ss)"
        if os.environ.get("CI"):
            session.error(message)
        session.skip(message)
    session.install(".[tests]")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "netfault/test_harness.py")
    args = session.posargs or ["--profile", "quick"]
    session.run("python", "-m", "netfault.run", *args)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: upstream, reverse proxy and load generator, a side-by-side table."""
    session.install(".[examples]")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example script end to end against local servers."""
    session.install(".[examples,httpx]")
    session.run("python", "examples/run_all.py", *session.posargs)


#: The app servers ``nox -s interop`` runs (pip); the others come from apt (.ci/run).
INTEROP_SERVERS = ["uvicorn", "hypercorn", "gunicorn"]


@nox.session
def interop(session: nox.Session) -> None:
    """trio-recycle against real servers (nginx, Apache, lighttpd, h2o, node, uvicorn, hypercorn, gunicorn).

    ``nox -s interop -- --full`` for the long profile, ``-- --help`` for the
    rest. A server that is not installed is skipped locally and fails the
    session in CI (the CI environment variable).
    """
    session.install(".[examples,httpx]", *INTEROP_SERVERS)
    session.run("python", "-m", "interop", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors."""
    # The httpx extra: the reference documents trio_recycle.httpx.
    session.install(".[httpx]", "-r", "docs/requirements.txt")
    session.run("sphinx-build", "-W", "-n", "--keep-going", "-b", "html", "docs", "docs/_build/html")
