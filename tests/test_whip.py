"""WHIP ingest (RFC 9725) against a real in-process server, with aiortc as the publishing
peer over loopback: the call's frames become a stream that is asked about, hanging up
removes it, bad offers and unauthorized or misnamed publishes are refused with clear HTTP
errors, and publish/hang-up cycles leave no thread or file descriptor behind."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import VideoStreamTrack

from streamer_client import Client
from tests.inproc import InProcessServer
from tests.test_publish import until
from tests.test_service import WordEngine

TOKEN = "whip-secret"


class LevelTrack(VideoStreamTrack):
    """A camera whose frames are one grey level each: 40, 41, 42... (640x480, 15 fps)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        level = 40 + self.sent % 150
        self.sent += 1
        frame = av.VideoFrame.from_ndarray(np.full((480, 640, 3), level, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, Any, str]:
    """One HTTP request: (status, headers, body text), errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


async def offer_sdp(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())  # gathers candidates: no trickle
    return pc.localDescription.sdp


async def whip_publish(base: str, stream: str, token: str | None = TOKEN) -> tuple[RTCPeerConnection, str]:
    """Publish a LevelTrack over WHIP; returns the peer and the session's absolute URL."""
    pc = RTCPeerConnection()
    pc.addTrack(LevelTrack())
    headers = {"Content-Type": "application/sdp", **({"Authorization": f"Bearer {token}"} if token else {})}
    status, answer_headers, answer = await asyncio.to_thread(
        http, "POST", f"{base}/whip/{stream}", (await offer_sdp(pc)).encode(), headers
    )
    assert status == 201, answer
    assert answer_headers["Content-Type"].startswith("application/sdp")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, base + answer_headers["Location"]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> list[str]:
    """This process's threads (/proc/self/task), less the shared pools that grow on demand up
    to a bound and are kept for the server's life, whatever the calls: the event loops'
    default executors and AnyIO's workers (Starlette reads the pages' files on them)."""
    pooled = ("asyncio_", "AnyIO worker thread")
    names = [t.name for t in threading.enumerate() if not t.name.startswith(pooled)]
    assert len(os.listdir("/proc/self/task")) >= len(names)
    return names


async def settled_to(thread_names: list[str], open_fds: int) -> None:
    """Wait until threads and file descriptors are back to these counts (30 s at most)."""
    deadline = time.monotonic() + 30
    while len(threads()) > len(thread_names) or fds() > open_fds:
        assert time.monotonic() < deadline, f"threads {threads()} (were {thread_names}), fds {fds()} (were {open_fds})"
        await asyncio.sleep(0.05)


@pytest.fixture
def server() -> Iterator[InProcessServer]:
    config = {
        "sources": [{"name": "cam", "url": "push"}],
        "model": {"id": "tiny-random", "frames": 2},
        "server": {"tokens": [TOKEN], "publish": {"max_side": 320, "sample_fps": 4, "stall_timeout_s": 3}},
    }
    srv = InProcessServer(config, engine=WordEngine()).start(min_frames=0)
    yield srv
    srv.stop()


def base_of(server: InProcessServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_a_whip_call_becomes_a_stream_that_is_asked_about_and_hanging_up_removes_it(
    server: InProcessServer,
) -> None:
    """POST offer -> 201 answer + Location -> live, asked about with the call's frames -> DELETE removes it."""
    runtime = server.runtime
    base = base_of(server)
    async with await Client.connect(server.url, token=TOKEN) as watcher:
        await watcher.welcome()
        pc, location = await whip_publish(base, "c1")
        try:
            assert location.startswith(f"{base}/whip/c1/")
            await until(lambda: "c1" in runtime.captures and runtime.captures["c1"].status().status == "live", "live")
            ring = runtime.captures["c1"].ring
            await until(lambda: len(ring) >= 2, "two frames kept")
            assert ring.newest().rgb.shape == (240, 320, 3)  # 640x480 downscaled to max_side
            async with await Client.connect(server.url, token=TOKEN) as asker:
                welcome = await asker.welcome()
                assert {s["id"]: s["status"] for s in welcome["streams"]}["c1"] == "live"
                answer = (await asker.ask("c1", "What is held up to the camera?", id="q1"))[-1]
            assert answer["type"] == "answer" and answer["stream"] == "c1"
            request = runtime.engine.requests[-1]  # type: ignore[union-attr]
            levels = [int(np.median(f)) for f in request.frames]
            assert all(35 <= level <= 195 for level in levels), levels  # grey levels of the call, not black
        finally:
            status, _, _ = await asyncio.to_thread(http, "DELETE", location, None, {"Authorization": f"Bearer {TOKEN}"})
            await pc.close()
        assert status == 200
        await until(lambda: "c1" not in runtime.captures, "c1 removed")
        heard = [m async for m in _messages(watcher) if m.get("type") == "stream_status" and m["stream"] == "c1"]
        assert heard[0]["status"] == "live" and (heard[-1]["status"], heard[-1]["error"]) == ("down", "removed")
    status, _, _ = await asyncio.to_thread(http, "DELETE", location, None, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 404  # gone


async def _messages(client: Client, quiet_s: float = 0.5):
    try:
        while True:
            yield await client.recv(timeout=quiet_s)
    except TimeoutError:
        return


async def test_bad_whip_requests_are_refused_clearly_and_change_nothing(server: InProcessServer) -> None:
    """Unauthorized 401, wrong type 415, bad SDP 400, a camera's name 409, a bad name 400; no stream appears."""
    base = base_of(server)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/sdp"}
    pc = RTCPeerConnection()
    pc.addTrack(LevelTrack())
    offer = (await offer_sdp(pc)).encode()
    await pc.close()

    async def post(stream: str, body: bytes, headers: dict) -> tuple[int, Any, str]:
        return await asyncio.to_thread(http, "POST", f"{base}/whip/{stream}", body, headers)

    async def refuse_each() -> None:
        status, headers, text = await post("c1", offer, {"Content-Type": "application/sdp"})
        assert (status, headers.get("WWW-Authenticate")) == (401, 'Bearer realm="streamer"') and "token" in text
        status, _, text = await post("c1", offer, {**auth, "Authorization": "Bearer wrong"})
        assert status == 401
        status, _, text = await post("c1", offer, {**auth, "Content-Type": "application/json"})
        assert status == 415 and "application/sdp" in text
        status, _, text = await post("c1", b"hello, not sdp", auth)
        assert status == 400 and "SDP" in text
        for broken, why in [
            (offer.replace(b"a=fingerprint:", b"a=fingerprint-broken:"), "fingerprint"),
            (offer.replace(b"a=ice-ufrag:", b"a=ice-broken:"), "ICE username fragment"),
            (offer[: len(offer) // 3], "fingerprint"),
        ]:
            status, _, text = await post("c1", broken, auth)
            assert status == 400 and "refused" in text and why in text, text
        status, _, text = await post("cam", offer, auth)
        assert status == 409 and "configured source" in text
        status, _, text = await post("bad%20name", offer, auth)
        assert status == 400 and "not a stream name" in text
        status, headers, _ = await asyncio.to_thread(http, "OPTIONS", f"{base}/whip/c1")
        assert status == 204 and headers["Accept-Post"] == "application/sdp"
        assert [s.name for s in server.runtime.statuses()] == ["cam"]
        assert not server.runtime_state.publishers.active

    await refuse_each()  # the first round starts lazily made pools (the event loops' default executors)
    before = threads(), fds()
    await refuse_each()
    await settled_to(*before)


async def test_five_publish_hang_up_cycles_leave_no_thread_or_fd_behind(server: InProcessServer) -> None:
    """Threads and fds return to their counts after five publish/hang-up cycles (DELETE, or the peer just closing)."""
    runtime = server.runtime
    base = base_of(server)

    async def cycle(i: int) -> None:
        pc, location = await whip_publish(base, "c1")
        await until(lambda: "c1" in runtime.captures and len(runtime.captures["c1"].ring) >= 1, f"cycle {i}: frames")
        if i % 2:  # a hang-up by WHIP; otherwise the peer goes away without one (a closed tab)
            status, _, _ = await asyncio.to_thread(http, "DELETE", location, None, {"Authorization": f"Bearer {TOKEN}"})
            assert status == 200
        await pc.close()
        await until(lambda: "c1" not in runtime.captures, f"cycle {i}: removed")

    await cycle(0)  # first use starts what lives as long as the server: the decode worker, asyncio's resolver
    await until(lambda: not any(n in threads() for n in ("video-decoder", "pushed-c1")), "cycle 0's peer closed")
    before = threads(), fds()
    for i in range(1, 6):
        await cycle(i)
    await settled_to(*before)


async def test_a_listed_origin_reads_the_location_and_max_streams_holds() -> None:
    """A page on a listed origin may read Location (CORS expose); a call beyond max_streams gets 503 busy."""
    config = {
        "sources": [{"name": "cam", "url": "push"}],
        "model": {"id": "tiny-random", "frames": 2},
        "server": {"allowed_origins": ["https://support.example"], "publish": {"max_streams": 1}},
    }
    server = InProcessServer(config, engine=WordEngine()).start(min_frames=0)
    try:
        base = base_of(server)
        pc = RTCPeerConnection()
        pc.addTrack(LevelTrack())
        headers = {"Content-Type": "application/sdp", "Origin": "https://support.example"}
        status, answer_headers, answer = await asyncio.to_thread(
            http, "POST", f"{base}/whip/c1", (await offer_sdp(pc)).encode(), headers
        )
        assert status == 201
        assert answer_headers["Access-Control-Allow-Origin"] == "https://support.example"
        assert "location" in answer_headers["Access-Control-Expose-Headers"].lower()
        second = RTCPeerConnection()
        second.addTrack(LevelTrack())
        status, _, text = await asyncio.to_thread(
            http, "POST", f"{base}/whip/c2", (await offer_sdp(second)).encode(), headers
        )
        assert status == 503 and "maximum of 1 published" in text
        await second.close()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        status, _, _ = await asyncio.to_thread(http, "DELETE", base + answer_headers["Location"], None, headers)
        assert status == 200
        await pc.close()
        await until(lambda: "c1" not in server.runtime.captures, "c1 removed")
        assert [s.name for s in server.runtime.statuses()] == ["cam"]
    finally:
        server.stop()
