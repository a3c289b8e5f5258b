"""The real servers, each started on a free 127.0.0.1 port with its default keep-alive settings.

Every server gets a configuration of its own in a temporary directory,
written here, that says where to listen, where its files and logs go, and
nothing about keep-alive: what is measured is the server's default. Where
we are root, the server's workers run as ``www-data`` (the Debian
packages' user), so nothing runs as root but the masters that drop to it.
node, which does not drop root by itself, is started as ``www-data``; the
Python servers run as we do. No system service is started and nothing
outside the directory is touched.
Each server runs in a session of its own and its whole process group is
stopped at the end (SIGTERM, SIGKILL after `STOP_TIMEOUT`), also on
failure or cancellation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import trio

from interop.content import free_port, write_docroot

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
#: Seconds a server gets to accept connections, and to stop after SIGTERM.
START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 5.0
#: The user the servers' workers run as when we are root.
USER: Final = "www-data"


@attrs.frozen
class ServerKind:
    """One server: how to find it, how to configure it, what we expect of it."""

    name: str
    #: What runs, for the table.
    label: str
    #: The Debian package or pip distribution that brings it, for the messages.
    package: str
    #: Where it comes from: "apt" or "pip".
    source: str
    #: Writes its configuration under the directory and returns its command line.
    command: Callable[[Path, Path, int], list[str]]
    #: The binary (apt) or module (pip) whose presence says it is installed.
    needs: str
    #: The idle timeout the bursts straddle, in seconds; None for a server
    #: that closes after every response. Checked against the measured one.
    nominal_idle: float | None
    #: False for a server that does not drop root by itself: it is started as
    #: `USER`. The Python servers run as we do: their interpreter (a venv's,
    #: often over a pyenv under root's home) need not be readable by `USER`.
    drops_root: bool = True

    def missing(self) -> str | None:
        """Why the server cannot run here, or None."""
        if self.source == "pip":
            if importlib.util.find_spec(self.needs) is None:
                return f"{self.needs} is not installed (pip install {self.package})"
            return None
        if find_binary(self.needs) is None:
            return f"{self.needs} is not installed (apt-get install {self.package})"
        return None


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def _privileged_user() -> str | None:
    """`USER` where we are root and it exists, else None (the server runs as we do)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(USER)
    except KeyError:
        return None
    return USER


def _run_dir(root: Path) -> Path:
    """A directory for logs and pid files that the server may write after it dropped to `USER`."""
    run = root / "run"
    run.mkdir(exist_ok=True)
    if _privileged_user():
        import pwd

        entry = pwd.getpwnam(USER)
        os.chown(run, entry.pw_uid, entry.pw_gid)
    return run


def _nginx(keepalive: str) -> Callable[[Path, Path, int], list[str]]:
    def command(root: Path, docroot: Path, port: int) -> list[str]:
        user = _privileged_user()
        config = root / "nginx.conf"
        config.write_text(
            f"""\
worker_processes 1;
{f"user {user};" if user else ""}
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    {keepalive}
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
    }}
}}
"""
        )
        binary = find_binary("nginx") or "nginx"
        return [binary, "-p", str(root), "-e", f"{root}/error.log", "-c", str(config), "-g", "daemon off;"]

    return command


def _apache(root: Path, docroot: Path, port: int) -> list[str]:
    user = _privileged_user()
    modules = "/usr/lib/apache2/modules"
    config = root / "httpd.conf"
    config.write_text(
        f"""\
ServerRoot "{root}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile "{root}/httpd.pid"
DefaultRuntimeDir "{root}"
Mutex file:{root} default
ErrorLog "{root}/error.log"
LogLevel warn
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
{f"User {user}" if user else ""}
{f"Group {user}" if user else ""}
DocumentRoot "{docroot}"
<Directory "{docroot}">
    Require all granted
</Directory>
"""
    )
    return [find_binary("apache2") or "apache2", "-d", str(root), "-f", str(config), "-DFOREGROUND"]


def _lighttpd(root: Path, docroot: Path, port: int) -> list[str]:
    user = _privileged_user()
    config = root / "lighttpd.conf"
    run = _run_dir(root)
    lines = [
        f'server.document-root = "{docroot}"',
        'server.bind = "127.0.0.1"',
        f"server.port = {port}",
        f'server.errorlog = "{run}/error.log"',
    ]
    if user:
        lines += [f'server.username = "{user}"', f'server.groupname = "{user}"']
    config.write_text("\n".join(lines) + "\n")
    return [find_binary("lighttpd") or "lighttpd", "-D", "-f", str(config)]


