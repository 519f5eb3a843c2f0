"""Continuous batching and fine-grained background work, with the tiny model and the loop
itself: a row's answer goes out the step it ends, a question arriving mid-batch joins at the
next step with generate's token ids, a cancel during a prefill ends within one step (a decoder
layer), warm-up does one step at a time, and a prefill stepped by layers and chunks equals the
model's own one-pass forward."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.capture.ring import RingBuffer
from streamer.config import ModelConfig
from streamer.inference.engine import Engine, GenerationRequest, Joiner
from streamer.inference.fastpath import PrefixPrefill
from streamer.inference.loader import load_model
from streamer.inference.loop import InferenceLoop
from streamer.inference.policy import WindowOption, choose_window
from streamer.inference.questions import Question, StreamFeed, Watch, window_of
from streamer.inference.transformers_engine import TransformersEngine
from tests.test_inference_loop import RecordingSink

# The model-level checks (tiny models): the full suite, not the quick loop.
pytestmark = pytest.mark.slow

LONG = 1024


class Sink(RecordingSink):
    """Records asks' and watch rounds' events in the order they happen."""

    def on_watch_accepted(self, w: Watch, position: int) -> None:
        pass

    def on_watch_end(self, w: Watch, code: str, message: str) -> None:
        pass

    def index(self, kind: str, qid: str, nth: int = 1) -> int | None:
        """Where the ``nth`` event of ``kind`` about ``qid`` is in the record (None: not yet)."""
        with self.lock:
            seen = 0
            for i, (k, q, _) in enumerate(self.events):
                if k == kind and q == qid:
                    seen += 1
                    if seen == nth:
                        return i
        return None

    def wait_for(self, kind: str, qid: str, nth: int = 1, timeout: float = 120) -> None:
        with self.done:
            assert self.done.wait_for(lambda: self._index_unlocked(kind, qid, nth), timeout), (kind, qid, nth)

    def _index_unlocked(self, kind: str, qid: str, nth: int) -> bool:
        return sum(1 for k, q, _ in self.events if k == kind and q == qid) >= nth

    def answer(self, qid: str):
        with self.lock:
            return next(v for k, q, v in self.events if k == "answer" and q == qid)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> TransformersEngine:
    cfg = ModelConfig(id=str(tiny_model), prefill_chunk_tokens=32)
    return TransformersEngine(load_model(cfg), cfg)


def _ring(n: int = 8, seed: int = 3) -> RingBuffer:
    ring = RingBuffer(16)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ring.push(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    return ring


def _ask(qid: str, sink: Sink, tokens: int, text: str = "What is moving?") -> Question:
    return Question(id=qid, stream="s", text=text, owner=qid, sink=sink, frames=8, max_new_tokens=tokens)


def _plain_ids(engine: TransformersEngine, ring: RingBuffer, text: str, tokens: int) -> list[int]:
    """What ``generate`` answers on the ring's newest 8 frames (the reference for exactness)."""
    frames = window_of(ring, 8)
    request = GenerationRequest([f.rgb for f in frames], text, tokens, 2.0, stream="s")
    return engine._generate_plain(request, lambda t: None, lambda: False).token_ids


def test_a_short_round_sharing_a_batch_with_a_long_ask_is_answered_before_the_asks_tenth_token(
    engine: TransformersEngine,
) -> None:
    """A 2-token watch round batched with a 1024-token ask: its answer goes out before the ask's tenth token."""
    ring = _ring()
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=8, max_batch=4)
    sink = Sink()
    loop.submit(_ask("long", sink, LONG))
    watch = Watch(id="w", stream="s", text="Anyone?", owner="o", sink=sink, every_s=3600, frames=8, max_new_tokens=2)
    loop.add_watch(watch)  # its first round is due now: both wait when the loop starts, one batch
    loop.start()
    try:
        sink.wait_for("answer", "w")
        sink.wait_for("token", "long", 10)
        assert sink.index("answer", "w") < sink.index("token", "long", 10)
        assert sink.index("answer", "long") is None  # the ask was still decoding
    finally:
        loop.cancel("long", "long")
        loop.stop()
    assert list(sink.answer("w").token_ids) == _plain_ids(engine, ring, "Anyone?", 2)


