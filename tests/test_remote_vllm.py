"""``model.backend: openai`` against a real vLLM (CPU) serving the tiny model: the protocol's
core cases over real WebSockets, the prefix cache on repeated windows, a pool with a dead
server, and vLLM killed mid-answer. One vLLM server for the module."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamer.benchmark.clips import write_video
from streamer.inference.remote import RemoteEngine
from tests.inproc import InProcessServer
from tests.system import require
from tests.vllm_server import SERVED_NAME, VllmServer, free_port
from tests.wsclient import ProtocolClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    require("vllm")
    server = VllmServer(tiny_model, free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def still_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve different 224x224 pictures at 4 fps: a file read once (no loop, not paced) leaves
    the same frames in the ring, so every question sees the same window."""
    rng = np.random.default_rng(7)
    frames = [np.repeat(np.repeat(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), 16, 0), 16, 1) for _ in range(12)]
    path = tmp_path_factory.mktemp("video") / "still.avi"
    return write_video(path, frames, codec="mjpeg", pix_fmt="yuvj420p", fps=4)


def _config(urls: list[str], still_video: Path, **model) -> dict:
    return {
        "sources": [
            {"name": "live", "url": "demo", "sample_fps": 4, "max_side": 224},
            {
                "name": "still",
                "url": str(still_video),
                "sample_fps": 4,
                "max_side": 224,
                "loop": False,
                "realtime": False,
            },
        ],
        "model": {
            "id": SERVED_NAME,
            "backend": "openai",
            "base_urls": urls,
            "frames": 8,
            "max_new_tokens": 16,
            "max_batch": 4,
            **model,
        },
        "server": {"queue_size": 64},
    }


@pytest.fixture(scope="module")
def served(vllm: VllmServer, still_video: Path) -> Iterator[InProcessServer]:
    """streamer with backend openai on the module's vLLM (in-process: tests read its engine)."""
    server = InProcessServer(_config([vllm.base_url], still_video)).start()
    yield server
    server.stop()


async def _client(url: str) -> ProtocolClient:
    client = await ProtocolClient.connect(url)
    await client.recv_type("welcome")
    return client


def _engine(server: InProcessServer) -> RemoteEngine:
    engine = server.runtime.engine
    assert isinstance(engine, RemoteEngine)
    return engine


def _healthz(server: InProcessServer) -> dict:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        return json.loads(r.read())


async def test_ask_streams_tokens_that_make_the_answer(served: InProcessServer) -> None:
    """An ask gets accepted, tokens that concatenate to the answer, and the answer with vLLM's
    token ids (16: the tiny model never ends early); welcome names the model and its note."""
    client = await ProtocolClient.connect(served.url)
    welcome = await client.recv_type("welcome")
    msgs = await client.ask("q1", stream="live", max_new_tokens=16)
    await client.close()
    assert welcome["model"]["id"] == SERVED_NAME and "gibberish" in welcome["model"]["note"]
    assert "backends" not in welcome["model"]
    assert msgs[0] == {"type": "accepted", "id": "q1", "position": 0}
    answer = msgs[-1]
    assert answer["type"] == "answer", answer
    tokens = [m["text"] for m in msgs if m["type"] == "token"]
    assert tokens and "".join(tokens) == answer["text"]
    assert len(answer["token_ids"]) == 16 and all(isinstance(t, int) for t in answer["token_ids"])
    assert answer["frames"]["count"] == 8
    t = answer["timings"]
    assert 0 <= t["queued_ms"] <= t["first_token_ms"] <= t["total_ms"]


async def test_repeated_window_hits_the_prefix_cache_with_identical_answers(
    served: InProcessServer, vllm: VllmServer
) -> None:
    """Two asks on the same window: the second sends each frame's kept JPEG again, vLLM serves
    all of its prompt but the last partial block from its prefix cache, and greedy answers agree."""
    engine = _engine(served)
    client = await _client(served.url)
    first = (await client.ask("w1", stream="still", max_new_tokens=8))[-1]
    before = engine.backend_statuses()[0]
    hits = engine.jpeg.hits
    vllm_cached = vllm.metric("vllm:prompt_tokens_cached_total")
    second = (await client.ask("w2", stream="still", max_new_tokens=8))[-1]
    await client.close()
    after = engine.backend_statuses()[0]
    assert first["type"] == second["type"] == "answer"
    assert first["frames"] == second["frames"]  # the same window
    assert engine.jpeg.hits == hits + 8  # every frame's kept encoding went out again
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    cached = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    # The whole prompt repeats: all of it is cached but the last, partial block (--block-size 32).
    assert 0 < prompt - cached <= 32, (prompt, cached)
    assert vllm.metric("vllm:prompt_tokens_cached_total") > vllm_cached
    assert first["token_ids"] == second["token_ids"] and first["text"] == second["text"]


