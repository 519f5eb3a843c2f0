"""The browser dashboard in real headless Chromium (Debian's package, driven by Playwright)
against a real `streamer serve`: preview, streamed answers, watches with alerts, Esc to
cancel, a phone-sized screen, and recovery from a server restart. Screenshots of each state
go to test-artifacts/dashboard/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, start_server, stop_server
from tests.system import CHROMIUM, require
from tests.test_inference_features import _still_video

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
# What Chromium itself logs while the server is down on purpose (not the page's errors).
EXPECTED_WHILE_DOWN = ("WebSocket connection to", "ERR_CONNECTION_REFUSED", "net::ERR_")


@pytest.fixture(scope="module")
def browser():
    require("browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield browser
        browser.close()


def test_dashboard_end_to_end(browser, tiny_model: Path, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    still = _still_video(tmp_path / "still.mkv")
    config = tmp_path / "dash.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {"name": "demo", "url": "demo", "sample_fps": 2, "max_side": 448},
                    {"name": "still", "url": str(still), "sample_fps": 4},
                ],
                "model": {"id": "tiny-random", "frames": 4, "max_new_tokens": 200},
            }
        )
    )
    server = start_server(["--config", str(config)], tmp_path / "server-1.log")
    port = server.port
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    down = {"now": False}

    def on_console(msg) -> None:
        if msg.type == "error" and not (down["now"] and any(e in msg.text for e in EXPECTED_WHILE_DOWN)):
            problems.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    received: list[dict] = []

    def on_websocket(ws) -> None:
        ws.on(
            "framereceived", lambda payload: received.append(json.loads(payload)) if isinstance(payload, str) else None
        )

    page.on("websocket", on_websocket)
    try:
        # 1. Loads, connects, lists the streams, and shows the model's caveat.
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#connection.connected", timeout=20_000)
        page.wait_for_selector('#streams button[data-stream="demo"] .pill.live', timeout=20_000)
        assert "gibberish" in page.inner_text("#model-note")
        page.screenshot(path=str(ARTIFACTS / "01-loaded.png"), full_page=True)

        # 2. The preview changes over time.
        page.wait_for_selector("#preview:not([hidden])", timeout=20_000)
        first_seq = int(page.get_attribute("#preview", "data-seq"))
        page.wait_for_function(f"Number(document.querySelector('#preview').dataset.seq) > {first_seq}", timeout=10_000)
        assert "latency" in page.inner_text("#preview-info")
        page.screenshot(path=str(ARTIFACTS / "02-preview.png"), full_page=True)

        # 3. A typed question (Enter) streams in and ends as the server's final text.
        page.fill("#question", "What is moving?")
        page.press("#question", "Enter")
        page.wait_for_selector("li.ask[data-final]", timeout=30_000)
        entry = page.query_selector("li.ask[data-final]")
        qid = entry.get_attribute("data-id")
        answers = [m for m in received if m.get("type") == "answer" and m.get("id") == qid]
        tokens = [m for m in received if m.get("type") == "token" and m.get("id") == qid]
        assert len(answers) == 1 and tokens
        shown = entry.query_selector(".a").evaluate("node => node.textContent")
        assert shown == answers[0]["text"] == entry.get_attribute("data-final")
        assert entry.get_attribute("data-final") == "".join(t["text"] for t in tokens)
        assert "frames" in entry.query_selector(".meta").inner_text()
        page.screenshot(path=str(ARTIFACTS / "03-answer.png"), full_page=True)

        # 4. Esc cancels the running question.
        page.fill("#question", "Tell me everything.")
        page.press("#question", "Enter")
        page.wait_for_function("document.querySelector('li.ask:not([data-final]) .a')?.textContent.length > 0")
        page.keyboard.press("Escape")
        page.wait_for_selector('li.ask[data-error="cancelled"]', timeout=20_000)

        # 5. A watch whose alert text is forced to match: the still stream always gets the
        # same greedy answer, so learn it first, then alert on a piece of it.
        page.click('#streams button[data-stream="still"]')
        page.fill("#question", "What is moving?")
        page.press("#question", "Enter")
        page.wait_for_function("[...document.querySelectorAll('li.ask[data-final]')].length >= 2", timeout=90_000)
        learned = page.query_selector("li.ask[data-final]").get_attribute("data-final")
        needle = next(learned[i : i + 2] for i in range(len(learned)) if "\ufffd" not in learned[i : i + 2])
        page.fill("#watch-question", "What is moving?")
        page.fill("#watch-every", "1")
        page.fill("#watch-alert", needle)
        page.click("#watch-form button[type=submit]")
        page.wait_for_selector("#alerts li", timeout=30_000)
        page.wait_for_selector("#banner.alert", timeout=5_000)
        assert needle in page.inner_text("#alerts li")
        page.screenshot(path=str(ARTIFACTS / "04-alert.png"), full_page=True)

        # 6. Phone-sized screen: everything stacks into one column and stays usable.
        page.set_viewport_size({"width": 390, "height": 844})
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390 + 1, f"horizontal scrolling on a phone: {width}px"
        page.screenshot(path=str(ARTIFACTS / "05-phone.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})

        # 7. The server restarts: the page says so, reconnects with backoff, and works again.
        down["now"] = True
        assert stop_server(server) == 0
        page.wait_for_selector("#connection.disconnected", timeout=15_000)
        page.wait_for_function("document.querySelector('#banner').textContent.includes('Reconnecting')")
        page.screenshot(path=str(ARTIFACTS / "06-server-down.png"), full_page=True)
        time.sleep(1.5)
        server = start_server(["--config", str(config)], tmp_path / "server-2.log", port=port)
        # Generous deadlines from here: a restarted server loads its model and refills its
        # ring buffer, which takes far longer on a loaded 2-core machine than on a quiet one.
        page.wait_for_selector("#connection.connected", timeout=90_000)
        down["now"] = False
        assert "Reconnected" in page.inner_text("#banner")
        rounds_before = len([m for m in received if m.get("type") == "answer" and m.get("watch")])
        page.fill("#question", "Still there?")
        page.press("#question", "Enter")
        page.wait_for_function("[...document.querySelectorAll('li.ask[data-final]')].length >= 3", timeout=90_000)
        # The standing question was set up again on the new connection.
        deadline = time.monotonic() + 60
        while len([m for m in received if m.get("type") == "answer" and m.get("watch")]) <= rounds_before:
            assert time.monotonic() < deadline, "the watch did not come back after the restart"
            page.wait_for_timeout(200)
        page.screenshot(path=str(ARTIFACTS / "07-reconnected.png"), full_page=True)
    finally:
        page.close()
        stop_server(server)
    assert problems == []