def test_a_question_arriving_mid_batch_joins_it_and_gets_generates_tokens(engine: TransformersEngine) -> None:
    """A question about the running batch's window starts before that batch ends, finding the window prepared
    (its answer says so: the batch's says what the batch found); both answers equal generate's."""
    ring = _ring(seed=4)
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=8, max_batch=4)
    sink = Sink()
    loop.start()
    try:
        loop.submit(_ask("long", sink, 96, "Describe the scene."))
        sink.wait_for("token", "long", 3)
        loop.submit(_ask("late", sink, 8))
        sink.wait_finals(2, timeout=300)
    finally:
        loop.stop()
    late_first = sink.index("token", "late")
    assert late_first is not None and late_first < sink.index("answer", "long")
    assert (sink.answer("long").pairs_missing, sink.answer("long").prefix_ready) == (4, False)
    assert (sink.answer("late").pairs_missing, sink.answer("late").prefix_ready) == (0, True)
    assert list(sink.answer("late").token_ids) == _plain_ids(engine, ring, "What is moving?", 8)
    assert list(sink.answer("long").token_ids) == _plain_ids(engine, ring, "Describe the scene.", 96)


def test_a_question_that_came_while_the_batch_window_was_newest_joins_it_after_a_newer_frame(
    engine: TransformersEngine,
) -> None:
    """A burst's late ask (in before a newer frame) joins the running batch's window; one after the frame does not."""
    ring = _ring(seed=6)
    gate = threading.Event()

    class Gated(Engine):
        note = None
        model_id = "x"

        def generate_batch(self, requests, on_texts, should_stops, **kwargs):
            gate.wait(120)  # the batch has taken its window; hold it while the test adds questions
            return engine.generate_batch(requests, on_texts, should_stops, **kwargs)

    loop = InferenceLoop(Gated(), {"s": StreamFeed(ring, 2.0)}, queue_size=8, max_batch=4)
    sink = Sink()
    loop.start()
    try:
        loop.submit(_ask("first", sink, 24, "Describe the scene."))
        deadline = time.monotonic() + 60
        while loop.depth():  # until the batch has taken "first" (and its window)
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.01)
        window_ids = _plain_ids(engine, ring, "What is moving?", 8)
        loop.submit(_ask("same-burst", sink, 8))
        ring.push(np.random.default_rng(60).integers(0, 256, (224, 224, 3), dtype=np.uint8))
        newer_ids = _plain_ids(engine, ring, "Anyone?", 8)
        loop.submit(_ask("after-frame", sink, 8, "Anyone?"))
        gate.set()
        sink.wait_finals(3, timeout=300)
    finally:
        gate.set()
        loop.stop()
    first, burst, after = (sink.answer(q).frames for q in ("first", "same-burst", "after-frame"))
    assert burst == first and after.last_seq == first.last_seq + 1
    assert sink.index("token", "same-burst") < sink.index("answer", "first")  # it joined the running batch
    assert list(sink.answer("same-burst").token_ids) == window_ids
    assert list(sink.answer("after-frame").token_ids) == newer_ids


def _decoder_layers(engine: TransformersEngine) -> list[torch.nn.Module]:
    return list(engine.loaded.model.model.language_model.layers)


def test_a_cancel_during_a_prefill_ends_the_question_within_one_step(engine: TransformersEngine) -> None:
    """Cancelled after the prefill's first decoder layer, the question ends `cancelled` after at most one more layer."""
    ring = _ring(seed=5)
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=8)
    sink = Sink()
    layers: list[str] = []
    cancelled = threading.Event()

    def on_layer(module, args, output) -> None:
        layers.append("after cancel" if cancelled.is_set() else "before")
        if not cancelled.is_set():
            cancelled.set()
            loop.cancel("c", "c")  # on the inference thread, between two steps of the prefill

    hooks = [layer.register_forward_hook(on_layer) for layer in _decoder_layers(engine)]
    loop.start()
    try:
        loop.submit(_ask("c", sink, 64))
        sink.wait_finals(1)
    finally:
        for hook in hooks:
            hook.remove()
        loop.stop()
    assert sink.finals() == {"c": ["cancelled"]}
    assert layers.count("before") == 1 and layers.count("after cancel") <= 1, layers
    assert not [k for k, q, _ in sink.events if k == "token"]


