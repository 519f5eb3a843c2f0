"""Issue 5 over real loopback sockets: auth, origins, TLS, limits, fuzzing, slow clients,
previews, metrics, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as sync_connect

from streamer.server.protocol import ProtocolError, parse_client_message
from tests.conftest import ServerProcess, start_server
from tests.inproc import InProcessServer
from tests.wsclient import ProtocolClient

pytestmark = pytest.mark.slow

DEMO = {
    "sources": [{"name": "demo", "url": "demo", "sample_fps": 4, "max_side": 320}],
    "model": {"id": "tiny-random", "frames": 4, "max_new_tokens": 8},
}


def _with_server(**server: object) -> dict:
    return {**DEMO, "server": server}


async def _client(url: str, **kwargs: object) -> ProtocolClient:
    client = await ProtocolClient.connect(url, **kwargs)
    await client.recv_type("welcome")
    return client


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def inproc(tiny_model: Path):
    server = InProcessServer(
        _with_server(tokens=["tok-1", "tok-2"], allowed_origins=["https://dash.example"], asks_per_minute=600)
    ).start(min_frames=4)
    yield server
    server.stop()


async def test_tokens_header_hello_wrong_and_missing(inproc: InProcessServer, monkeypatch) -> None:
    bearer = await _client(inproc.url, additional_headers={"Authorization": "Bearer tok-2"})
    await bearer.close()

    hello = await ProtocolClient.connect(inproc.url)
    await hello.send({"type": "hello", "token": "tok-1"})
    assert (await hello.recv())["type"] == "welcome"
    assert (await hello.ask("after-hello"))[-1]["type"] == "answer"
    await hello.close()

    for first in ({"type": "hello", "token": "tok-3"}, {"type": "ask", "id": "x", "stream": "demo", "question": "?"}):
        wrong = await ProtocolClient.connect(inproc.url)
        await wrong.send(first)
        refused = await wrong.recv()
        assert refused["type"] == "error" and refused["code"] == "unauthorized"
        assert "tok-" not in refused["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await wrong.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    bad_header = await ProtocolClient.connect(inproc.url, additional_headers={"Authorization": "Bearer nope"})
    await bad_header.send({"type": "subscribe", "stream": "demo"})
    assert (await bad_header.recv())["code"] == "unauthorized"
    await bad_header.close()


async def test_origins(inproc: InProcessServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(inproc.url, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    ok = await ProtocolClient.connect(inproc.url, origin="https://dash.example")
    await ok.send({"type": "hello", "token": "tok-1"})
    assert (await ok.recv())["type"] == "welcome"
    await ok.close()


async def test_huge_message_is_refused_and_others_are_served(inproc: InProcessServer) -> None:
    other = await _client(inproc.url, additional_headers={"Authorization": "Bearer tok-1"})
    big = await _client(inproc.url, additional_headers={"Authorization": "Bearer tok-1"})
    await big.send({"type": "ask", "id": "big", "stream": "demo", "question": "x" * (10 * 1024 * 1024)})
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await big.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    assert (await other.ask("still-served"))[-1]["type"] == "answer"
    await other.close()


async def test_metrics_are_prometheus_text(inproc: InProcessServer) -> None:
    client = await _client(inproc.url, additional_headers={"Authorization": "Bearer tok-1"})
    await client.ask("for-metrics")
    text = _metrics(inproc.port)
    await client.close()
    for name in (
        "streamer_open_connections",
        'streamer_questions_total{kind="ask",outcome="answer"}',
        "streamer_queue_depth",
        "streamer_time_to_first_token_seconds_bucket",
        "streamer_answer_seconds_count",
        'streamer_frames_in_total{stream="demo"}',
        'streamer_frames_sampled_total{stream="demo"}',
        'streamer_frames_dropped_total{stream="demo"}',
        'streamer_reconnects_total{stream="demo"}',
        'streamer_stream_up{stream="demo"} 1.0',
        'streamer_model_memory_bytes{kind="weights"}',
    ):
        assert name in text, name
    assert "tok-1" not in text


async def test_previews_are_jpegs_encoded_once_per_stream_and_rate(inproc: InProcessServer) -> None:
    headers = {"Authorization": "Bearer tok-1"}
    clients = [await _client(inproc.url, additional_headers=headers) for _ in range(3)]
    for c in clients:
        await c.send({"type": "subscribe", "stream": "demo", "preview_fps": 4, "max_width": 200})
    got = []
    for _ in range(3):
        while True:  # the preview header, then its JPEG as the very next (binary) frame
            raw = await asyncio.wait_for(clients[0].ws.recv(), 10)
            if isinstance(raw, str) and json.loads(raw)["type"] == "preview":
                header = json.loads(raw)
                jpeg = await asyncio.wait_for(clients[0].ws.recv(), 10)
                assert isinstance(jpeg, bytes)
                got.append((header, jpeg))
                break
    feeds = dict(inproc.runtime_state.previews.feeds)
    for c in clients:
        await c.close()
    assert len(feeds) == 1  # three subscribers, one encoder
    seqs = [h["seq"] for h, _ in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    for header, jpeg in got:
        assert header["stream"] == "demo" and header["bytes"] == len(jpeg)
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[1] == header["width"] <= 192 and image.shape[0] == header["height"]


def _gets_a_real_reply(message: str | bytes) -> bool:
    """A valid request (other than cancelling an unknown id) is answered for real, not with an error."""
    if not isinstance(message, str):
        return False
    try:
        parsed = parse_client_message(message)
    except ProtocolError:
        return False
    return parsed is not None and parsed.type in ("hello", "subscribe", "ask", "watch")


# While Hypothesis draws, the running server's other threads (keepalive pings) may touch the
# `random` module, which Hypothesis reports as a strategy using it; its examples come from its
# own generator (derandomized below), so they are the same 2000 either way.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_fuzzing_2000_messages_each_gets_an_error(inproc: InProcessServer) -> None:
    """2000 malformed messages (a fixed, seeded sequence) each get `bad_request`; the server then still answers."""
    ws = sync_connect(
        inproc.url, additional_headers={"Authorization": "Bearer tok-1"}, max_size=None, ping_interval=None
    ).__enter__()
    assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
    sent = 0

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
        max_leaves=12,
    )
    messages = st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),
        json_values.map(json.dumps),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["ask", "cancel", "watch", "subscribe", "hello", "nope", ""])},
            optional={
                "id": json_values,
                "stream": st.sampled_from(["demo", "", 5, None]) | json_values,
                "question": json_values,
                "frames": st.integers(-5, 100) | json_values,
                "every_s": json_values,
                "preview_fps": json_values,
                "token": json_values,
            },
        ).map(json.dumps),
    ).filter(lambda m: not _gets_a_real_reply(m))

    # derandomize: the same 2000 examples on every run; the filter above means every
    # example counts, so the number sent does not depend on chance. They are drawn first and
    # sent after, so the test's own traffic does not touch `random` during the draw.
    drawn: list[str | bytes] = []

    @settings(
        max_examples=2000, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(messages)
    def draw(message: str | bytes) -> None:
        drawn.append(message)

    draw()
    for message in drawn:
        ws.send(message)
        sent += 1
        reply = json.loads(ws.recv(timeout=10))
        assert reply["type"] == "error", (message, reply)
        assert reply["code"] == "bad_request", (message, reply)
    ws.send(json.dumps({"type": "ask", "id": "after-fuzz", "stream": "demo", "question": "Still there?"}))
    finals = []
    while not finals:
        m = json.loads(ws.recv(timeout=30))
        if m.get("id") == "after-fuzz" and m["type"] in ("answer", "error"):
            finals.append(m)
    ws.close()
    assert sent == 2000, sent
    assert finals[0]["type"] == "answer"


def _raw_websocket(port: int, recv_buffer: int = 4096) -> socket.socket:
    """A client that completes the handshake and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0]
    return sock