def _h2o(root: Path, docroot: Path, port: int) -> list[str]:
    user = _privileged_user()
    config = root / "h2o.conf"
    run = _run_dir(root)
    config.write_text(
        f"""\
listen:
  host: 127.0.0.1
  port: {port}
pid-file: {run}/h2o.pid
error-log: {run}/error.log
{f"user: {user}" if user else ""}
hosts:
  default:
    paths:
      /:
        file.dir: {docroot}
"""
    )
    return [find_binary("h2o") or "h2o", "-c", str(config)]


def _node(root: Path, docroot: Path, port: int) -> list[str]:
    return [find_binary("node") or "node", str(HERE / "node_server.js"), str(port)]


def _uvicorn(root: Path, docroot: Path, port: int) -> list[str]:
    return [
        sys.executable,
        *("-m", "uvicorn", "interop.apps:asgi", "--host", "127.0.0.1", "--port", str(port)),
        *("--no-access-log", "--log-level", "warning"),
    ]


def _hypercorn(root: Path, docroot: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "interop.apps:asgi"]


def _gunicorn(root: Path, docroot: Path, port: int) -> list[str]:
    return [
        sys.executable,
        *("-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "sync"),
        *("--worker-tmp-dir", str(_run_dir(root)), "interop.apps:wsgi"),
    ]


SERVERS: Final = (
    ServerKind("nginx", "nginx (defaults)", "nginx", "apt", _nginx(""), "nginx", 75.0),
    ServerKind(
        "nginx-ka0",
        "nginx, keepalive_timeout 0",
        "nginx",
        "apt",
        _nginx("keepalive_timeout 0;"),
        "nginx",
        None,
    ),
    ServerKind("apache", "Apache 2.4 mpm_event", "apache2", "apt", _apache, "apache2", 5.0),
    ServerKind("lighttpd", "lighttpd", "lighttpd", "apt", _lighttpd, "lighttpd", 6.0),
    ServerKind("h2o", "h2o", "h2o", "apt", _h2o, "h2o", 10.0),
    ServerKind("node", "node http module", "nodejs", "apt", _node, "node", 6.0, drops_root=False),
    ServerKind("uvicorn", "uvicorn (h11)", "uvicorn", "pip", _uvicorn, "uvicorn", 5.0),
    ServerKind("hypercorn", "hypercorn", "hypercorn", "pip", _hypercorn, "hypercorn", 5.0),
    ServerKind("gunicorn", "gunicorn sync worker", "gunicorn", "pip", _gunicorn, "gunicorn", None),
)


def version(kind: ServerKind) -> str:
    """The server's version, as its package says."""
    if kind.source == "pip":
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        with contextlib.suppress(PackageNotFoundError):
            return dist_version(kind.package)
        return "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", kind.package], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return "?"


class ServerFailed(Exception):
    """A server did not start, or died."""


async def _wait_accepting(port: int, process: trio.Process, log: Path) -> None:
    with trio.move_on_after(START_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"exited with status {process.returncode}: {_tail(log)}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                return
    raise ServerFailed(f"did not accept connections within {START_TIMEOUT} s: {_tail(log)}")


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    return ""


def _signal_group(process: trio.Process, number: int) -> None:
    # The server is the leader of a session of its own (start_new_session):
    # its group is its pid, and holds only what it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, number)


@asynccontextmanager
async def run_server(kind: ServerKind) -> AsyncIterator[int]:
    """Start ``kind`` on a free port of 127.0.0.1; yield the port once it accepts; stop it whatever happens."""
    with tempfile.TemporaryDirectory(prefix=f"trio-recycle-interop-{kind.name}-") as tmp:
        root = Path(tmp)
        docroot = write_docroot(root)
        port = free_port()
        log = root / "server.log"
        user = None if kind.drops_root else _privileged_user()
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                kind.command(root, docroot, port),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user else None,
            )
        try:
            await _wait_accepting(port, process, log)
            yield port
            if process.poll() is not None:
                raise ServerFailed(f"{kind.name} died during the run (status {process.returncode}): {_tail(log)}")
        finally:
            with trio.CancelScope(shield=True):
                _signal_group(process, signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                _signal_group(process, signal.SIGKILL)
                await process.wait()
