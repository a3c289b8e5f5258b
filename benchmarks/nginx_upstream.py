"""Run nginx as an upstream on a loopback port, with a temporary configuration, until SIGINT.

What it is for: ``benchmarks/bench_proxy.py`` measures the reverse proxy
example against a real upstream, nginx from the distribution's packages
(``apt-get install nginx``). ``examples/demo.py --upstream-command`` starts
this script for every run; it writes a configuration into a temporary
directory, starts ``nginx -c ... -g 'daemon off;'`` listening on 127.0.0.1,
prints ``listening on 127.0.0.1:PORT`` once nginx accepts connections, and
on SIGINT or SIGTERM stops nginx (SIGQUIT, its graceful stop; SIGKILL after
10 s) and removes the directory. Nothing outside the directory is touched:
no system service, no system configuration.

Every request is answered with ``200`` and the body
``"<METHOD> <URI>\\n"`` padded with dots to about ``--size`` bytes, as
``examples/upstream_server.py`` does, so the demo's checks hold.

Run it::

    python benchmarks/nginx_upstream.py --listen 127.0.0.1:0 --keepalive-timeout 0
    python benchmarks/nginx_upstream.py --listen 127.0.0.1:0 --keepalive-timeout 75 --keepalive-requests 100

It exits with status 2 and a message when nginx is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

#: Seconds nginx gets to start accepting, and to stop after SIGQUIT.
TIMEOUT: Final = 10.0

CONFIG: Final = """\
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_timeout {keepalive_timeout};
    keepalive_requests {keepalive_requests};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        location / {{
            return 200 "{body}";
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or in /usr/sbin (not on a normal user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def free_port(host: str) -> int:
    # nginx cannot listen on port 0 and tell us the port: take one the
    # kernel hands out, and give it to nginx at once.
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_accepting(host: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"nginx exited with status {process.returncode} before it accepted connections")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise SystemExit(f"nginx did not accept connections on {host}:{port} within {TIMEOUT} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT; port 0 picks a free one")
    parser.add_argument("--size", type=int, default=1024, help="pad each response body to this many bytes")
    parser.add_argument(
        "--fixed-body", action="store_true", help="answer exactly --size bytes of x (bench_httpx), not the request"
    )
    parser.add_argument("--keepalive-timeout", type=float, default=75.0, help="nginx keepalive_timeout, seconds")
    parser.add_argument("--keepalive-requests", type=int, default=1000, help="nginx keepalive_requests")
    parser.add_argument("--worker-connections", type=int, default=4096, help="nginx worker_connections")
    args = parser.parse_args()
    host, _, port_text = args.listen.rpartition(":")
    if host != "127.0.0.1":
        parser.error("--listen: this benchmark helper serves on 127.0.0.1 only")
    nginx = find_nginx()
    if nginx is None:
        print("nginx is not installed (Debian/Ubuntu: apt-get install nginx)", file=sys.stderr)
        return 2
    port = int(port_text) or free_port(host)
    padding = "." * max(0, args.size - 32)
    with tempfile.TemporaryDirectory(prefix="trio-recycle-nginx-") as root:
        config = Path(root, "nginx.conf")
        config.write_text(
            CONFIG.format(
                root=root,
                # nginx drops a root master's workers to "nobody"; keep them
                # root so that they can use the temporary directory.
                user="user root;" if os.geteuid() == 0 else "",
                port=port,
                keepalive_timeout=f"{args.keepalive_timeout:g}s",
                keepalive_requests=args.keepalive_requests,
                worker_connections=args.worker_connections,
                body="x" * args.size if args.fixed_body else "$request_method $request_uri\\n" + padding,
            )
        )
        process = subprocess.Popen(
            [nginx, "-p", root, "-e", f"{root}/error.log", "-c", str(config), "-g", "daemon off;"]
        )
        stop = False

        def on_signal(number: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            wait_accepting(host, port, process)
            print(f"listening on {host}:{port}", flush=True)
            while not stop and process.poll() is None:
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT)
                try:
                    process.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    if not stop:
        print(f"nginx exited on its own with status {process.returncode}", file=sys.stderr)
        return 1
    print("nginx stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
