"""Issue 16: streamer's OpenAI-compatible endpoint (/v1), driven by the official, unmodified
`openai` client and by raw HTTP over loopback against a real uvicorn server with the tiny model."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from streamer.config import SourceConfig, parse_settings
from streamer.inference.engine import Engine, GenerationResult
from streamer.inference.registry import create_engine
from streamer.server.v1 import StopScanner
from tests.inproc import InProcessServer

pytestmark = pytest.mark.slow

TOKEN = "tok-v1"
CONFIG = {
    "sources": [{"name": "demo", "url": "demo", "sample_fps": 4, "max_side": 224}],
    "model": {"id": "tiny-random", "frames": 4, "max_new_tokens": 12, "max_batch": 1},
    "server": {"tokens": [TOKEN], "asks_per_minute": 1000},
}


def _until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _client(server: InProcessServer, api_key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[InProcessServer]:
    """The demo stream, a pushed stream of one still picture, and a pushed stream with no frames."""
    srv = InProcessServer(CONFIG).start(min_frames=4)
    still = srv.runtime.add_source(SourceConfig(name="still", url="push", sample_fps=1, stall_timeout_s=300))
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(6):
        still.publish(picture, pts=float(i))  # type: ignore[attr-defined]
    srv.runtime.add_source(SourceConfig(name="empty", url="push", stall_timeout_s=300))
    _until(lambda: len(still.ring) >= 4, "the still stream's frames")
    yield srv
    srv.stop()


def test_models_lists_each_stream_as_a_model(server: InProcessServer) -> None:
    """GET /v1/models through the openai client lists every stream, its id the stream's name."""
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["demo", "still", "empty"]
    assert all(m.object == "model" and m.owned_by == "streamer" for m in models.data)
    assert _client(server).models.retrieve("still").id == "still"


def test_streamed_chunks_concatenate_to_the_non_streamed_answer(server: InProcessServer) -> None:
    """stream=true gives the role first, content deltas, one finish_reason, then usage; the deltas
    concatenate to what stream=false answers for the same greedy question on the same frames."""
    client = _client(server)
    ask = {"model": "still", "messages": [{"role": "user", "content": "What is in the picture?"}]}
    whole = client.chat.completions.create(**ask, max_tokens=10, extra_body={"streamer": {"frames": 4}})
    chunks = list(
        client.chat.completions.create(
            **ask,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"streamer": {"frames": 4}},
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert content and all(content), "content deltas between the role and the finish"
    finish, usage = chunks[-2], chunks[-1]
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert finish.choices[0].finish_reason in ("stop", "length") and not finish.choices[0].delta.content
    assert usage.choices == [] and usage.usage is not None
    assert len({c.id for c in chunks}) == 1
    text = whole.choices[0].message.content
    assert text and "".join(content) == text
    assert whole.usage is not None and usage.usage.completion_tokens == whole.usage.completion_tokens > 0
    assert whole.choices[0].finish_reason == finish.choices[0].finish_reason
    frames = finish.model_extra["streamer"]["frames"]
    assert frames["count"] == 4 == whole.model_extra["streamer"]["frames"]["count"]


def test_non_streamed_answer_has_usage_and_the_frames_used(server: InProcessServer) -> None:
    """stream=false gives one chat.completion with usage, max_tokens honoured, and streamer.frames."""
    reply = _client(server).chat.completions.create(
        model="demo",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": [{"type": "text", "text": "What is moving?"}]},
        ],
        max_completion_tokens=3,
        temperature=0,
        seed=1,
    )
    assert reply.object == "chat.completion" and reply.model == "demo"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    frames = reply.model_extra["streamer"]["frames"]
    assert frames["count"] == 4 and frames["last_seq"] >= frames["first_seq"]
    if reply.usage.completion_tokens == 3:
        assert reply.choices[0].finish_reason == "length"


