"""Shared fixtures: a cache with the tiny model, and real `streamer serve` processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"is serving on (ws://[\d.]+:(\d+)/ws)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say at the top which groups of tests will be skipped for lack of system packages."""
    from tests.system import report_header

    return report_header()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: a green CI run must have run every test."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if os.environ.get("CI") and skipped and exitstatus == pytest.ExitCode.OK:
        if reporter is not None:
            reporter.write_line(f"CI: {skipped} test(s) skipped; every test must run in CI", red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def streamer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder private to this test run, so every run builds the tiny model afresh."""
    cache = tmp_path_factory.mktemp("streamer-cache")
    os.environ["STREAMER_CACHE"] = str(cache)
    # Servers store events (events.db): in this run's folder, never the user's data dir.
    os.environ.setdefault("STREAMER_DATA", str(tmp_path_factory.mktemp("streamer-data")))
    return cache


@pytest.fixture(scope="session")
def tiny_model(streamer_cache: Path) -> Path:
    from streamer.inference.tiny import ensure_tiny_model

    return ensure_tiny_model()


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
        with urllib.request.urlopen(self.http + "/healthz", timeout=5) as r:
            return json.loads(r.read())

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
    """Run ``streamer <command> ARGS --port PORT`` and wait for its banner (the bound port)."""
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", command, *args, "--port", str(port)],
        cwd=ROOT,
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


@pytest.fixture(scope="module")
def demo_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`streamer serve --config configs/demo.yaml` in a subprocess, on a free port."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(["--config", str(ROOT / "configs" / "demo.yaml")], log_path)
    # Questions use the newest 8 frames: wait until the demo stream holds that many.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (server.healthz()["streams"][0]["frames_buffered"] or 0) < 8:
        time.sleep(0.2)
    yield server
    stop_server(server)
