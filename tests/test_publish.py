"""Publishing over the WebSocket (the fallback of WHIP): a Python client pushes JPEG frames
into a stream of a real in-process server, another client asks about it; bad publishes and
bad frames get clear errors and change nothing else; limits and the idle timeout hold."""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import websockets
from PIL import Image

from streamer_client import Client, ServerError
from tests.inproc import InProcessServer
from tests.test_service import WordEngine


def jpeg(value: int, width: int = 160, height: int = 120, noise: bool = False) -> bytes:
    """A JPEG of one grey level (or of noise, which compresses badly)."""
    if noise:
        rgb = np.random.default_rng(value).integers(0, 256, (height, width, 3), np.uint8)
    else:
        rgb = np.full((height, width, 3), value, np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.02)


def publish_config(**publish) -> dict:
    return {
        "sources": [{"name": "cam", "url": "push"}],
        "model": {"id": "tiny-random", "frames": 2},
        "server": {"publish": {"max_side": 320, "stall_timeout_s": 2, **publish}},
    }


@pytest.fixture
def start() -> Iterator:
    """Start an in-process server with these ``server.publish`` settings (a WordEngine answers)."""
    started: list[InProcessServer] = []

    def start_with(**publish) -> InProcessServer:
        started.append(InProcessServer(publish_config(**publish), engine=WordEngine()).start(min_frames=0))
        return started[-1]

    yield start_with
    for srv in started:
        srv.stop()


@pytest.fixture
def server(start) -> InProcessServer:
    return start()


def _states(messages: list[dict], stream: str) -> list[str]:
    return [m["status"] for m in messages if m.get("type") == "stream_status" and m.get("stream") == stream]


async def test_a_websocket_publisher_feeds_a_stream_that_others_ask_about(server: InProcessServer) -> None:
    """publish -> live in welcome and /healthz -> asked about with the pushed frames -> unpublish removes it."""
    runtime = server.runtime
    async with await Client.connect(server.url) as publisher, await Client.connect(server.url) as watcher:
        await publisher.welcome()
        await watcher.welcome()
        await watcher.send({"type": "subscribe", "stream": "cam"})  # any subscriber hears every stream's status
        reply = await publisher.publish("c1", fps=10)
        assert (reply["state"], reply["max_side"]) == ("open", 320)
        sent = [10 * (i + 1) for i in range(6)]
        for value in sent:
            await publisher.send_frame(jpeg(value, 640, 480))
            await asyncio.sleep(0.12)  # 8 fps: above the 2 fps kept
        await until(lambda: runtime.captures["c1"].status().status == "live", "c1 live")
        ring = runtime.captures["c1"].ring
        await until(lambda: len(ring) >= 2, "two frames kept")
        newest = ring.newest()
        assert newest is not None and newest.rgb.shape == (240, 320, 3)  # 640x480 scaled to max_side
        async with await Client.connect(server.url) as asker:
            welcome = await asker.welcome()
            assert {s["id"]: s["status"] for s in welcome["streams"]}["c1"] == "live"
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as response:
                health = json.load(response)
            assert "c1" in health["live"]
            answer = (await asker.ask("c1", "What is held up?", id="q1"))[-1]
        assert answer["type"] == "answer" and answer["stream"] == "c1"
        request = server.runtime.engine.requests[-1]  # type: ignore[union-attr]
        levels = {int(np.median(f)) for f in request.frames}
        assert levels <= {v + d for v in sent for d in (-1, 0, 1)}, levels  # JPEG may shift a level by one
        assert answer["frames"]["last_seq"] <= ring.newest().seq
        # The publisher may ask on the same socket.
        own = (await publisher.ask("c1", "What is it?", id="q2"))[-1]
        assert own["type"] == "answer"
        await publisher.send({"type": "unpublish"})
        closed = await publisher.recv_type("publishing")
        assert (closed["stream"], closed["state"]) == ("c1", "closed")
        await until(lambda: "c1" not in runtime.captures, "c1 removed")
        heard = await _drain(watcher)
        assert _states(heard, "c1")[-1] == "down"
        assert [m for m in heard if m.get("stream") == "c1"][-1]["error"] == "removed"
    assert [s.name for s in runtime.statuses()] == ["cam"]


