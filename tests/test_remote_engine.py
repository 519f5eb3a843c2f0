"""The remote engine without vLLM: request bytes, the JPEG cache, settings, and servers that
are dead, silent or failing (real loopback sockets). tests/test_remote_vllm.py runs it
against a real vLLM."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from streamer.config import ConfigError, ModelConfig, parse_settings
from streamer.inference.engine import GenerationRequest
from streamer.inference.jpeg_window import JpegFrames
from streamer.inference.loader import ModelLoadError
from streamer.inference.remote import RemoteEngine, RemoteError


def _frames(n: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _request(frames: list[np.ndarray], ids: tuple, question: str = "What is moving?", **kw) -> GenerationRequest:
    return GenerationRequest(
        frames=frames, question=question, max_new_tokens=8, sample_fps=2.0, stream="cam", frame_ids=ids, **kw
    )


def _engine(url: str = "http://127.0.0.1:9/v1", **settings) -> RemoteEngine:
    return RemoteEngine(ModelConfig(backend="openai", base_url=url, **settings))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


class LoopbackHTTP:
    """A real TCP server on loopback that records each HTTP request and then either never
    answers (``reply=None``) or sends ``reply`` and closes."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            headers = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
            length = int(headers.get(b"content-length", 0))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            if self.reply is not None:
                conn.sendall(self.reply)
                conn.close()
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()
        for conn in self._open:
            conn.close()


@pytest.fixture
def silent() -> Iterator[LoopbackHTTP]:
    server = LoopbackHTTP(reply=None)
    yield server
    server.close()


def test_identical_windows_give_byte_identical_requests_and_frames_are_encoded_once() -> None:
    """Two questions about one window (frames as fresh arrays) give the same body bar the
    question; a window slid by one frame encodes only the new frame and reuses the others' bytes."""
    engine = _engine()
    frames = _frames(9)
    ids = tuple((seq, float(seq)) for seq in range(9))
    first = engine.request_body(_request(frames[:8], ids[:8]))
    again = engine.request_body(_request([f.copy() for f in frames[:8]], ids[:8]))
    other = engine.request_body(_request(frames[:8], ids[:8], question="Who is there?"))
    assert json.dumps(first).encode() == json.dumps(again).encode()
    assert json.dumps(first).replace("What is moving?", "Who is there?") == json.dumps(other)
    assert engine.jpeg.misses == 8 and engine.jpeg.hits == 16

    slid = engine.request_body(_request(frames[1:9], ids[1:9]))
    assert engine.jpeg.misses == 9  # only the new frame
    url = first["messages"][0]["content"][0]["video_url"]["url"]
    assert url.startswith("data:video/jpeg;base64,")
    old_parts = url.removeprefix("data:video/jpeg;base64,").split(",")
    new_parts = slid["messages"][0]["content"][0]["video_url"]["url"].removeprefix("data:video/jpeg;base64,").split(",")
    assert new_parts[:7] == old_parts[1:] and len(new_parts) == 8
    # The video comes before the question, as the local engine prompts.
    assert [p["type"] for p in first["messages"][0]["content"]] == ["video_url", "text"]
    engine.close()


def test_image_mode_sends_the_newest_frame_as_one_image_and_system_prompt_first() -> None:
    """Image mode: one image_url part holding the newest frame's JPEG; a system prompt goes first."""
    engine = _engine(system_prompt="Be brief.")
    frames = _frames(2)
    body = engine.request_body(_request(frames, ((0, 0.0), (1, 1.0)), mode="image"))
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    image = user["content"][0]
    assert image["type"] == "image_url"
    assert image["image_url"]["url"] == "data:image/jpeg;base64," + engine.jpeg.frame("cam", (1, 1.0), frames[1])
    engine.close()


def test_jpeg_cache_is_bounded_in_bytes_and_drops_the_least_recently_used() -> None:
    """The cache never holds more than its byte bound, drops the oldest first, and with a
    bound of 0 keeps nothing (each use encodes)."""
    frames = _frames(6)
    one = len(JpegFrames(1 << 20, 90).frame("s", 0, frames[0]))
    cache = JpegFrames(3 * one + one // 2, 90)  # room for three frames of about this size
    for i, rgb in enumerate(frames):
        cache.frame("s", i, rgb)
        assert cache.bytes <= cache.max_bytes
    assert ("s", 5) in cache and ("s", 0) not in cache
    none = JpegFrames(0, 90)
    none.frame("s", 0, frames[0])
    none.frame("s", 0, frames[0])
    assert (len(none), none.misses, none.encode_missing("s", frames, list(range(6)))) == (0, 2, 0)


def test_greedy_unless_sampling_is_configured() -> None:
    """temperature 0 by default (vLLM samples otherwise); configured sampling settings and seed
    are sent when do_sample is true; a repetition penalty always."""
    assert _engine().sampling() == {"temperature": 0.0}
    assert _engine(do_sample=False, temperature=0.7).sampling() == {"temperature": 0.0}
    sampled = _engine(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, seed=7, repetition_penalty=1.05)
    assert sampled.sampling() == {"temperature": 0.7, "top_p": 0.9, "seed": 7}
    assert sampled.sampling_extra() == {"repetition_penalty": 1.05, "top_k": 20}
    assert _engine(repetition_penalty=1.1).sampling_extra() == {"repetition_penalty": 1.1}


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ({"backend": "openai"}, "needs base_url or base_urls"),
        ({"base_url": "http://127.0.0.1:8000/v1"}, "are for backend 'openai'"),
        ({"backend": "openai", "base_url": "ftp://host/v1"}, "is not an http(s) URL"),
        ({"backend": "openai", "base_url": "http://a/v1", "base_urls": ["http://a/v1"]}, "listed twice"),
        ({"backend": "openai", "base_url": "http://a/v1", "api_key_env": "not a name"}, "api_key_env"),
    ],
)
def test_remote_settings_are_validated(model: dict, fragment: str) -> None:
    """Bad remote settings fail at start-up with a message naming the field."""
    with pytest.raises(ConfigError) as info:
        parse_settings({"sources": [{"name": "s", "url": "demo"}], "model": model})
    assert fragment in str(info.value)