def test_documented_errors(server: InProcessServer) -> None:
    """Bad or missing token 401, unknown stream 404 model_not_found, bad input 400 naming the
    field, a stream without frames 503; each an OpenAI error object the client raises."""
    ask = {"messages": [{"role": "user", "content": "?"}]}
    with pytest.raises(openai.AuthenticationError) as err:
        _client(server, api_key="wrong").chat.completions.create(model="demo", **ask)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server, api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        _client(server).chat.completions.create(model="nope", **ask)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="demo", temperature=5, **ask)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="demo", messages=[{"role": "system", "content": "hi"}])
    assert err.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="demo", extra_body={"streamer": {"mode": "audio"}}, **ask)
    assert err.value.param == "streamer.mode"
    picture = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="demo", messages=[{"role": "user", "content": picture}])
    assert err.value.param == "messages.0.content.0" and "image_url" in err.value.message
    with pytest.raises(openai.InternalServerError) as err:
        _client(server).chat.completions.create(model="empty", stream=True, **ask)
    assert err.value.status_code == 503 and err.value.code == "stream_unavailable"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps({"model": "demo", **ask}), {"Content-Type": "application/json"}
    )
    missing = conn.getresponse()
    assert missing.status == 401 and json.loads(missing.read())["error"]["code"] == "invalid_api_key"
    huge = [{"role": "user", "content": "x" * server.settings.server.max_message_bytes}]
    with pytest.raises(openai.APIStatusError) as err:
        _client(server).chat.completions.create(model="demo", messages=huge)
    assert err.value.status_code == 413 and "max_message_bytes" in err.value.message


def test_sse_framing_over_raw_http(server: InProcessServer) -> None:
    """A curl-like client sees `data: {json}` events separated by blank lines, ending `data: [DONE]`."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "demo", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "?"}]}
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length") and payloads[-1]["usage"] is None
    assert payloads[-1]["streamer"]["frames"]["count"] == 4


def test_stop_strings_cut_the_answer_where_one_appears(server: InProcessServer) -> None:
    """`stop` ends the answer before the first stop string, streamed or not, finish_reason stop."""
    client = _client(server)
    ask = {"model": "still", "messages": [{"role": "user", "content": "What is in the picture?"}], "max_tokens": 10}
    text = client.chat.completions.create(**ask).choices[0].message.content
    assert text and len(text) > 2
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(**ask, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**ask, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.find(stop)]


def test_stop_scanner_holds_back_what_may_start_a_stop_string() -> None:
    """Pieces pass through except a possible stop-string prefix; the stop string and after are dropped."""
    scanner = StopScanner(("END",))
    out = [scanner.feed(p) for p in ["ab", "cE", "Nd", "E", "ND", "more"]]
    assert out == ["", "ab", "cE", "N", "d", ""] and scanner.stopped
    unstopped = StopScanner(("END",))
    assert unstopped.feed("xyEN") + unstopped.flush() == "xyEN" and not unstopped.stopped


class GatedEngine(Engine):
    """The real engine, but each generation waits for ``gate`` (or a stop) before it runs."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.note = inner.note
        self.gate = threading.Event()
        self.entered = threading.Event()

    def generate(self, request, on_text, should_stop):
        return self.generate_batch([request], [on_text], [should_stop])[0]

    def generate_batch(self, requests, on_texts, should_stops, **kwargs):
        self.entered.set()
        while not self.gate.wait(0.02):
            if all(stop() for stop in should_stops):
                return [GenerationResult("", [], True, None) for _ in requests]
        return self.inner.generate_batch(requests, on_texts, should_stops, **kwargs)


@pytest.fixture
def gated(tiny_model: Path) -> Iterator[tuple[InProcessServer, GatedEngine]]:
    config = {**CONFIG, "server": {**CONFIG["server"], "queue_size": 1}}
    engine = GatedEngine(create_engine(parse_settings(config).model))
    srv = InProcessServer(config, engine=engine).start(min_frames=4)
    yield srv, engine
    engine.gate.set()
    srv.stop()


