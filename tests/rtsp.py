"""Start and kill a real GStreamer RTSP server (tests/rtsp_server.py) from tests."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).resolve().parent / "rtsp_server.py"
INSTALL_HINT = (
    "apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly python3-gi"
)


def require_gstreamer() -> None:
    """Skip without GStreamer's RTSP server, except in CI, where it must be installed."""
    probe = (
        subprocess.run(
            [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
            capture_output=True,
            check=False,
        )
        if os.path.exists(SYSTEM_PYTHON)
        else None
    )
    if probe is None or probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"GStreamer's RTSP server is missing in CI: {INSTALL_HINT}")
        pytest.skip(f"needs GStreamer's RTSP server: {INSTALL_HINT}")


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
