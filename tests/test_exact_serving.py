"""Served over the WebSocket with an Instruct checkpoint's generation settings and the fast path
on: answers about a still clip, 8 and 48 frames, are the seed pipeline's, token for token;
``/metrics`` shows the caches' bytes and bounds."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

import pytest

from streamer.config import ModelConfig
from streamer.inference.loader import load_model
from streamer.inference.reference import reference_generate, reference_inputs, reference_text, seed_model_config
from tests.inproc import InProcessServer
from tests.test_inference_features import _still_video
from tests.wsclient import ProtocolClient

pytestmark = pytest.mark.slow


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line and not line.startswith("#")}


async def test_instruct_answers_over_the_websocket_are_the_seed_pipelines(
    streamer_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A still clip, 8 and 48 frames, Instruct settings, fast path on: the seed pipeline's token ids and text."""
    caplog.set_level(logging.INFO, logger="streamer.inference.transformers_engine")
    still = _still_video(tmp_path / "still.mkv")
    server = InProcessServer(
        {
            # 25 s of frames kept: the frames each answer used are still there afterwards.
            "sources": [{"name": "still", "url": str(still), "sample_fps": 10, "buffer_frames": 250}],
            "model": {"id": "tiny-random-instruct", "frames": 8, "max_new_tokens": 16},
        }
    ).start(min_frames=48)
    try:
        client = await ProtocolClient.connect(server.url)
        await client.recv_type("welcome")
        answers = {}
        for frames in (8, 48):
            msgs = await client.ask(f"q{frames}", stream="still", question="What is in the picture?", frames=frames)
            answers[frames] = msgs[-1]
        await client.close()
        buffered = {f.seq: f.rgb for f in server.runtime.captures["still"].ring.latest(250)}
        engine_stats = server.runtime.engine.stats()
        metrics = _metrics(server.port)
    finally:
        server.stop()
    # The fast path answered: it prefilled prefixes, and no question was sent down the plain
    # path (that logs its reason). Cache misses are no proof either way: the warmer may have
    # encoded every pair of the stream before the questions came.
    assert engine_stats["prefix_cache_entries"] >= 1
    assert "plain generate path" not in caplog.text

    cfg = ModelConfig(id="tiny-random-instruct")
    # A model of its own, loaded as the seed loaded it (the server's may still be warming up).
    seed = load_model(seed_model_config(cfg))
    for frames, answer in answers.items():
        assert answer["type"] == "answer" and answer["frames"]["count"] == frames
        span = answer["frames"]
        window = [buffered[seq] for seq in range(span["first_seq"], span["last_seq"] + 1)]
        inputs = reference_inputs(
            seed.processor, window, "What is in the picture?", min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels, fps=10,
        )  # fmt: skip
        ids = reference_generate(seed.model, inputs, max_new_tokens=16)
        assert answer["token_ids"] == ids
        assert answer["text"] == reference_text(seed.processor, ids)

    assert metrics["streamer_prefix_cache_limit_bytes"] == 1024 * 2**20
    assert 0 < metrics["streamer_prefix_cache_bytes"] <= metrics["streamer_prefix_cache_limit_bytes"]
    assert metrics["streamer_vision_cache_bytes"] > 0 and metrics["streamer_vision_cache_limit_bytes"] == 512 * 2**20
    assert 0 < metrics["streamer_batch_kv_bytes"] <= metrics["streamer_batch_kv_limit_bytes"] == 2048 * 2**20
