"""Sessions: tests, lint, typecheck, docs, examples, bench, demo (``nox -l`` lists them)."""

from __future__ import annotations

import os

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against real loopback sockets."""
    # The examples extra (h11) too: tests/test_examples.py runs the proxy.
    session.install(".[tests,examples]")
    args = session.posargs or []
    session.run("pytest", *args, env={"HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "default")})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src, tests, examples, benchmarks and this file."""
    session.install(".[tests,examples]", "mypy>=1.10", "nox")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks: connect/close cycles, keep-alive exchanges, the proxy, the stale-connection race."""
    # httpx only here: bench_stale.py runs the race against its default client.
    session.install(".[examples]", "matplotlib", "httpx")
    session.run("python", "benchmarks/bench_cycles.py", *session.posargs)
    session.run("python", "benchmarks/bench_keepalive.py")
    session.run("python", "benchmarks/bench_proxy.py")
    session.run("python", "benchmarks/bench_stale.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: upstream, reverse proxy and load generator, a side-by-side table."""
    session.install(".[examples]")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example script end to end against local servers."""
    session.install(".[examples]")
    session.run("python", "examples/run_all.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors."""
    session.install(".", "-r", "docs/requirements.txt")
    session.run("sphinx-build", "-W", "-n", "--keep-going", "-b", "html", "docs", "docs/_build/html")