def test_warm_up_does_one_pair_or_one_decoder_layer_per_step(engine: TransformersEngine) -> None:
    """Each warm step encodes one frame pair or runs one decoder layer, so a waiting question waits for one step."""
    frames = window_of(_ring(seed=6), 8)
    rgb, ids = [f.rgb for f in frames], [(f.seq, f.ts) for f in frames]
    layers: list[int] = []
    towers: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: layers.append(1)) for layer in _decoder_layers(engine)]
    hooks.append(engine.loaded.model.model.visual.register_forward_hook(lambda m, a, o: towers.append(1)))
    steps = 0
    try:
        while True:
            before = len(layers), len(towers)
            if not engine.warm("warm", rgb, ids, 2.0):
                break
            steps += 1
            assert (len(layers) - before[0], len(towers) - before[1]) in {(1, 0), (0, 1)}
    finally:
        for hook in hooks:
            hook.remove()
    ready = engine.readiness("warm", rgb, ids, 2.0)
    assert ready is not None and ready.prefix_ready and ready.missing_pairs == 0 and ready.prefill_left_s == 0
    assert len(towers) == 4  # the window's four pairs, one per step
    # Chunks of 32 tokens, each through every layer: several chunks, one layer per step.
    assert len(layers) > 2 * len(_decoder_layers(engine)) and steps == len(layers) + len(towers)


def test_readiness_says_how_long_a_prefill_still_needs_at_the_measured_speed(tiny_model: Path) -> None:
    """Before any prefill step is timed the time left is unknown; then it is the steps' measured speed
    times the token-layers left: a whole prefill's before it begins, shrinking step by step, 0 when ready."""
    cfg = ModelConfig(id=str(tiny_model), prefill_chunk_tokens=32)
    fresh = TransformersEngine(load_model(cfg), cfg)
    frames = window_of(_ring(seed=9), 8)
    rgb, ids = [f.rgb for f in frames], [(f.seq, f.ts) for f in frames]
    while (ready := fresh.readiness("left", rgb, ids, 2.0)) is not None and ready.missing_pairs:
        assert ready.prefill_left_s is None and ready.prefill_s is None
        assert fresh.warm("left", rgb, ids, 2.0)
    assert ready is not None and ready.prefill_left_s is None  # encoded; no prefill step timed yet
    lefts = []
    while fresh.warm("left", rgb, ids, 2.0):
        ready = fresh.readiness("left", rgb, ids, 2.0)
        assert ready is not None and ready.prefill_left_s is not None and ready.prefill_s is not None
        assert ready.prefill_left_s <= ready.prefill_s  # the whole prefill's time, begun or not
        lefts.append(ready.prefill_left_s)
    assert lefts[-1] == 0 and all(left > 0 for left in lefts[:-1])
    # What is left is what was done's complement: token-layers left, at the speed measured so far.
    fast = fresh.fast
    assert fast.token_layer_s is not None and fast.token_layer_s > 0
    other = window_of(_ring(seed=10), 8)
    orgb, oids = [f.rgb for f in other], [(f.seq, f.ts) for f in other]
    ready = fresh.readiness("other", orgb, oids, 2.0)
    assert ready is not None and ready.missing_pairs == 4 and ready.prefill_left_s is not None
    head = fast.prefix_ids(fast.vision.window("left", rgb, ids).embeds.shape[0])
    whole = len(head) * len(_decoder_layers(fresh)) * fast.token_layer_s
    assert ready.prefill_left_s == pytest.approx(whole) and ready.prefill_s == pytest.approx(whole)


