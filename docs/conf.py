"""Sphinx configuration for the trio-recycle docs (built by ``nox -s docs``)."""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING

import trio_recycle

if TYPE_CHECKING:
    from sphinx.application import Sphinx

project = "trio-recycle"
author = "trio-recycle developers"
copyright = "trio-recycle developers"
release = trio_recycle.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# The build runs with -W -n: every broken reference is an error, and a
# single-backtick name is a cross-reference, as in trio's own docs.
nitpicky = True
default_role = "obj"

# --- autodoc -----------------------------------------------------------------

# Sphinx 9 rewrote autodoc; sphinxcontrib-trio (which turns
# `open_socket_pool` into "async with open_socket_pool(...)" and marks
# coroutines "await") hooks into the class-based documenters, which Sphinx 9
# keeps behind this switch.
autodoc_use_legacy_class_based = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# Show the value of a default (capacity: int = 64), not the private
# constant it comes from; the docstrings say why each default was chosen.
autodoc_preserve_defaults = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_preprocess_types = True
napoleon_attr_annotations = True

# --- intersphinx, and the offline build ---------------------------------------
#
# The docs link to Python's and trio's documentation through intersphinx,
# which downloads each project's objects.inv at build time. The machines
# this project builds on (developers' and CI's) cannot reach those sites,
# and with -W a failed download is an error. There is no way to ship the
# inventories without downloading them once, so:
#
# * DOCS_INTERSPHINX=1 turns intersphinx on: references to `trio.Nursery`,
#   `socket.socket` and friends become links, and -n checks them.
# * Otherwise (the default, what `nox -s docs` and CI do) intersphinx has no
#   targets, and references into the standard library and trio are exempted
#   from -n by the patterns below. References to trio_recycle's own names
#   are still checked, which is what the offline build is for.
INTERSPHINX = os.environ.get("DOCS_INTERSPHINX", "") not in ("", "0")

if INTERSPHINX:
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "trio": ("https://trio.readthedocs.io/en/stable", None),
    }
else:
    intersphinx_mapping = {}

# Modules whose documentation lives at the other end of intersphinx.
_EXTERNAL_MODULES = (
    "trio",
    "socket",
    "ssl",
    "collections",
    "contextlib",
    "typing",
    "os",
    "errno",
    "ctypes",
    "exceptiongroup",
    "outcome",
    "attrs",
    "httpx",
    "httpcore",
)
# Builtins that appear in signatures and Args/Returns/Raises sections.
_BUILTINS = (
    "None",
    "True",
    "False",
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "bytearray",
    "memoryview",
    "object",
    "tuple",
    "list",
    "dict",
    "type",
    "OSError",
    "TypeError",
    "ValueError",
    "ExceptionGroup",
    "BaseException",
)

# `RecyclingStream.setsockopt` takes ``int | Buffer`` like
# `socket.socket.setsockopt`; src/ imports ``Buffer`` from typing_extensions
# under TYPE_CHECKING only (it is collections.abc.Buffer from Python 3.12 on),
# so autodoc sees the bare name and there is no page to link it to.

nitpick_ignore = [("py:class", "Buffer")]

# trio_recycle.httpx types socket_options with its own alias of httpcore's
# three shapes, (level, option, int | bytes) and (level, option, None,
# optlen); the docstrings spell them out, there is no page for the alias.
nitpick_ignore += [("py:class", "SocketOption")]

nitpick_ignore_regex: list[tuple[str, str]] = []
if not INTERSPHINX:
    nitpick_ignore_regex += [
        (r"py:.*", rf"(?:{'|'.join(_EXTERNAL_MODULES)})(?:\..*)?"),
        (r"py:.*", rf"(?:builtins\.)?(?:{'|'.join(_BUILTINS)})"),
    ]

# --- HTML ----------------------------------------------------------------------

html_theme = "furo"
html_title = f"trio-recycle {release}"
html_static_path: list[str] = []

# --- MyST (Markdown pages such as benchmarks.md) --------------------------------

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3


# --- Signatures of async context managers ---------------------------------------


def _drop_acm_return_annotation(
    app: object,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """Hide ``-> AsyncIterator[X]`` on an @asynccontextmanager function, and ``-> AbstractAsyncContextManager[X]``.

    sphinxcontrib-trio already renders it as ``async with f(...)``; the
    annotation describes the generator inside, not what ``as`` binds, and
    reads as if the function returned an iterator.
    """
    wrapped = getattr(obj, "__wrapped__", None)
    if what == "function" and wrapped is not None and inspect.isasyncgenfunction(wrapped):
        return signature, None
    # The same for a plain function that returns an async context manager
    # (open_socket_pool): its ``as`` target is what the docstring documents.
    if what == "function" and return_annotation is not None and "AsyncContextManager" in return_annotation:
        return signature, None
    return None


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-signature", _drop_acm_return_annotation)