def test_a_full_queue_is_429_and_a_disconnect_cancels_the_question(gated) -> None:
    """With one question running and the queue full a third is refused 429 busy; a client that
    leaves mid-stream (or before a stream=false answer) ends its question `cancelled`, in the
    loop and in /metrics."""
    server, engine = gated
    client = _client(server)
    ask = {"model": "demo", "messages": [{"role": "user", "content": "?"}], "max_tokens": 12}
    running = client.chat.completions.create(**ask, stream=True)
    first = next(iter(running))
    assert first.choices[0].delta.role == "assistant"
    assert engine.entered.wait(60), "the first question runs"
    waiting = client.chat.completions.create(**ask, stream=True)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(**ask)
    assert err.value.status_code == 429 and err.value.code == "busy"
    before = server.loop.outcomes.get("cancelled", 0)
    running.close()  # the client goes away mid-stream
    waiting.close()
    _until(lambda: server.loop.outcomes.get("cancelled", 0) == before + 2, "both questions cancelled")
    submitted = server.loop.submitted
    body = json.dumps({**ask, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # stream=false, then gone
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        _until(lambda: server.loop.submitted == submitted + 1, "the non-streamed question asked")
    _until(lambda: server.loop.outcomes.get("cancelled", 0) == before + 3, "the non-streamed question cancelled")
    engine.gate.set()
    reply = client.chat.completions.create(**ask)
    assert reply.choices[0].message.content is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    assert 'streamer_questions_total{kind="ask",outcome="cancelled"} 3.0' in metrics
    assert 'streamer_questions_total{kind="ask",outcome="busy"} 1.0' in metrics
    assert 'streamer_questions_total{kind="ask",outcome="answer"} 1.0' in metrics
    assert sum(server.loop.outcomes.values()) == server.loop.submitted == 5, "each question ended once"


def test_a_shutdown_mid_stream_ends_it_with_an_error_event(gated) -> None:
    """A server stopping while an answer streams sends an OpenAI error event (`shutting_down`),
    which the openai client raises, and the question ends once."""
    server, engine = gated
    stream = _client(server).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "?"}], max_tokens=12, stream=True
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    assert engine.entered.wait(60), "the question runs"
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    with pytest.raises(openai.APIError) as err:
        list(chunks)
    assert err.value.code == "shutting_down"
    stopping.join(60)
    assert server.loop.outcomes == {"shutting_down": 1}


def test_temperature_top_p_and_seed_are_honoured_per_question(server: InProcessServer) -> None:
    """temperature 0 answers as the configured greedy decoding (fast path vs generate); temperature
    above 0 samples, the same seed giving the same answer and another seed another one."""
    client = _client(server)
    ask = {"model": "still", "messages": [{"role": "user", "content": "What is in the picture?"}], "max_tokens": 12}

    def answer(**settings: object) -> str:
        text = client.chat.completions.create(**ask, **settings).choices[0].message.content  # type: ignore[arg-type]
        assert text is not None
        return text

    greedy = answer()
    assert answer(temperature=0, seed=3) == greedy
    hot = answer(temperature=1.5, top_p=1.0, seed=7)
    assert answer(temperature=1.5, top_p=1.0, seed=7) == hot
    assert answer(temperature=1.5, top_p=1.0, seed=8) != hot
    assert hot != greedy


def test_the_remote_engine_sends_a_questions_own_sampling_settings() -> None:
    """With model.backend openai a question's temperature, top_p and seed go to vLLM over the
    configured ones; temperature 0 is greedy whatever is configured."""
    from streamer.config import ModelConfig
    from streamer.inference.questions import Sampling
    from streamer.inference.remote import RemoteEngine

    greedy = RemoteEngine(ModelConfig(backend="openai", base_url="http://127.0.0.1:9/v1"))
    assert greedy.sampling(Sampling(top_p=0.5, seed=3)) == {"temperature": 1.0, "top_p": 0.5, "seed": 3}
    assert greedy.sampling(Sampling(temperature=0.8)) == {"temperature": 0.8}
    sampled = RemoteEngine(
        ModelConfig(backend="openai", base_url="http://127.0.0.1:9/v1", do_sample=True, temperature=0.7, seed=1)
    )
    assert sampled.sampling(Sampling(temperature=0, seed=5)) == {"temperature": 0.0}
    assert sampled.sampling(Sampling(seed=5)) == {"temperature": 0.7, "seed": 5}
    assert sampled.sampling() == {"temperature": 0.7, "seed": 1}
