"""How a socket address is written in reprs and messages."""

from __future__ import annotations

__all__ = ["format_address"]


def format_address(address: object) -> str:
    """``127.0.0.1:8080`` or ``[::1]:8080``, as a repr shows a socket address."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return repr(address)
