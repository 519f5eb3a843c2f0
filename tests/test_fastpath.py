"""The fast path (tiny model): cached pair embeddings and batched decoding give the plain
path's results, the cache stays within its bound, and idle time pre-encodes windows."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from streamer.capture.ring import RingBuffer
from streamer.config import ModelConfig
from streamer.inference.engine import GenerationRequest
from streamer.inference.fastpath import PairEmbedding, PairKey, VisionCache
from streamer.inference.loader import load_model
from streamer.inference.loop import InferenceLoop
from streamer.inference.questions import Question, StreamFeed
from streamer.inference.transformers_engine import TransformersEngine
from tests.test_inference_loop import RecordingSink

# The model-level checks (tiny models): the full suite, not the quick loop.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> TransformersEngine:
    cfg = ModelConfig(id=str(tiny_model))
    return TransformersEngine(load_model(cfg), cfg)


def _frames(n: int, seed: int = 0, size: tuple[int, int] = (336, 448)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _ids(frames: list[np.ndarray]) -> tuple:
    """An identity per frame from its pixels (the loop uses (seq, capture time))."""
    return tuple(("test", hash(f.tobytes())) for f in frames)


def _request(frames, question: str = "What is moving?", tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        frames=frames, question=question, max_new_tokens=tokens, sample_fps=2.0, stream="s", frame_ids=_ids(frames)
    )


def test_cached_pair_embeddings_give_the_same_logits_and_tokens(engine: TransformersEngine) -> None:
    frames = _frames(8, seed=1)
    inputs = engine.prepare(_request(frames))
    model = engine.loaded.model
    window = engine.vision.window("logits", frames, tuple(range(8)))
    assert window is not None
    embeds, grid = window.embeds, window.grid
    assert window.computed == 4 and torch.equal(grid, inputs["video_grid_thw"])
    cached = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    with torch.inference_mode():
        plain = model(**inputs).logits
        fast = model(**cached, mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=(embeds,))}).logits
    assert torch.allclose(plain, fast, atol=1e-5, rtol=1e-4), (plain - fast).abs().max()
    # A second window sharing pairs computes only what is new.
    again = engine.vision.window("logits", frames[2:] + _frames(2, seed=9), tuple(range(2, 10)))
    assert again is not None and again.computed == 1


def test_fast_and_batched_paths_give_the_plain_paths_tokens(engine: TransformersEngine) -> None:
    frames = _frames(8, seed=2)
    questions = ["What is moving?", "视频里有什么在动？", "ما الذي يتحرك في الفيديو؟ صف المشهد بالتفصيل من فضلك"]
    tokens = [12, 20, 7]
    requests = [_request(frames, q, t) for q, t in zip(questions, tokens, strict=True)]
    plain = [engine._generate_plain(r, lambda t: None, lambda: False) for r in requests]
    single = [engine.generate(r, lambda t: None, lambda: False) for r in requests]
    texts: list[list[str]] = [[], [], []]
    batched = engine.generate_batch(requests, [t.append for t in texts], [lambda: False] * 3)
    for p, s, b, streamed, n in zip(plain, single, batched, texts, tokens, strict=True):
        assert s.token_ids == p.token_ids
        assert b.token_ids == p.token_ids
        assert len(b.token_ids) <= n
        assert "".join(streamed) == b.text == p.text


def test_stopping_one_row_leaves_the_others(engine: TransformersEngine) -> None:
    frames = _frames(8, seed=3)
    requests = [_request(frames, "First?", 30), _request(frames, "Second?", 30)]
    counts = [0, 0]

    def on_text(i: int):
        def add(piece: str) -> None:
            counts[i] += 1

        return add

    results = engine.generate_batch(requests, [on_text(0), on_text(1)], [lambda: counts[0] >= 2, lambda: False])
    alone = engine._generate_plain(requests[1], lambda t: None, lambda: False)
    assert results[0].stopped and len(results[0].token_ids) < 30
    assert not results[1].stopped and results[1].token_ids == alone.token_ids


def test_cache_stays_within_its_bound_over_a_long_run() -> None:
    pair = PairEmbedding(torch.zeros(256, 128), 24, 32)
    size = pair.numel() * pair.element_size()
    cache = VisionCache(max_bytes=10 * size)
    for k in range(500):
        cache.put(PairKey("s", k, k + 1, 336, 448), PairEmbedding(torch.zeros(256, 128), 24, 32))
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 10 and cache.bytes == 10 * size
    assert cache.get(PairKey("s", 499, 500, 336, 448)) is not None  # newest kept
    assert cache.get(PairKey("s", 0, 1, 336, 448)) is None  # oldest evicted


def test_engine_cache_bound_with_real_embeddings(tiny_model: Path) -> None:
    cfg = ModelConfig(id=str(tiny_model), vision_cache_mb=1)
    engine = TransformersEngine(load_model(cfg), cfg)
    for start in range(0, 60, 2):
        frames = _frames(2, seed=start)
        engine.vision.window("long", frames, (start, start + 1))
        assert engine.vision_cache.bytes <= 2**20
    assert 0 < len(engine.vision_cache) < 30


def test_idle_loop_encodes_the_window_before_anyone_asks(engine: TransformersEngine) -> None:
    ring = RingBuffer(16)
    for f in _frames(8, seed=4):
        ring.push(f)
    loop = InferenceLoop(engine, {"warm": StreamFeed(ring, 2.0)}, queue_size=4, max_batch=4, warm_frames=8)
    loop.start()
    try:
        deadline = time.monotonic() + 20
        frames = ring.latest(8)
        keys = [
            PairKey("warm", (a.seq, a.ts), (b.seq, b.ts), 336, 448)
            for a, b in zip(frames[::2], frames[1::2], strict=True)
        ]
        while not all(k in engine.vision_cache for k in keys):
            assert time.monotonic() < deadline, "the idle loop did not encode the window"
            time.sleep(0.05)
        misses = engine.vision_cache.misses
        deadline = time.monotonic() + 20
        while engine.fast.prefix_key(tuple(keys), 2.0) not in engine.prefix_cache:  # the prefill follows the pairs
            assert time.monotonic() < deadline, "the idle loop did not prefill the window"
            time.sleep(0.05)
        hits = engine.prefix_cache.hits
        sink = RecordingSink()
        for i in range(3):  # asked together: one batch, no vision work on the critical path
            loop.submit(
                Question(id=f"q{i}", stream="warm", text="?", owner=f"o{i}", sink=sink, frames=8, max_new_tokens=4)
            )
        sink.wait_finals(3)
    finally:
        loop.stop()
    assert engine.vision_cache.misses == misses
    assert engine.prefix_cache.hits > hits  # the idle loop had prefilled the prompt prefix too
    assert sink.finals() == {"q0": ["answer"], "q1": ["answer"], "q2": ["answer"]}


def test_fast_path_matches_when_the_processor_resizes_again(tiny_model: Path) -> None:
    """min_pixels == max_pixels on wide frames: the processor's own resize decides the grid."""
    cfg = ModelConfig(id=str(tiny_model), min_pixels=128 * 28 * 28, max_pixels=128 * 28 * 28)
    engine = TransformersEngine(load_model(cfg), cfg)
    frames = _frames(4, seed=7, size=(720, 1280))
    request = _request(frames, "What is moving?", 12)
    plain = engine._generate_plain(request, lambda t: None, lambda: False)
    fast = engine.generate(request, lambda t: None, lambda: False)
    assert engine.vision_cache.misses > 0  # it did take the fast path
    assert fast.token_ids == plain.token_ids