def test_a_dead_server_fails_the_question_at_once_with_a_clear_error() -> None:
    """A closed port: the question fails (no hang) naming the server, the server is ejected,
    and the next question probes it again at once instead of failing on the backoff alone."""
    port = _closed_port()
    engine = _engine(f"http://user:secret@127.0.0.1:{port}/v1", backend_backoff_s=60, backend_backoff_max_s=60)
    request = _request(_frames(2), ((0, 0.0), (1, 1.0)))
    with pytest.raises(RemoteError) as info:
        engine.generate(request, lambda piece: None, lambda: False)
    message = str(info.value)
    assert f"http://***@127.0.0.1:{port}/v1" in message and "secret" not in message
    assert "ConnectError" in message or "refused" in message.lower()
    (status,) = engine.backend_statuses()
    assert status["state"] == "down" and status["ejections"] == 1 and status["retry_in_s"] > 30
    with pytest.raises(RemoteError, match="probe failed"):
        engine.generate(request, lambda piece: None, lambda: False)
    assert engine.backend_statuses()[0]["consecutive_failures"] == 2
    engine.close()


def test_a_silent_server_times_out_and_a_stop_ends_the_wait(silent: LoopbackHTTP) -> None:
    """A server that accepts and never answers ends the question after read_timeout_s with a
    clear error; while waiting on it, a stop ends the request at once (no timeout needed)."""
    engine = _engine(silent.url, read_timeout_s=1.0)
    request = _request(_frames(2), ((0, 0.0), (1, 1.0)))
    started = time.monotonic()
    with pytest.raises(RemoteError, match="timed out"):
        engine.generate(request, lambda piece: None, lambda: False)
    assert time.monotonic() - started < 60  # bounded: 1 s here, with room for a loaded machine

    patient = _engine(silent.url, read_timeout_s=600.0)
    stop_at = time.monotonic() + 0.5
    result = patient.generate(request, lambda piece: None, lambda: time.monotonic() > stop_at)
    assert result.stopped and result.text == "" and result.token_ids == []
    assert time.monotonic() - stop_at < 30
    assert patient.backend_statuses()[0]["requests"] == {"answered": 0, "stopped": 1, "failed": 0}
    engine.close()
    patient.close()


def test_requests_carry_the_api_key_and_identical_windows_send_identical_bytes(
    silent: LoopbackHTTP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a real HTTP connection: the key from api_key_env goes in the Authorization header,
    and two questions about one window send byte-identical bodies."""
    monkeypatch.setenv("TEST_REMOTE_KEY", "sk-test-123")
    engine = _engine(silent.url, api_key_env="TEST_REMOTE_KEY")
    frames, ids = _frames(4), tuple((i, float(i)) for i in range(4))
    for n, copy in enumerate((frames, [f.copy() for f in frames]), start=1):
        engine.generate(_request(copy, ids), lambda piece: None, lambda n=n: len(silent.requests) >= n)
    first, second = (r.partition(b"\r\n\r\n") for r in silent.requests)
    assert b"authorization: bearer sk-test-123" in first[0].lower()
    assert first[2] == second[2] and len(first[2]) > 4 * 1000
    assert engine.backend_statuses()[0]["request_bytes"] == 2 * len(first[2])
    body = json.loads(first[2])
    assert body["temperature"] == 0.0 and body["return_token_ids"] is True and body["model"] == engine.served_name
    engine.close()
    monkeypatch.delenv("TEST_REMOTE_KEY")
    with pytest.raises(ModelLoadError, match="TEST_REMOTE_KEY"):
        _engine(silent.url, api_key_env="TEST_REMOTE_KEY")


def test_a_server_error_moves_the_question_to_the_next_server(silent: LoopbackHTTP) -> None:
    """A pool of a server that answers HTTP 500 and one that is silent: a question sent to the
    first goes on to the second, and the first is ejected with the status in its error."""
    failing = LoopbackHTTP(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    try:
        engine = RemoteEngine(ModelConfig(backend="openai", base_urls=[silent.url, failing.url]))
        stream = next(s for s in (f"cam{i}" for i in range(64)) if engine.pool.order(s)[0].url == failing.url)
        request = GenerationRequest(_frames(2), "One?", 8, 2.0, stream=stream, frame_ids=((0, 0.0), (1, 1.0)))
        result = engine.generate(request, lambda piece: None, lambda: len(silent.requests) >= 1)
        assert result.stopped and len(failing.requests) == 1 and len(silent.requests) == 1
        statuses = {s["url"]: s for s in engine.backend_statuses()}
        assert statuses[failing.url]["state"] == "down" and "HTTP 500" in statuses[failing.url]["last_error"]
        assert statuses[failing.url]["requests"] == {"answered": 0, "stopped": 0, "failed": 1}
        assert statuses[silent.url]["state"] == "up" and statuses[silent.url]["requests"] == {
            "answered": 0,
            "stopped": 1,
            "failed": 0,
        }
        engine.close()
    finally:
        failing.close()
