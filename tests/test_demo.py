"""`streamer demo` from a cold cache: builds the tiny model, serves, answers within 60 s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import websockets

from tests.conftest import start_server, stop_server
from tests.wsclient import ProtocolClient

pytestmark = pytest.mark.slow


def test_demo_answers_first_question_within_60s_of_start(tmp_path: Path) -> None:
    cache = tmp_path / "fresh-cache"
    started = time.monotonic()
    server = start_server([], tmp_path / "demo.log", env={"STREAMER_CACHE": str(cache)}, command="demo", timeout=60)
    try:

        async def first_answer() -> dict:
            client = await ProtocolClient.connect(server.url)
            await client.recv_type("welcome")
            # Ask as soon as the stream has a frame, as an impatient user would.
            while True:
                msgs = await client.ask("first", max_new_tokens=16)
                if msgs[-1].get("code") != "stream_unavailable":
                    break
                await asyncio.sleep(0.2)
            await client.close()
            return msgs[-1]

        answer = asyncio.run(first_answer())
        elapsed = time.monotonic() - started
        log = server.log()
    finally:
        assert stop_server(server) == 0
    assert answer["type"] == "answer", answer
    assert elapsed < 60, f"first answer after {elapsed:.1f} s"
    assert (cache / "tiny-qwen2-vl-v1" / "config.json").is_file()  # built on first use
    assert "building the tiny random Qwen2-VL" in log  # progress shown while building
    assert "gibberish" in log  # and the banner says what the answers are worth
    assert "streamer ask --stream demo" in log  # it tells the user how to ask


def test_demo_refuses_clients_without_the_token(tiny_model: Path, tmp_path: Path) -> None:
    server = start_server(["--token", "s3cret-token"], tmp_path / "auth.log", command="demo")

    async def scenario() -> tuple[dict, int | None, dict, dict]:
        anon = await ProtocolClient.connect(server.url)
        refused = await anon.recv()
        try:
            await asyncio.wait_for(anon.ws.recv(), 5)
        except websockets.ConnectionClosed as closed:
            close_code = closed.rcvd.code if closed.rcvd else None
        by_header = await ProtocolClient.connect(
            server.url, additional_headers={"Authorization": "Bearer s3cret-token"}
        )
        header_welcome = await by_header.recv()
        await by_header.close()
        by_hello = await ProtocolClient.connect(server.url)
        await by_hello.send({"type": "hello", "token": "s3cret-token", "client": "test"})
        hello_welcome = await by_hello.recv()
        await by_hello.close()
        return refused, close_code, header_welcome, hello_welcome

    try:
        refused, close_code, header_welcome, hello_welcome = asyncio.run(scenario())
        log = server.log()
    finally:
        stop_server(server)
    assert refused["type"] == "error" and refused["code"] == "unauthorized"
    assert close_code == 1008
    assert header_welcome["type"] == "welcome" and hello_welcome["type"] == "welcome"
    assert "s3cret-token" not in log
