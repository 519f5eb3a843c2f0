"""Start and kill a real GStreamer RTSP server (tests/rtsp_server.py) from tests."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.system import SYSTEM_PYTHON, require

SERVER_SCRIPT = Path(__file__).resolve().parent / "rtsp_server.py"


def require_gstreamer() -> None:
    """Skip without GStreamer's RTSP server, except in CI, where it must be installed."""
    require("rtsp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    def __init__(self, port: int | None = None, size: str = "320x240", fps: int = 15) -> None:
        self.port = port or free_port()
        self.size = size
        self.fps = fps
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/test"

    def start(self, timeout: float = 15.0) -> RtspServer:
        deadline = time.monotonic() + timeout
        while True:  # the port may still be held for a moment after a kill
            self.proc = subprocess.Popen(
                [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.port), "--size", self.size, "--fps", str(self.fps)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if line.strip() == "READY":
                return self
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"RTSP server did not start: {line}")
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
