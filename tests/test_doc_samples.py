"""Every Python code sample of README.md and docs/*.rst runs, against a local HTTP server where it needs one."""

# Each document's samples run in order in one subprocess, sharing one
# namespace (a later sample may use what an earlier one defined, as a
# reader does). A sample with a top-level `await` or `async with` runs in
# a trio.run of its own; the others are executed as they are (a sample
# that calls trio.run does so itself). The port numbers the samples use
# (8080, 8000) are replaced by the port of a server in this test, which
# answers every request with a short HTTP response and closes.

from __future__ import annotations

import json
import re
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
#: How long one document's samples may take.
TIMEOUT = 60

_MARKDOWN = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_RST = re.compile(r"^( *)\.\. code-block:: python\n((?:\1 +:.*\n)*)\n((?:\1 +.*\n|\n)+)", re.MULTILINE)

_RUNNER = """
import ast, json, sys, trio
samples = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for number, source in enumerate(samples):
    code = compile(source, f"<sample {number}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & 0x80:  # CO_COROUTINE: top-level await
        async def run(code=code):
            await eval(code, namespace)
        trio.run(run)
    else:
        exec(code, namespace)
    print(f"sample {number} ran", flush=True)
"""


def samples(document: Path) -> list[str]:
    """The Python code samples of a Markdown or reStructuredText document, in order."""
    text = document.read_text()
    if document.suffix == ".md":
        return [match[1] for match in _MARKDOWN.finditer(text)]
    found = []
    for match in _RST.finditer(text):
        lines = match[3].splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        found.append("\n".join(line[indent:] for line in lines).strip() + "\n")
    return found


def test_every_document_with_samples_is_found() -> None:
    """The extraction finds the samples it must run (a changed markup would silently skip them)."""
    counts = {document.name: len(samples(document)) for document in DOCUMENTS}
    assert counts["README.md"] >= 3
    assert counts["index.rst"] >= 1
    assert counts["tutorial.rst"] >= 5
    assert counts["faq.rst"] >= 1


async def _answer_and_close(stream: trio.SocketStream) -> None:
    async with stream:
        request = b""
        while b"\r\n\r\n" not in request:
            data = await stream.receive_some()
            if not data:
                return
            request += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if samples(d)], ids=lambda d: d.name)
async def test_samples_run(document: Path, nursery: trio.Nursery) -> None:
    """The document's samples run, in order, with no error."""

    listeners = await nursery.start(partial(trio.serve_tcp, _answer_and_close, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    sources = [re.sub(r"\b(8080|8000)\b", str(port), source) for source in samples(document)]
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-c", _RUNNER],
            stdin=json.dumps(sources).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, f"{document.name}:\n{output}"
    assert output.count(" ran\n") == len(sources), output