def _client_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    n = len(payload)
    if n < 126:
        header += bytes([0x80 | n])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_client_that_never_reads_delays_nobody_and_is_cut_off(tiny_model: Path) -> None:
    server = InProcessServer(
        {
            "sources": [
                {"name": "demo", "url": "demo", "sample_fps": 4, "max_side": 1280, "width": 1280, "height": 720}
            ],
            "model": {"id": "tiny-random", "frames": 2, "max_new_tokens": 8, "max_pixels": 128 * 28 * 28},
            "server": {"outbox_messages": 20},
        }
    ).start(min_frames=2)
    try:
        fast = await _client(server.url)

        async def timed_answers(prefix: str, n: int) -> list[float]:
            times = []
            for i in range(n):
                t0 = time.monotonic()
                msgs = await fast.ask(f"{prefix}{i}")
                assert msgs[-1]["type"] == "answer"
                times.append(time.monotonic() - t0)
            return times

        alone = await timed_answers("alone", 3)
        slow = _raw_websocket(server.port)
        slow.sendall(
            _client_frame(json.dumps({"type": "subscribe", "stream": "demo", "preview_fps": 10, "max_width": 4096}))
        )
        stop_asking = asyncio.Event()

        async def keep_asking() -> None:  # answers pile up once the socket buffers are full
            for i in range(1000):
                if stop_asking.is_set():
                    return
                ask = {"type": "ask", "id": f"s{i}", "stream": "demo", "question": "?", "max_new_tokens": 20}
                try:
                    slow.sendall(_client_frame(json.dumps(ask)))
                except OSError:
                    return  # cut off
                await asyncio.sleep(0.3)

        asker = asyncio.create_task(keep_asking())
        await asyncio.sleep(1.0)
        beside = await timed_answers("beside", 3)
        deadline = time.monotonic() + 60
        while "streamer_slow_client_disconnects_total 1.0" not in _metrics(server.port):
            assert time.monotonic() < deadline, "the slow client was never cut off"
            await asyncio.sleep(0.2)
        stop_asking.set()
        await asker
        dropped = _metrics(server.port)
        after = await timed_answers("after", 2)
        await fast.close()
        slow.close()
    finally:
        server.stop()
    print(f"answer seconds alone={alone} beside a non-reader={beside} after={after}")
    # The fast client is not held up by the one that does not read: had it waited for the
    # non-reader's socket, its answers would stall until the cut-off. The bound is generous
    # because the CPU is shared (answers take about 0.1 s; benchmarks/load.py measures this).
    assert max(beside) < 10 * max(alone) + 5.0, (alone, beside)
    assert "streamer_slow_client_disconnects_total 1.0" in dropped


