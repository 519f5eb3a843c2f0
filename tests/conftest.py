"""Shared fixtures: a cache with the tiny model, and real `streamer serve` processes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.benchmark.servers import ServerProcess, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ROOT", "ServerProcess", "start_server", "stop_server"]


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
