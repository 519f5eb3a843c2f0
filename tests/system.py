"""System packages that parts of the suite need, beyond `pip install -e '.[dev]'`.

Each group names what it needs, how to install it, and how to tell whether it is there.
`pytest` prints at the top of its output which groups will be skipped and why
(`pytest_report_header` in conftest.py); tests call :func:`require` to skip without the
group. In CI (`CI` set) a missing group fails instead, and so does any skipped test, so a
green CI run has run everything.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
MOSQUITTO = "/usr/sbin/mosquitto"
CHROMIUM = "/usr/bin/chromium"


@dataclass(frozen=True)
class Group:
    name: str
    tests: str
    install: str


GROUPS = {
    "rtsp": Group(
        "rtsp",
        "RTSP camera tests (tests/test_rtsp.py, tests/test_stream_status.py)",
        "apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
        "gstreamer1.0-plugins-ugly python3-gi",
    ),
    "browser": Group("browser", "browser tests (tests/test_dashboard.py)", "apt-get install chromium"),
    "mqtt": Group("mqtt", "MQTT delivery tests (tests/test_monitoring.py)", "apt-get install mosquitto"),
    "vllm": Group(
        "vllm",
        "remote-engine tests against a real vLLM (tests/test_remote_vllm.py)",
        ".ci/install-vllm .venv-vllm (or point STREAMER_VLLM_PYTHON at a vLLM venv's python)",
    ),
}


def _gstreamer_rtsp_missing() -> str | None:
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} (Debian's Python, which has the GStreamer bindings) not found"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return "GStreamer's RTSP server is not installed (gi.require_version('GstRtspServer') failed)"
    return None


def _chromium_missing() -> str | None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        return f"Debian's chromium is not installed ({CHROMIUM})"
    return None


def _vllm_missing() -> str | None:
    from tests.vllm_server import PYTHON_ENV, vllm_python

    python = vllm_python()
    if not python.exists():
        return f"no vLLM Python at {python} (set {PYTHON_ENV})"
    probe = subprocess.run(  # finding the package is enough: importing vLLM takes seconds
        [str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"{python} has no vllm package"
    return None


def _mosquitto_missing() -> str | None:
    if not Path(MOSQUITTO).exists():
        return f"Debian's mosquitto broker is not installed ({MOSQUITTO})"
    return None


@functools.cache
def missing(group: str) -> str | None:
    """Why ``group`` cannot run here, or None when everything it needs is installed."""
    return {
        "rtsp": _gstreamer_rtsp_missing,
        "browser": _chromium_missing,
        "vllm": _vllm_missing,
        "mqtt": _mosquitto_missing,
    }[group]()


def require(group: str) -> None:
    """Skip the calling test when ``group`` is missing; in CI, fail instead."""
    reason = missing(group)
    if reason is None:
        return
    message = f"{reason}; install with: {GROUPS[group].install}"
    if os.environ.get("CI"):
        pytest.fail(f"missing in CI: {message}")
    pytest.skip(message)


def report_header() -> list[str]:
    """Lines for the top of pytest's output: what will be skipped, and why."""
    lines = []
    for group in GROUPS.values():
        reason = missing(group.name)
        if reason is not None:
            lines.append(f"SKIPPING {group.tests}: {reason}. Install: {group.install}")
    if not lines:
        present = "RTSP server, chromium, vLLM, mosquitto"
        return [f"system packages: all present ({present}); nothing will be skipped for lack of them"]
    return lines
