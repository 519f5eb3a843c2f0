"""The call page (/call) in real headless Chromium with its fake camera, against a real
in-process server: it publishes over WHIP, the stream turns live and is asked about (by a
protocol client and on the dashboard), hanging up removes it, five cycles leave threads and
file descriptors where they were, the WebSocket fallback works from the same page, and the
latency from the browser's camera to the ring buffer is measured. Screenshots go to
test-artifacts/call/."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from streamer_client import Client
from tests.conftest import ROOT
from tests.inproc import InProcessServer
from tests.system import CHROMIUM, require
from tests.test_service import WordEngine
from tests.test_whip import fds, threads

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = ROOT / "test-artifacts" / "call"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]


@pytest.fixture(scope="module")
def browser():
    require("browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def start_server(**publish) -> InProcessServer:
    config = {
        "sources": [{"name": "cam", "url": "push"}],
        "model": {"id": "tiny-random", "frames": 2},
        "server": {
            "dashboard_dir": str(ROOT / "clients" / "web"),
            "publish": {"max_side": 640, "stall_timeout_s": 3, **publish},
        },
    }
    return InProcessServer(config, engine=WordEngine()).start(min_frames=0)


@pytest.fixture
def server() -> Iterator[InProcessServer]:
    srv = start_server()
    yield srv
    srv.stop()


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def live(server: InProcessServer, name: str) -> bool:
    stream = server.runtime.captures.get(name)
    return stream is not None and stream.status().status == "live" and len(stream.ring) >= 2


def ask(server: InProcessServer, stream: str) -> dict:
    async def go() -> dict:
        async with await Client.connect(server.url) as client:
            welcome = await client.welcome()
            assert {s["id"]: s["status"] for s in welcome["streams"]}[stream] == "live"
            return (await client.ask(stream, "What is held up to the camera?"))[-1]

    result: list[dict] = []  # Playwright's sync API holds this thread's event loop: ask from another thread
    worker = threading.Thread(target=lambda: result.append(asyncio.run(go())))
    worker.start()
    worker.join(60)
    assert result, "no answer"
    return result[0]


def open_call(browser, server: InProcessServer, stream: str, transport: str | None = None, init_script: str = ""):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    if init_script:
        page.add_init_script(init_script)
    query = f"stream={stream}" + (f"&transport={transport}" if transport else "")
    page.goto(f"http://127.0.0.1:{server.port}/call?{query}")
    return page, problems


def test_a_browser_call_over_whip_is_asked_about_and_hanging_up_removes_it(browser, server: InProcessServer) -> None:
    """/call?stream=c1 publishes over WHIP -> live -> an answer from the call's frames -> hang-up removes it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runtime = server.runtime
    page, problems = open_call(browser, server, "c1")
    try:
        page.wait_for_selector('#state[data-state="live"]', timeout=30_000)
        assert page.inner_text("#transport") == "WebRTC (WHIP)"
        wait_for(lambda: live(server, "c1"), "c1 live with frames")
        ring = runtime.captures["c1"].ring
        answer = ask(server, "c1")
        assert answer["type"] == "answer" and answer["stream"] == "c1"
        request = runtime.engine.requests[-1]  # type: ignore[union-attr]
        ours = {(f.seq, f.ts) for f in ring.latest(64)}
        assert request.stream == "c1" and set(request.frame_ids) <= ours  # the call's own frames
        assert float(np.std(request.frames[-1])) > 5  # Chromium's fake camera draws a moving pattern
        page.screenshot(path=str(ARTIFACTS / "01-call-live.png"))

        # The agent's side: the dashboard lists the call's stream and asks about it.
        dash = browser.new_page(viewport={"width": 1280, "height": 900})
        received: list[dict] = []
        dash.on(
            "websocket",
            lambda ws: ws.on("framereceived", lambda p: received.append(json.loads(p)) if isinstance(p, str) else None),
        )
        dash.goto(f"http://127.0.0.1:{server.port}/")
        dash.click('#streams button[data-stream="c1"]', timeout=30_000)
        dash.wait_for_selector('#streams button[data-stream="c1"] .pill.live', timeout=30_000)
        dash.fill("#question", "What is held up to the camera?")
        dash.press("#question", "Enter")
        dash.wait_for_selector("li.ask[data-final]", timeout=30_000)
        assert any(m.get("type") == "answer" and m.get("stream") == "c1" for m in received)
        dash.wait_for_selector("#preview:not([hidden])", timeout=30_000)  # the call's preview
        dash.screenshot(path=str(ARTIFACTS / "02-dashboard-asks-the-call.png"))

        page.click("#hangup")
        wait_for(lambda: "c1" not in runtime.captures, "c1 removed on hang-up")
        page.wait_for_selector('#state[data-state="down"]', timeout=10_000)
        assert page.inner_text("#state") == "ended"
        dash.wait_for_selector('#streams button[data-stream="c1"]', state="detached", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "03-call-ended.png"))
        dash.close()
    finally:
        page.close()
    assert not problems, problems


