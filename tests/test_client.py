"""`streamer ask` (the standalone terminal client) against a real server process."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess

pytestmark = pytest.mark.slow


def _ask(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer.cli", "ask", *args], capture_output=True, text=True, timeout=timeout
    )


def test_ask_prints_streamed_answer_then_frames_and_timings(demo_server: ServerProcess) -> None:
    done = _ask("--url", demo_server.url, "--stream", "demo", "--max-new-tokens", "8", "What is moving?")
    assert done.returncode == 0, done.stderr
    _answer, info_line = done.stdout.rstrip("\n").rsplit("\n", 1)
    assert info_line.startswith("[stream demo · frames ")
    assert "(8 frames, " in info_line and "first token" in info_line and "total" in info_line
    assert "gibberish" in done.stderr  # the tiny model's caveat is shown


def test_ask_unknown_stream_exits_1(demo_server: ServerProcess) -> None:
    done = _ask("--url", demo_server.url, "--stream", "nope", "Hi?")
    assert done.returncode == 1
    assert "unknown_stream" in done.stderr


def test_ask_without_server_exits_2_with_a_hint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _ask("--url", f"ws://127.0.0.1:{port}/ws", "--stream", "demo", "Hi?")
    assert done.returncode == 2
    assert "cannot connect" in done.stderr and "streamer demo" in done.stderr


def test_client_needs_only_websockets_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"websockets", "streamer_client"}
    for path in (ROOT / "clients" / "streamer_client").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_client_runs_from_a_copy_outside_the_project(demo_server: ServerProcess, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ROOT / "clients" / "streamer_client", tmp_path / "streamer_client")
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path[:0] = [sys.argv[1]]; import runpy; "
            "sys.argv = ['streamer_client', '--url', sys.argv[2], '--stream', 'demo', '--max-new-tokens', '2', 'Hi?']; "
            "runpy.run_module('streamer_client', run_name='__main__')",
            str(tmp_path),
            demo_server.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "[stream demo · frames" in done.stdout