async def test_connection_and_question_limits(tiny_model: Path) -> None:
    server = InProcessServer(_with_server(max_connections=2, max_open_per_connection=1, asks_per_minute=3)).start(
        min_frames=4
    )
    try:
        a = await _client(server.url)
        b = await _client(server.url)
        third = await ProtocolClient.connect(server.url)
        refused = await third.recv()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await third.ws.recv()
        assert refused["code"] == "busy" and closed.value.rcvd.code == 1013

        await a.send({"type": "ask", "id": "one", "stream": "demo", "question": "?", "max_new_tokens": 200})
        await a.send({"type": "ask", "id": "two", "stream": "b", "question": "?"})
        second = await a.until_final("two")
        assert second[-1]["code"] == "busy"
        await a.until_final("one")
        results = [(await a.ask(f"r{i}"))[-1] for i in range(3)]
        await b.close()
        await a.close()
    finally:
        server.stop()
    # 3 a minute: "one", r0 and r1 pass ("two" was refused before it counted); r2 is over.
    assert [r["type"] for r in results[:2]] == ["answer", "answer"]
    assert results[2]["code"] == "rate_limited"


def test_tls(tiny_model: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = InProcessServer(_with_server(tls_cert=str(cert), tls_key=str(key))).start(min_frames=4)
    context = ssl.create_default_context(cafile=str(cert))
    try:
        with sync_connect(f"wss://127.0.0.1:{server.port}/ws", ssl=context) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        with (
            pytest.raises((websockets.InvalidMessage, OSError)),
            sync_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=5),
        ):
            pass
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/healthz", context=context, timeout=5) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        server.stop()


def test_sigterm_ends_every_open_ask_and_exits_0(tiny_model: Path, tmp_path: Path) -> None:
    server: ServerProcess = start_server(["--config", "configs/demo.yaml"], tmp_path / "server.log")
    deadline = time.monotonic() + 60  # questions use 8 frames: wait until the stream holds them
    while (server.healthz()["streams"][0]["frames_buffered"] or 0) < 8:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)

    async def scenario() -> tuple[dict[str, dict], list[int | None]]:
        clients = [await _client(server.url) for _ in range(3)]
        for i, c in enumerate(clients):
            await c.send({"type": "ask", "id": f"q{i}", "stream": "demo", "question": "Go on.", "max_new_tokens": 1024})
        await clients[0].recv_type("token")  # a generation is running
        os.kill(server.proc.pid, signal.SIGTERM)
        finals, codes = {}, []
        for i, c in enumerate(clients):
            finals[f"q{i}"] = (await c.until_final(f"q{i}", timeout=30))[-1]
            try:
                while True:
                    await asyncio.wait_for(c.ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else None)
        return finals, codes

    finals, codes = asyncio.run(scenario())
    rc = server.proc.wait(timeout=30)
    assert rc == 0, server.log()
    for final in finals.values():
        assert final["type"] == "answer" or final["code"] == "shutting_down", final
    assert codes == [1001, 1001, 1001]