def test_a_prefill_stepped_by_layers_equals_the_models_own_forward(engine: TransformersEngine) -> None:
    """Stepped by layers in one chunk, the cache and last logits are the model's one forward's, bit for bit;
    in chunks of 7 tokens (boundaries inside the video), they agree to float rounding."""
    frames = window_of(_ring(seed=7), 8)
    window = engine.vision.window("chunks", [f.rgb for f in frames], [(f.seq, f.ts) for f in frames])
    assert window is not None
    fast = engine.fast
    head = fast.prefix_ids(window.embeds.shape[0])
    runs = []
    for chunk, by_layer in ((0, False), (0, True), (7, True)):
        run = PrefixPrefill(
            engine.loaded.model, head, window.embeds, window.grid, fast.video_pad, fast.rope_kwargs(2.0), chunk
        )
        assert run.by_layer
        run.by_layer = by_layer  # False: each chunk is one call of the model's forward
        steps = 1
        while not run.step():
            steps += 1
            if by_layer and steps == 2:  # one layer over the first chunk: no token finished yet
                first = f"1 of {run.layers} layers over tokens up to {chunk or len(head)}"
                assert run.progress == f"0 of {len(head)} tokens, {first}"
                assert run.work == (chunk or len(head), len(head) * run.layers)
        assert steps == (1 if not by_layer else run.layers * -(-len(head) // (chunk or len(head))))
        assert run.progress == f"{len(head)} of {len(head)} tokens"
        assert run.work == (len(head) * run.layers,) * 2
        runs.append(run)
    forward, layered, chunked = runs
    assert forward.prefix is not None and layered.prefix is not None and chunked.prefix is not None
    assert torch.equal(forward.last_logits, layered.last_logits)
    assert torch.allclose(forward.last_logits, chunked.last_logits, atol=1e-4, rtol=1e-4)
    caches = (forward.prefix.cache, layered.prefix.cache, chunked.prefix.cache)
    for a, b, c in zip(*(cache.layers for cache in caches), strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.allclose(a.keys, c.keys, atol=1e-4, rtol=1e-4)
        assert torch.allclose(a.values, c.values, atol=1e-4, rtol=1e-4)


def test_the_window_choice_prefers_a_prepared_window_within_the_lag() -> None:
    """Newest prefilled window within window_lag_s, else the newest with the fewest pairs to encode, else the newest."""
    newest = WindowOption(0.0, 2, False)
    half = WindowOption(0.5, 1, False)
    also_half = WindowOption(1.0, 1, False)
    encoded = WindowOption(1.5, 0, False)
    prefilled = WindowOption(2.0, 0, True)
    options = [newest, half, also_half, encoded, prefilled]
    assert choose_window(options, 2.0) == 4
    assert choose_window(options, 1.7) == 3
    assert choose_window(options, 1.2) == 1
    assert choose_window(options, 0.0) == 0
    assert choose_window([WindowOption(0.0, None, False)], 5.0) == 0


def test_a_prefilled_window_that_was_newest_when_asked_is_taken_beyond_the_lag() -> None:
    """A late ask keeps to its burst's window (prefilled, the newest when asked) even with no lag allowed."""
    newest = WindowOption(0.0, 1, False, since_asked=True)
    asked_on = WindowOption(0.5, 0, True, since_asked=True)
    older = WindowOption(1.0, 0, True, since_asked=False)
    assert choose_window([newest, asked_on, older], 0.0) == 1
    assert choose_window([newest, WindowOption(0.5, 0, False, since_asked=True)], 0.0) == 0  # not prefilled: newest
    assert choose_window([newest, older], 0.0) == 0  # older than the ask: never beyond the lag
    assert choose_window([newest, older], 1.0) == 1


@pytest.fixture(scope="module", params=["tiny-random-instruct", "tiny-random-qwen2.5-vl"])
def sharp_engine(request: pytest.FixtureRequest, streamer_cache: Path) -> TransformersEngine:
    """A tiny model whose answers depend on token positions (and, for the Instruct one, on a
    repetition penalty over the whole prompt): a joiner fed its last prompt token twice, or
    at a shifted position, gets other tokens than generate's."""
    cfg = ModelConfig(id=request.param, prefill_chunk_tokens=32)
    return TransformersEngine(load_model(cfg), cfg)


def test_rows_joining_a_running_decode_get_generates_token_ids(engine: TransformersEngine) -> None:
    """Questions handed over between decode steps (alone or together) get generate's token ids, as do the others."""
    _check_joiners(engine)


def test_rows_joining_on_a_position_sensitive_model_get_generates_token_ids(sharp_engine: TransformersEngine) -> None:
    """The same on models that react to positions, so a joiner's prefill or first step being off shows in its tokens."""
    _check_joiners(sharp_engine)


def _check_joiners(engine: TransformersEngine) -> None:
    ring = _ring(seed=8)
    frames = window_of(ring, 8)
    texts = ["What is moving?", "Describe the scene.", "Is anyone there?", "What colour is it?"]

    def request(text: str) -> GenerationRequest:
        return GenerationRequest([f.rgb for f in frames], text, 12, 2.0, stream="join", frame_ids=_ids(frames))

    expected = {t: _plain_ids(engine, ring, t, 12) for t in texts}
    for first, late in ((texts[:1], texts[1:]), (texts[:3], texts[3:])):
        got: dict[str, list[int]] = {}
        calls = [0]

        def joiners(room: int, late=late, got=got, calls=calls) -> list[Joiner]:
            calls[0] += 1
            if calls[0] != 2:
                return []
            return [
                Joiner(
                    request(t), lambda p: None, lambda: False, lambda result, t=t: got.__setitem__(t, result.token_ids)
                )
                for t in late
            ]

        n = len(first)
        results = engine.generate_batch(
            [request(t) for t in first], [lambda p: None] * n, [lambda: False] * n, joiners=joiners
        )
        got.update({t: res.token_ids for t, res in zip(first, results, strict=True)})
        assert got == expected, (first, late)


def _ids(frames) -> tuple:
    return tuple((f.seq, f.ts) for f in frames)