async def test_cancel_closes_the_stream_and_vllm_stops_generating(served: InProcessServer, vllm: VllmServer) -> None:
    """A cancel ends a 1024-token answer with `cancelled`, the engine closes that HTTP stream, and
    vLLM has no request left running. (Whether vLLM stopped short of 1024 tokens is not asserted:
    the tiny model can finish all of them before the relayed tokens reach the client.)"""
    engine = _engine(served)
    client = await _client(served.url)
    await client.send({"type": "ask", "id": "long", "stream": "live", "question": "Describe.", "max_new_tokens": 1024})
    for _ in range(3):
        await client.recv_type("token")
    await client.send({"type": "cancel", "id": "long"})
    msgs = await client.until_final("long")
    await client.close()
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "cancelled"
    deadline = time.monotonic() + 60
    while vllm.metric("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM still runs the cancelled request"
        await asyncio.sleep(0.1)
    assert engine.backend_statuses()[0]["requests"].get("stopped", 0) >= 1


async def test_newer_ask_supersedes_queued_one(served: InProcessServer) -> None:
    """While a long answer runs, a client's second ask supersedes its first (still queued),
    the second is answered, and the long one ends on cancel."""
    busy = await _client(served.url)
    asker = await _client(served.url)
    await busy.send({"type": "ask", "id": "long", "stream": "live", "question": "Describe.", "max_new_tokens": 1024})
    await busy.recv_type("token")
    await asker.send({"type": "ask", "id": "old", "stream": "live", "question": "First?"})
    await asker.send({"type": "ask", "id": "new", "stream": "live", "question": "Second?", "max_new_tokens": 4})
    old = await asker.until_final("old")
    await busy.send({"type": "cancel", "id": "long"})
    new = await asker.until_final("new")
    long_end = await busy.until_final("long")
    await busy.close()
    await asker.close()
    assert old[0]["type"] == "accepted" and old[0]["position"] >= 1
    assert old[-1]["type"] == "error" and old[-1]["code"] == "superseded"
    assert new[-1]["type"] == "answer"
    assert long_end[-1]["code"] == "cancelled"


async def test_watch_rounds_answer_on_fresh_frames_and_end_once_on_cancel(served: InProcessServer) -> None:
    """A watch gets rounds (answers with watch: true on newer frames each time) until cancelled,
    then exactly one `cancelled` and nothing more."""
    client = await _client(served.url)
    await client.send(
        {"type": "watch", "id": "w", "stream": "live", "question": "Anyone?", "every_s": 1, "max_new_tokens": 2}
    )
    accepted = await client.recv_type("accepted")
    answers = [await client.recv_type("answer", timeout=60) for _ in range(3)]
    await client.send({"type": "cancel", "id": "w"})
    end = await client.until_final("w")
    while end[-1]["type"] != "error":  # a round's answer that was on its way
        end = await client.until_final("w")
    await asyncio.sleep(1.5)  # a round would be due by now
    late = []
    while True:
        try:
            late.append(await client.recv(timeout=0.2))
        except TimeoutError:
            break
    await client.close()
    assert accepted["id"] == "w"
    assert all(a["watch"] is True and a["id"] == "w" for a in answers)
    seqs = [a["frames"]["last_seq"] for a in answers]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]
    assert end[-1]["code"] == "cancelled"
    assert not [m for m in late if m.get("id") == "w"]


async def test_random_mix_of_asks_and_cancels_ends_every_ask_exactly_once(served: InProcessServer) -> None:
    """Clients sending asks on both streams and cancelling some at random: every ask ends with
    exactly one answer or error, and the loop's count of outcomes matches what was submitted."""
    rng = random.Random(16)
    finals: Counter[str] = Counter()
    submitted_before = served.loop.submitted
    outcomes_before = sum(served.loop.outcomes.values())

    async def session(n: int) -> None:
        client = await _client(served.url)
        ids = []
        for k in range(rng.randint(2, 5)):
            qid = f"s{n}-{k}"
            ids.append(qid)
            stream = rng.choice(["live", "still"])
            await client.send(
                {"type": "ask", "id": qid, "stream": stream, "question": "Q?", "max_new_tokens": rng.randint(1, 12)}
            )
            if rng.random() < 0.3:
                await client.send({"type": "cancel", "id": rng.choice(ids)})
            await asyncio.sleep(rng.random() * 0.05)
        open_ids = set(ids)
        while open_ids:
            m = await client.recv(timeout=120)
            if m.get("id") in ids and m["type"] in ("answer", "error"):
                if m["type"] == "error" and m["code"] == "bad_request":  # a cancel of an ended ask
                    continue
                finals[m["id"]] += 1
                open_ids.discard(m["id"])
        await asyncio.sleep(0.3)  # anything after the final would be a second final
        while True:
            try:
                m = await client.recv(timeout=0.05)
            except TimeoutError:
                break
            if m.get("id") in ids and (m["type"] == "answer" or (m["type"] == "error" and m["code"] != "bad_request")):
                finals[m["id"]] += 1
        await client.close()

    await asyncio.gather(*(session(n) for n in range(12)))
    deadline = time.monotonic() + 60
    while not served.loop.idle():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    submitted = served.loop.submitted - submitted_before
    assert sum(served.loop.outcomes.values()) - outcomes_before == submitted
    assert set(finals.values()) == {1} and len(finals) == submitted