def test_five_browser_calls_leave_threads_and_fds_where_they_started(browser, server: InProcessServer) -> None:
    """Five /call publish/hang-up cycles in Chromium: the server's threads and fds return to their counts."""
    runtime = server.runtime

    def cycle(i: int) -> None:
        page, problems = open_call(browser, server, "c1")
        page.wait_for_selector('#state[data-state="live"]', timeout=30_000)
        wait_for(lambda: live(server, "c1"), f"cycle {i}: live")
        if i % 2:
            page.click("#hangup")  # a hang-up: DELETE on the WHIP session
        page.close()  # otherwise the tab just closes
        wait_for(lambda: "c1" not in runtime.captures, f"cycle {i}: removed")
        assert not problems, problems

    cycle(0)  # lazily made pools (the decode worker, the loops' default executors) start here
    wait_for(lambda: not any(n in threads() for n in ("video-decoder", "pushed-c1")), "cycle 0's peer closed")
    before = threads(), fds()
    for i in range(1, 6):
        cycle(i)
    deadline = time.monotonic() + 30
    while len(threads()) > len(before[0]) or fds() > before[1]:
        assert time.monotonic() < deadline, f"threads {threads()}, fds {fds()}; were {before}"
        time.sleep(0.1)


def test_the_call_page_falls_back_to_the_websocket(browser, server: InProcessServer) -> None:
    """transport=websocket (as when WebRTC is blocked): JPEG frames over /ws make a live stream that is asked about."""
    runtime = server.runtime
    page, problems = open_call(browser, server, "c2", transport="websocket")
    try:
        page.wait_for_selector('#state[data-state="live"]', timeout=30_000)
        assert page.inner_text("#transport") == "WebSocket (JPEG)"
        wait_for(lambda: live(server, "c2"), "c2 live with frames")
        assert ask(server, "c2")["stream"] == "c2"
        page.click("#hangup")
        wait_for(lambda: "c2" not in runtime.captures, "c2 removed on hang-up")
    finally:
        page.close()
    assert not problems, problems


def test_a_refused_call_says_why(browser, server: InProcessServer) -> None:
    """A call under a configured camera's name is refused, and the page shows the server's reason."""
    page, problems = open_call(browser, server, "cam")
    try:
        page.wait_for_selector('#state[data-state="down"]', timeout=30_000)
        assert "configured source" in page.inner_text("#banner")
        assert [s.name for s in server.runtime.statuses()] == ["cam"]
    finally:
        page.close()
    assert all("409" in p for p in problems), problems  # Chromium logs the refused POST


