"""trio-recycle against real HTTP servers: ``nox -s interop`` (``python -m interop --help``)."""