async def test_pool_routes_overflow_to_the_least_busy_and_ejects_a_dead_server(
    vllm: VllmServer, still_video: Path
) -> None:
    """A pool of the vLLM under two names plus a closed port, one request slot each: three asks
    about one window are all answered, both live names take requests, the dead one is ejected;
    /healthz and /metrics show each server's state."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    alias = vllm.base_url.replace("127.0.0.1", "localhost")
    # One batch of the three asks (a long batch window, and a long gap: on a loaded machine the
    # asks can arrive more than the default 3 ms apart, and a batch that starts with fewer
    # never overflows to the dead server): its overflow shows where requests go.
    config = _config(
        [vllm.base_url, alias, dead], still_video, max_in_flight=1, batch_window_ms=1000, batch_gap_ms=1000
    )
    server = InProcessServer(config).start()
    try:
        clients = [await _client(server.url) for _ in range(3)]
        for i, c in enumerate(clients):
            await c.send({"type": "ask", "id": f"p{i}", "stream": "still", "question": "Q?", "max_new_tokens": 32})
        results = [await c.until_final(f"p{i}") for i, c in enumerate(clients)]
        more = await clients[0].ask("after", stream="still", max_new_tokens=4)
        for c in clients:
            await c.close()
        backends = {b["url"]: b for b in _healthz(server)["model"]["backends"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        server.stop()
    assert all(r[-1]["type"] == "answer" for r in results), results
    assert more[-1]["type"] == "answer"
    assert backends[dead]["state"] == "down" and backends[dead]["ejections"] >= 1
    assert backends[dead]["requests"].get("answered", 0) == 0
    answered = [backends[u]["requests"].get("answered", 0) for u in (vllm.base_url, alias)]
    assert sum(answered) == 4 and min(answered) >= 1, backends  # one slot each: the overflow went on
    assert backends[vllm.base_url]["state"] == backends[alias]["state"] == "up"
    assert f'streamer_backend_up{{backend="{dead}"}} 0.0' in metrics
    assert f'streamer_backend_up{{backend="{vllm.base_url}"}} 1.0' in metrics
    assert "streamer_backend_first_token_seconds_count" in metrics


async def test_vllm_killed_mid_answer_ends_the_ask_with_internal_and_the_next_ask_after_it_is_back_works(
    vllm: VllmServer, served: InProcessServer
) -> None:
    """Kill vLLM while it streams an answer: that ask ends with `internal` naming the server;
    an ask while it is down fails at once the same way; once vLLM is back the next ask is answered."""
    client = await _client(served.url)
    for attempt in range(5):
        qid = f"long{attempt}"
        await client.send({"type": "ask", "id": qid, "stream": "live", "question": "Describe.", "max_new_tokens": 1024})
        await client.recv_type("token")
        vllm.pause()  # frozen mid-answer, unless the whole answer was already out: then ask again
        try:
            ended = await client.until_final(qid, timeout=2)
        except TimeoutError:
            break
        vllm.resume()
    else:
        pytest.fail("every answer was complete before vLLM could be frozen")
    vllm.kill()
    ended = await client.until_final(qid, timeout=120)
    down = await client.ask("while-down", stream="live", max_new_tokens=4)
    health = _healthz(served)
    await asyncio.to_thread(vllm.start)  # the test's event loop keeps answering pings meanwhile
    back = await client.ask("back", stream="live", max_new_tokens=4)
    await client.close()
    assert ended[-1]["type"] == "error" and ended[-1]["code"] == "internal", ended[-1]
    assert vllm.base_url in ended[-1]["message"]
    assert down[-1]["type"] == "error" and down[-1]["code"] == "internal"
    assert "no remote server could take the question" in down[-1]["message"]
    assert health["model"]["backends"][0]["state"] == "down"
    assert back[-1]["type"] == "answer", back
    assert _healthz(served)["model"]["backends"][0]["state"] == "up"
