"""Real ``streamer serve`` processes on loopback, for the benchmarks and the tests.

:func:`start_server` runs ``python -m streamer.cli <command> ARGS --port PORT`` and waits for
its banner (the bound port); :func:`stop_server` ends it. ``tests/conftest.py`` and
``streamer bench`` both start their servers here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BANNER = re.compile(r"is serving on (ws://[\d.]+:(\d+)/ws)")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    port: int
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthz(self) -> dict:
        with urllib.request.urlopen(self.http + "/healthz", timeout=10) as r:
            return json.loads(r.read())

    def metric(self, name: str) -> float:
        """The value of one unlabelled (or the first labelled) sample of ``name`` on ``/metrics``."""
        with urllib.request.urlopen(self.http + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    command: str = "serve",
    port: int = 0,
) -> ServerProcess:
    """Run ``streamer <command> ARGS --port PORT`` and wait for its banner (the bound port);
    RuntimeError with the log if it exits or does not start within ``timeout`` seconds."""
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", command, *args, "--port", str(port)],
        cwd=ROOT if (ROOT / "pyproject.toml").is_file() else None,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = BANNER.search(log_path.read_text(errors="replace"))
        if match:
            return ServerProcess(proc, match.group(1), int(match.group(2)), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout} s:\n{log_path.read_text()}")


def stop_server(server: ServerProcess) -> int:
    server.proc.terminate()
    try:
        return server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()
