"""Real streamer servers on loopback, for the benchmarks and the tests.

:func:`start_server` runs ``python -m streamer.cli <command> ARGS --port PORT`` and waits for
its banner (the bound port); :func:`stop_server` ends it. :class:`InProcessServer` runs the
same server (uvicorn, real sockets) in this process, for callers that must reach inside (an
engine of their own, the frames a stream buffered). ``tests/conftest.py``, ``tests/inproc.py``
and ``streamer bench`` all start their servers here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer.config import Settings, parse_settings
from streamer.inference.engine import Engine
from streamer.server.app import make_server
from streamer.server.runtime import Runtime

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


class InProcessServer:
    def __init__(self, config: dict[str, Any], engine: Engine | None = None) -> None:
        config = {**config, "server": {**config.get("server", {}), "port": 0}}
        self.settings: Settings = parse_settings(config)
        self.runtime = Runtime(self.settings, engine=engine)
        self.port: int | None = None
        self._ready = threading.Event()
        self._server = make_server(self.runtime, self._listening)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)

    def _listening(self, host: str, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, min_frames: int = 8) -> InProcessServer:
        self.runtime.start_capture()
        self.runtime.load_engine()
        self.runtime.start_inference()
        self._thread.start()
        assert self._ready.wait(30), "server did not start"
        deadline = time.monotonic() + 30
        while any(len(c.ring) < min_frames for c in self.runtime.captures.values()):
            assert time.monotonic() < deadline, "streams have no frames"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.runtime.stop()

    @property
    def runtime_state(self):
        """The app's shared state (connections, previews, metrics)."""
        return self._server.state

    @property
    def loop(self):
        assert self.runtime.loop is not None
        return self.runtime.loop
