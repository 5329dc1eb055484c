"""A real ``mlflow server`` on 127.0.0.1 for the tests that need one (started and stopped by them)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, store: Path, timeout: float = 90) -> subprocess.Popen:
    """Start a server on ``port`` with its sqlite store and artifact folder under ``store``;
    return once ``/health`` answers. The same ``store`` restarts the same server state."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'server.db'}",
            "--artifacts-destination",
            str(store / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: kill() takes its workers with it
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc
        except OSError as e:
            if proc.poll() is not None or time.time() > deadline:
                kill(proc)
                raise RuntimeError(f"mlflow server on port {port} did not start") from e
            time.sleep(0.3)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill the server and its worker processes at once (SIGKILL: an outage, not a shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    # the port is free again once nothing listens on it
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(proc.args[proc.args.index("--port") + 1]))) != 0:
                return
        time.sleep(0.1)
