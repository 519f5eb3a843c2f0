"""A real server with a real RTSP camera: subscribers hear the camera drop and come back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from tests.conftest import start_server, stop_server
from tests.rtsp import RtspServer, require_gstreamer
from tests.wsclient import ProtocolClient

pytestmark = pytest.mark.slow


def test_subscribers_get_stream_status_on_change(tiny_model: Path, tmp_path: Path) -> None:
    require_gstreamer()
    camera = RtspServer().start()
    config = tmp_path / "rtsp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {"name": "cam", "url": camera.url, "stall_timeout_s": 2, "open_timeout_s": 2, "backoff_max_s": 1},
                    {"name": "demo", "url": "demo"},
                ],
                "model": {"id": "tiny-random", "max_new_tokens": 4},
            }
        )
    )
    server = start_server(["--config", str(config)], tmp_path / "server.log")

    async def scenario() -> tuple[dict, list[dict], dict]:
        client = await ProtocolClient.connect(server.url)
        welcome = await client.recv_type("welcome")
        await client.send({"type": "subscribe", "stream": "cam", "preview_fps": 0})
        statuses = [await client.recv_type("stream_status", timeout=20)]
        while statuses[-1]["status"] != "live":
            statuses.append(await client.recv_type("stream_status", timeout=20))
        await client.send({"type": "subscribe", "stream": "nope"})
        unknown = await client.recv_type("error")
        camera.kill()
        while statuses[-1]["status"] == "live":
            statuses.append(await client.recv_type("stream_status", timeout=10))
        camera.start()
        while statuses[-1]["status"] != "live":
            statuses.append(await client.recv_type("stream_status", timeout=20))
        answer = await client.ask("after-reconnect", stream="cam")
        await client.close()
        return welcome, statuses, {"unknown": unknown, "answer": answer[-1]}

    try:
        welcome, statuses, rest = asyncio.run(scenario())
    finally:
        stop_server(server)
        camera.kill()
    assert [s["id"] for s in welcome["streams"]] == ["cam", "demo"]
    assert all(s["stream"] == "cam" for s in statuses)
    assert "down" in [s["status"] for s in statuses]
    down = next(s for s in statuses if s["status"] == "down")
    assert down["error"]
    assert statuses[-1]["status"] == "live" and statuses[-1]["reconnects"] >= 1
    assert rest["unknown"]["code"] == "unknown_stream"
    assert rest["answer"]["type"] == "answer" and rest["answer"]["stream"] == "cam"