# The page's camera replaced by a canvas that draws its own clock: the low 40 bits of epoch
# milliseconds and an 8-bit checksum, as 8 x 6 black or white squares of 80 px.
CLOCK_CAMERA = """
(() => {
  const canvas = document.createElement("canvas");
  canvas.width = 640; canvas.height = 480;
  const ctx = canvas.getContext("2d");
  function draw() {
    const ms = Math.round(performance.timeOrigin + performance.now());
    const bytes = [];
    let v = ms;
    for (let i = 0; i < 5; i++) { bytes.push(v % 256); v = Math.floor(v / 256); }
    bytes.push(bytes.reduce((a, b) => a + b, 0) % 256);
    for (let bit = 0; bit < 48; bit++) {
      const on = (bytes[Math.floor(bit / 8)] >> (bit % 8)) & 1;
      ctx.fillStyle = on ? "#fff" : "#000";
      ctx.fillRect((bit % 8) * 80, Math.floor(bit / 8) * 80, 80, 80);
    }
  }
  draw();
  setInterval(draw, 10);
  const stream = canvas.captureStream(30);
  navigator.mediaDevices.getUserMedia = async () => stream;
})();
"""


def delay_ms(rgb: np.ndarray, ts: float) -> float | None:
    """Milliseconds from the clock CLOCK_CAMERA drew into a frame to ``ts`` (epoch seconds,
    the same machine's clock), or None when the drawing does not check."""
    h, w = rgb.shape[:2]
    cell_w, cell_h = w / 8, h / 6
    bits = []
    for bit in range(48):
        x, y = int((bit % 8 + 0.5) * cell_w), int((bit // 8 + 0.5) * cell_h)
        patch = rgb[y - int(cell_h / 4) : y + int(cell_h / 4), x - int(cell_w / 4) : x + int(cell_w / 4)]
        bits.append(1 if patch.mean() > 128 else 0)
    data = [sum(bits[8 * i + b] << b for b in range(8)) for i in range(6)]
    if sum(data[:5]) % 256 != data[5]:
        return None
    drawn_low40 = sum(data[i] << (8 * i) for i in range(5))
    return ((ts * 1000 - drawn_low40 + 2**39) % 2**40) - 2**39


@pytest.mark.parametrize("transport", ["whip", "websocket"])
def test_latency_from_the_browser_camera_to_the_ring_buffer(browser, transport: str) -> None:
    """Each kept frame's drawn clock is before its ring-buffer time; median and p95 are reported."""
    server = start_server(sample_fps=10, max_side=640)
    try:
        page, problems = open_call(
            browser, server, "lat", transport=None if transport == "whip" else transport, init_script=CLOCK_CAMERA
        )
        page.wait_for_selector('#state[data-state="live"]', timeout=30_000)
        wait_for(lambda: live(server, "lat"), "lat live")
        ring = server.runtime.captures["lat"].ring
        seen: dict[int, float] = {}
        unreadable = 0
        deadline = time.monotonic() + 60
        while len(seen) < 60 and time.monotonic() < deadline:
            for frame in ring.latest(64):
                if frame.seq not in seen:
                    delay = delay_ms(frame.rgb, frame.ts)
                    unreadable += delay is None
                    seen[frame.seq] = float("nan") if delay is None else delay
            time.sleep(0.2)
        page.click("#hangup")
        page.close()
    finally:
        server.stop()
    delays_ms = sorted(d for d in seen.values() if d == d)
    assert len(delays_ms) >= 30 and unreadable <= len(seen) // 4, (len(delays_ms), unreadable)
    assert delays_ms[0] > -5  # no frame is in the buffer before it was drawn (same clock, ms rounding)
    median = statistics.median(delays_ms)
    p95 = delays_ms[int(0.95 * (len(delays_ms) - 1))]
    report = {"transport": transport, "frames": len(delays_ms), "unreadable": unreadable, "median_ms": median,
              "p95_ms": p95, "min_ms": delays_ms[0], "max_ms": delays_ms[-1]}  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"latency-{transport}.json").write_text(json.dumps(report, indent=2))
    print(f"\nlatency camera -> ring buffer over {transport}: {report}")
    assert median < 5000  # a generous bound; the figures are reported, not asserted
    assert not problems, problems
