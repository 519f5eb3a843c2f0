"""Exactness against the seed pipeline (qwen-vl-utils + processor + generate): the fast path and
the plain path give its token ids, positions and logits for long windows, a system prompt, an
Instruct checkpoint's generation settings, seeded sampling and Qwen2.5-VL; what the fast path
cannot reproduce takes the plain path; its memory stays within bytes; an OOM ends one batch."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.capture.ring import RingBuffer
from streamer.config import ModelConfig
from streamer.inference import fastpath
from streamer.inference.cpu_linear import FewRowLinear
from streamer.inference.engine import GenerationRequest
from streamer.inference.fastpath import Prefix, PrefixCache, split_prompt
from streamer.inference.loader import LoadedModel, load_model
from streamer.inference.loop import InferenceLoop
from streamer.inference.questions import Question, StreamFeed
from streamer.inference.reference import reference_generate, reference_inputs, seed_model_config
from streamer.inference.transformers_engine import TransformersEngine
from streamer.inference.video import processor_inputs
from tests.test_inference_loop import RecordingSink

# The model-level checks (tiny models): the full suite, not the quick loop.
pytestmark = pytest.mark.slow

QUESTIONS = ["What is moving?", "视频里有什么在动？", "Describe the scene in front of the camera in detail, please."]


def _engine(model_id: str, **settings) -> TransformersEngine:
    cfg = ModelConfig(id=model_id, **settings)
    return TransformersEngine(load_model(cfg), cfg)


@pytest.fixture(scope="module")
def instruct(streamer_cache: Path) -> LoadedModel:
    """The tiny Qwen2-VL whose generation_config.json is an Instruct checkpoint's."""
    return load_model(ModelConfig(id="tiny-random-instruct"))


@pytest.fixture(scope="module")
def qwen25(streamer_cache: Path) -> LoadedModel:
    return load_model(ModelConfig(id="tiny-random-qwen2.5-vl"))


