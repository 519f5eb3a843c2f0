"""The app's HTTP side over loopback: the dashboard is served from the installed package."""

from __future__ import annotations

import importlib.resources
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import streamer.web
from streamer.server.app import packaged_dashboard
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow


def _get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.http + path, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_the_dashboard_is_package_data() -> None:
    """streamer.web holds the dashboard's files, and the app serves that folder by default."""
    files = importlib.resources.files("streamer.web")
    assert {"index.html", "app.js", "style.css"} <= {f.name for f in files.iterdir()}
    assert packaged_dashboard() == Path(streamer.web.__file__).parent


def test_served_files_are_the_packages_and_its_module_files_are_not(demo_server: ServerProcess) -> None:
    """GET / and the assets return the package's bytes; __init__.py and __pycache__ answer 404."""
    files = importlib.resources.files("streamer.web")
    assert _get(demo_server, "/") == (200, files.joinpath("index.html").read_bytes())
    for name in ("app.js", "style.css"):
        assert _get(demo_server, f"/{name}") == (200, files.joinpath(name).read_bytes())
    for hidden in ("/__init__.py", "/__pycache__/"):
        assert _get(demo_server, hidden)[0] == 404