async def _drain(client: Client, quiet_s: float = 0.5) -> list[dict]:
    out = []
    try:
        while True:
            out.append(await client.recv(timeout=quiet_s))
    except TimeoutError:
        return out


async def test_bad_publishes_and_bad_frames_get_errors_and_change_nothing_else(start) -> None:
    """binary before publish, a configured name, a taken name, a bad name, non-JPEG, too large: errors only."""
    server = start(max_frame_bytes=200_000)
    runtime = server.runtime
    async with await Client.connect(server.url) as a, await Client.connect(server.url) as b:
        await a.welcome()
        await b.welcome()
        await a.send_frame(jpeg(50))
        err = await a.recv_type("error")
        assert err["code"] == "bad_request" and "publish" in err["message"]
        with pytest.raises(ServerError, match="configured source"):
            await a.publish("cam")
        with pytest.raises(ServerError, match="not a stream name"):
            await a.publish("no spaces")
        await a.publish("c1")
        with pytest.raises(ServerError, match="already published"):
            await b.publish("c1")
        await a.send_frame(jpeg(50))
        ring = runtime.captures["c1"].ring
        await until(lambda: len(ring) == 1, "the first frame")
        c1 = runtime.captures["c1"]
        before = (len(ring), c1.status().frames_in, c1.status().status)
        await a.send_frame(b"\x89PNG\r\n\x1a\n not a jpeg")
        assert (await a.recv_type("error"))["code"] == "bad_frame"
        await a.send_frame(b"\xff\xd8\xff\xe0 truncated")
        assert (await a.recv_type("error"))["code"] == "bad_frame"
        big = jpeg(1, 500, 500, noise=True)
        assert len(big) > runtime.settings.server.publish.max_frame_bytes
        await a.send_frame(big)
        too_large = await a.recv_type("error")
        assert too_large["code"] == "frame_too_large" and str(len(big)) in too_large["message"]
        assert (len(ring), c1.status().frames_in, c1.status().status) == before
        assert [s.name for s in runtime.statuses()] == ["cam", "c1"]
        # The socket still publishes.
        await a.send_frame(jpeg(90))
        await until(lambda: c1.status().frames_in == before[1] + 1, "a frame taken after the errors")


async def test_the_most_streams_at_once_is_enforced(start) -> None:
    """With max_streams 1 a second publish is refused busy; once the first socket closes it is accepted."""
    server = start(max_streams=1)
    async with await Client.connect(server.url) as b:
        await b.welcome()
        async with await Client.connect(server.url) as a:
            await a.welcome()
            await a.publish("c1")
            with pytest.raises(ServerError, match="maximum of 1 published"):
                await b.publish("c2")
        await until(lambda: "c1" not in server.runtime.captures, "c1 removed when its socket closed")
        assert (await b.publish("c2"))["state"] == "open"


async def test_an_idle_publisher_is_hung_up(start) -> None:
    """A publisher silent for idle_timeout_s is told 'closed: idle' and its stream is removed; the socket stays."""
    server = start(idle_timeout_s=1.0, stall_timeout_s=0.5)
    async with await Client.connect(server.url) as a:
        await a.welcome()
        await a.publish("c1")
        await a.send_frame(jpeg(50))
        closed = await a.recv_type("publishing", timeout=30)
        assert (closed["state"], closed["reason"]) == ("closed", "idle")
        assert "c1" not in server.runtime.captures
        assert (await a.ask("cam", "?", id="q"))[-1]["type"] in ("answer", "error")  # the socket still serves


async def test_publishing_can_be_turned_off(start) -> None:
    """max_streams 0: a publish is refused as forbidden."""
    server = start(max_streams=0)
    async with await Client.connect(server.url) as a:
        await a.welcome()
        with pytest.raises(ServerError, match="publishing is off"):
            await a.publish("c1")


async def test_a_text_message_over_max_message_bytes_still_closes_1009(server: InProcessServer) -> None:
    """The socket takes binary frames up to the publish limits; a 100 KiB text message still gets 1009."""

    async with await Client.connect(server.url) as a:
        await a.welcome()
        await a.send({"type": "ask", "id": "big", "stream": "cam", "question": "x" * (100 * 1024)})
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await a.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