def _frames(n: int, side: int = 224, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _requests(frames, questions, tokens: int = 12, stream: str = "s") -> list[GenerationRequest]:
    ids = tuple((stream, i) for i in range(len(frames)))
    return [
        GenerationRequest(
            frames=frames, question=q, max_new_tokens=tokens, sample_fps=2.0, stream=stream, frame_ids=ids
        )
        for q in questions
    ]


def _reference(engine: TransformersEngine, request: GenerationRequest, seed: LoadedModel | None = None) -> list[int]:
    """The seed pipeline's token ids, with the generation settings streamer's config sets, on
    ``seed`` (default: the engine's own model)."""
    cfg = engine.cfg
    loaded = seed or engine.loaded
    inputs = reference_inputs(
        loaded.processor,
        list(request.frames),
        request.question,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        fps=request.sample_fps,
        system_prompt=cfg.system_prompt,
    )
    return reference_generate(
        loaded.model,
        inputs,
        max_new_tokens=request.max_new_tokens,
        seed=cfg.seed,
        **cfg.generation_kwargs(),
    )


def _plain(engine: TransformersEngine, request: GenerationRequest) -> list[int]:
    return engine._generate_plain(request, lambda t: None, lambda: False).token_ids


def _batched(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[list[int]]:
    n = len(requests)
    return [r.token_ids for r in engine.generate_batch(requests, [lambda t: None] * n, [lambda: False] * n)]


class Recorder:
    """The M-RoPE position ids of every pass of a model's decoder, and the last-position
    logits of every use of its output projection (a question's prompt pass, or its own
    tokens prefilled with the shared prefix, then each decode step)."""

    def __init__(self, model) -> None:
        self.positions: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self._hooks = [
            model.model.language_model.register_forward_pre_hook(self._on_positions, with_kwargs=True),
            model.lm_head.register_forward_hook(self._on_output),
        ]

    def _on_positions(self, module, args, kwargs) -> None:
        self.positions.append(kwargs["position_ids"][-3:, 0].clone())  # generate prepends a text row

    def _on_output(self, module, args, output) -> None:
        self.logits.append(output[0, -1].clone())

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def sequence(self) -> torch.Tensor:
        """Positions of the whole sequence the model saw (3 x length)."""
        return torch.cat(self.positions, dim=-1)


def _record(model, run) -> tuple[Recorder, list[int]]:
    recorder = Recorder(model)
    try:
        ids = run()
    finally:
        recorder.close()
    return recorder, ids


def _assert_same_positions_logits_and_ids(engine: TransformersEngine, request: GenerationRequest) -> Recorder:
    """One question, alone on the fast path and through the seed pipeline: the model sees the
    same positions and gives the same logits at every step, and the same token ids come out."""
    model = engine.loaded.model
    ref, ref_ids = _record(model, lambda: _reference(engine, request))
    fast, fast_ids = _record(model, lambda: _batched(engine, [request])[0])
    assert fast_ids == ref_ids == _plain(engine, request)
    assert len(fast_ids) > 0
    assert torch.equal(fast.sequence(), ref.sequence())
    # The shared prefix's chunks run the decoder without the output projection (no logits);
    # the question's first logits (from its own tokens, prefilled with the prefix's last chunk
    # on a new window) and each step's are generate's, one for one.
    assert len(fast.logits) == len(ref.logits)
    for ours, theirs in zip(fast.logits, ref.logits, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    return fast


@pytest.mark.parametrize("frames", [32, 64])
def test_long_windows_get_generates_positions_logits_and_tokens(instruct: LoadedModel, frames: int) -> None:
    """Windows whose temporal patches exceed the merged grid's side (32 and 64 frames at 224x224)."""
    cfg = ModelConfig(id="tiny-random-instruct")
    engine = TransformersEngine(instruct, cfg)
    (request,) = _requests(_frames(frames, seed=frames), ["What is moving?"], stream=f"long{frames}")
    fast = _assert_same_positions_logits_and_ids(engine, request)
    # The case that matters: the question starts below the video's largest position + 1.
    sequence = fast.sequence()  # the prompt, then each generated token but the last
    prompt_length = sequence.shape[1] - len(fast.logits) + 1
    _, suffix = split_prompt(engine.fast.prompt_ids(request.question, 0), engine.fast._vision_end)
    prefix_length = prompt_length - len(suffix)
    prefix, question = sequence[:, :prefix_length], sequence[:, prefix_length:]
    assert question[0, 0] < prefix.max() + 1


def test_instruct_settings_batched_with_a_system_prompt(instruct: LoadedModel) -> None:
    """The checkpoint's sampling settings and repetition penalty; questions of different lengths in one batch."""
    engine = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct", system_prompt="Answer briefly."))
    assert engine._generation.do_sample and engine._generation.repetition_penalty == 1.05
    requests = _requests(_frames(8, seed=1), QUESTIONS, tokens=16)
    reference = [_reference(engine, r) for r in requests]
    assert _batched(engine, requests) == reference
    assert [_plain(engine, r) for r in requests] == reference
    _assert_same_positions_logits_and_ids(engine, _requests(_frames(8, seed=2), ["Why?"], stream="system")[0])


def test_seeded_sampling_draws_what_generate_draws(instruct: LoadedModel) -> None:
    """Sampling settings from streamer's config over the checkpoint's, with a seed: the same draws per question."""
    settings = {"top_k": 0, "top_p": 1.0, "temperature": 3.0}
    engine = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct", seed=1234, **settings))
    requests = _requests(_frames(8, seed=3), QUESTIONS, tokens=16)
    reference = [_reference(engine, r) for r in requests]
    assert _batched(engine, requests) == reference
    assert [_plain(engine, r) for r in requests] == reference
    reseeded = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct", seed=4321, **settings))
    assert _reference(reseeded, requests[0]) != reference[0]  # it does sample


def test_logits_processors_are_the_ones_generate_builds(streamer_cache: Path) -> None:
    """Any processor the checkpoint's settings enable runs on the fast path as in generate."""
    loaded = load_model(ModelConfig(id="tiny-random-instruct"))
    video_pad = loaded.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    loaded.model.generation_config.update(
        no_repeat_ngram_size=2, min_new_tokens=6, suppress_tokens=[video_pad], repetition_penalty=1.5
    )
    engine = TransformersEngine(loaded, ModelConfig(id="tiny-random-instruct"))
    assert engine.fast_path_off is None
    requests = _requests(_frames(8, seed=4), QUESTIONS, tokens=16)
    reference = [_reference(engine, r) for r in requests]
    assert _batched(engine, requests) == reference
    assert engine.vision_cache.misses > 0  # it did take the fast path


def test_prompt_ids_are_the_processors(instruct: LoadedModel) -> None:
    """The processors read the whole prompt: the fast path's equals the processor's, video tokens included."""
    for system in (None, "Be brief."):
        engine = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct", system_prompt=system))
        (request,) = _requests(_frames(4, seed=5), ["Where is it?"])
        inputs = engine.prepare(request)
        video_tokens = int((inputs["input_ids"] == engine.fast.video_pad).sum())
        assert engine.fast.prompt_ids("Where is it?", video_tokens) == inputs["input_ids"][0].tolist()


def test_qwen2_5_vl_pairs_encode_as_the_window(qwen25: LoadedModel) -> None:
    """Qwen2.5-VL's window attention stays within a frame pair: pair by pair equals the whole window."""
    engine = TransformersEngine(qwen25, ModelConfig(id="tiny-random-qwen2.5-vl"))
    frames = _frames(8, seed=6)  # 224x224 -> 336x336: 12x12 merged tokens, 9 attention windows per pair
    (request,) = _requests(frames, ["?"])
    inputs = engine.prepare(request)
    with torch.inference_mode():
        whole = qwen25.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    window = engine.vision.window("pairs", frames, tuple(range(8)))
    assert window is not None and torch.equal(window.grid, inputs["video_grid_thw"])
    expected = whole.pooler_output[0]
    assert torch.allclose(window.embeds, expected, atol=1e-5, rtol=1e-4), (window.embeds - expected).abs().max()


def test_qwen2_5_vl_time_scaled_positions_and_tokens(qwen25: LoadedModel) -> None:
    """Qwen2.5-VL on the fast path: second_per_grid_ts as the processor gives it, generate's positions and tokens."""
    engine = TransformersEngine(qwen25, ModelConfig(id="tiny-random-qwen2.5-vl"))
    assert engine.fast_path_off is None
    frames = _frames(16, seed=7)
    for fps in (1.0, 2.0, 4.0):
        inputs = processor_inputs(
            qwen25.processor, frames, "?", sample_fps=fps, min_pixels=engine.cfg.min_pixels, max_pixels=10**6
        )
        assert torch.equal(engine.fast.rope_kwargs(fps)["second_per_grid_ts"], inputs["second_per_grid_ts"])
    requests = _requests(frames, QUESTIONS, tokens=12, stream="q25")
    reference = [_reference(engine, r) for r in requests]
    assert _batched(engine, requests) == reference
    assert [_plain(engine, r) for r in requests] == reference
    _assert_same_positions_logits_and_ids(engine, _requests(frames, ["Alone?"], stream="q25-alone")[0])


@pytest.mark.parametrize("model_id", ["tiny-random-instruct", "tiny-random-qwen2.5-vl"])
def test_the_patch_embedding_loaded_as_a_linear_keeps_the_seeds_logits_and_tokens(
    streamer_cache: Path, model_id: str
) -> None:
    """streamer loads the Conv3d patch embedding as the equal Linear; against the model loaded
    as the seed loaded it: the same video features and logits (to rounding), the same token ids."""
    cfg = ModelConfig(id=model_id)
    engine = TransformersEngine(load_model(cfg), cfg)
    seed = load_model(seed_model_config(cfg))
    fused, plain = engine.loaded.model.model.visual.patch_embed, seed.model.model.visual.patch_embed
    assert not hasattr(fused, "proj") and isinstance(plain.proj, torch.nn.Conv3d)

    request = _requests(_frames(8, side=336, seed=11), ["What changed?"], tokens=12, stream="fused")[0]
    inputs = engine.prepare(request)
    with torch.inference_mode():
        ours = engine.loaded.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        theirs = seed.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert torch.allclose(ours.pooler_output[0], theirs.pooler_output[0], atol=1e-5, rtol=1e-4)

    theirs, seed_ids = _record(seed.model, lambda: _reference(engine, request, seed))
    ours, fast_ids = _record(engine.loaded.model, lambda: _batched(engine, [request])[0])
    assert fast_ids == seed_ids and len(fast_ids) > 0
    assert len(ours.logits) == len(theirs.logits)
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_a_batch_decoded_with_onednn_gives_the_seeds_tokens(streamer_cache: Path) -> None:
    """Five questions decoded together (each step's products have five rows, which go to
    oneDNN on CPU): each one's token ids are generate's on the model loaded as the seed loads
    it, whose products all go through nn.Linear."""
    cfg = ModelConfig(id="tiny-random-instruct")
    engine = TransformersEngine(load_model(cfg), cfg)
    seed = load_model(seed_model_config(cfg))
    head = engine.loaded.model.get_output_embeddings()
    assert type(head) is FewRowLinear and type(seed.model.get_output_embeddings()) is torch.nn.Linear
    rows: list[int] = []
    hook = head.register_forward_pre_hook(lambda module, args: rows.append(args[0].numel() // args[0].shape[-1]))
    questions = [*QUESTIONS, "Is it raining?", "How many people are there?"]
    requests = _requests(_frames(8, seed=12), questions, tokens=12, stream="onednn")
    try:
        batched = _batched(engine, requests)
    finally:
        hook.remove()
    assert max(rows) == len(questions)  # the steps the batch ran together went to oneDNN
    assert batched == [_reference(engine, r, seed) for r in requests]


def test_what_the_fast_path_cannot_reproduce_takes_the_plain_path(
    streamer_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Decoding without a cache, and a model type the fast path does not know: generate, and one log line."""
    loaded = load_model(ModelConfig(id="tiny-random-instruct"))
    loaded.model.generation_config.update(use_cache=False)
    with caplog.at_level(logging.INFO, logger="streamer.inference.transformers_engine"):
        engine = TransformersEngine(loaded, ModelConfig(id="tiny-random-instruct"))
        requests = _requests(_frames(4, seed=8), QUESTIONS[:2], tokens=8)
        assert _batched(engine, requests) == [_reference(engine, r) for r in requests]
        _batched(engine, requests)
    assert "use_cache" in (engine.fast_path_off or "")
    assert engine.vision_cache.misses == 0 and engine.warm("s", requests[0].frames, [0, 1, 2, 3], 2.0) is False
    lines = [r.getMessage() for r in caplog.records if "plain generate path" in r.getMessage()]
    assert len(lines) == 1 and "use_cache" in lines[0]

    caplog.clear()
    other = load_model(ModelConfig(id="tiny-random"))
    other.model.config.model_type = "not_qwen"
    with caplog.at_level(logging.INFO, logger="streamer.inference.transformers_engine"):
        engine = TransformersEngine(other, ModelConfig(id="tiny-random"))
        request = _requests(_frames(4, seed=9), ["?"], tokens=6)[0]
        assert _batched(engine, [request])[0] == _reference(engine, request)
    assert engine.vision_cache.misses == 0
    assert any("'not_qwen'" in r.getMessage() for r in caplog.records)


def test_prefix_cache_is_bounded_in_bytes() -> None:
    """Least recently used prefixes go first once their KV bytes exceed the bound; one too big is not kept."""
    cache = PrefixCache(keep=10, max_bytes=1000)

    def prefix(size: int) -> Prefix:
        return Prefix(ids=[1, 2], cache=None, bytes=size)

    for key in "abc":
        cache.put(key, prefix(300))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("d", prefix(300))
    assert cache.bytes == 900 and "b" not in cache and all(k in cache for k in "acd")
    cache.put("huge", prefix(1001))
    assert "huge" not in cache and cache.bytes == 900
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_batches_split_to_stay_within_their_kv_bound(instruct: LoadedModel) -> None:
    """With room for one question's KV cache at a time, a batch is decoded in parts, with the same tokens."""
    bounded = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct", prefix_cache_mb=1, batch_kv_mb=1))
    requests = _requests(_frames(8, seed=10), QUESTIONS, tokens=16)
    reference = [_reference(bounded, r) for r in requests]
    assert _batched(bounded, requests) == reference
    stats = bounded.stats()
    assert 0 < stats["batch_kv_bytes"] <= stats["batch_kv_limit_bytes"] == 2**20
    prefix_bytes = stats["prefix_cache_bytes"]
    assert 0 < prefix_bytes <= 2**20
    # Two questions would have needed more than the bound.
    assert fastpath.batch_kv_bytes(next(iter(bounded.prefix_cache._items.values())), 2, 1, 16) > 2**20
    # A window whose prefix alone is over the bound is used but not kept.
    long = _requests(_frames(64, seed=11), ["?"], tokens=4, stream="long")
    assert _batched(bounded, long) == [_reference(bounded, long[0])]
    assert bounded.stats()["prefix_cache_bytes"] == prefix_bytes


class MessageSink(RecordingSink):
    """Records error messages too."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: dict[str, str] = {}

    def on_error(self, q: Question, code: str, message: str) -> None:
        self.messages[q.id] = message
        super().on_error(q, code, message)


def test_out_of_memory_in_a_fast_batch_ends_that_batch_and_the_next_runs(
    instruct: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU allocation failure inside a fast-path batch: its questions end with internal, caches are freed."""
    engine = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct"))
    real_decode = fastpath.decode
    failed = threading.Event()

    def decode_once_out_of_memory(*args, **kwargs):
        if not failed.is_set():
            failed.set()
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(fastpath, "decode", decode_once_out_of_memory)
    ring = RingBuffer(16)
    for frame in _frames(8, seed=12):
        ring.push(frame)
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=8, max_batch=4, batch_window_s=1.0)
    sink = MessageSink()

    def ask(qid: str) -> None:
        loop.submit(Question(id=qid, stream="s", text="?", owner=qid, sink=sink, frames=8, max_new_tokens=4))

    for qid in ("a", "b", "c"):  # queued before the loop starts: one batch
        ask(qid)
    loop.start()
    try:
        sink.wait_finals(3)
        assert failed.is_set() and len(engine.prefix_cache) == 0  # freed
        ask("after")
        sink.wait_finals(4)
    finally:
        loop.stop()
    assert sink.finals() == {"a": ["internal"], "b": ["internal"], "c": ["internal"], "after": ["answer"]}
    assert all("ran out of memory" in sink.messages[q] for q in "abc")
    assert len(engine.prefix_cache) == 1  # the next batch prefilled again


def test_settings_set_in_the_config_override_the_checkpoints_and_unset_ones_keep_them(instruct: LoadedModel) -> None:
    """streamer's generation settings merge over generation_config.json as generate's keyword arguments do."""
    kept = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct"))._generation
    assert (kept.do_sample, kept.top_k, kept.temperature, kept.repetition_penalty) == (True, 1, 0.1, 1.05)
    greedy = TransformersEngine(instruct, ModelConfig(id="tiny-random-instruct", do_sample=False))._generation
    assert (greedy.do_sample, greedy.repetition_penalty) == (False, 1.05)
    assert ModelConfig().generation_kwargs() == {}
