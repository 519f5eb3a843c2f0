"""Frame strides: windows on a fixed grid of frame pairs, the stride the governor picks from
measured encode times and the loop's load, and strided answers equal to the seed pipeline's
on the same frames at the strided frame rate."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from streamer.capture.ring import RingBuffer
from streamer.config import ModelConfig
from streamer.inference.loader import load_model
from streamer.inference.loop import InferenceLoop
from streamer.inference.policy import StrideGovernor
from streamer.inference.questions import Answer, Question, StreamFeed, strided_windows
from streamer.inference.reference import reference_generate, reference_inputs
from streamer.inference.tiny import ensure_tiny_model
from streamer.inference.transformers_engine import TransformersEngine


def _ring(n: int, capacity: int = 64, side: int = 56) -> RingBuffer:
    ring = RingBuffer(capacity)
    rng = np.random.default_rng(n)
    for _ in range(n):
        ring.push(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    return ring


def test_strided_windows_lie_on_the_grid_and_end_on_a_pair() -> None:
    """Stride 3: frames are multiples of 3, each window ends on a pair's second frame, one pair apart, and
    the window that follows shares the pairs it can."""
    ring = _ring(41)  # seq 0-40
    windows = strided_windows(ring, 4, 3, 3)
    assert [[f.seq for f in w] for w in windows] == [[30, 33, 36, 39], [24, 27, 30, 33], [18, 21, 24, 27]]
    for _ in range(2):  # seq 41, and 42: the first frame of a new grid pair
        ring.push(np.zeros((56, 56, 3), dtype=np.uint8))
    assert [f.seq for f in strided_windows(ring, 4, 3, 1)[0]] == [30, 33, 36, 39]
    for _ in range(3):  # up to seq 45: the pair (42, 45) is complete
        ring.push(np.zeros((56, 56, 3), dtype=np.uint8))
    assert [f.seq for f in strided_windows(ring, 4, 3, 1)[0]] == [36, 39, 42, 45]  # (36, 39) is shared
    assert [f.seq for f in strided_windows(ring, 4, 1, 1)[0]] == [42, 43, 44, 45]  # stride 1: ends on an odd seq


def test_strided_windows_keep_the_newest_size_and_say_when_short() -> None:
    """Frames of an older size are left out; a young stream gives one short window, not several."""
    ring = _ring(10)
    for _ in range(8):
        ring.push(np.zeros((28, 56, 3), dtype=np.uint8))  # seq 10-17, a new size
    (window,) = strided_windows(ring, 8, 2, 4)
    assert [f.seq for f in window] == [10, 12, 14] and all(f.rgb.shape == (28, 56, 3) for f in window)
    assert strided_windows(RingBuffer(4), 8, 2, 2) == []
    with pytest.raises(ValueError):
        strided_windows(ring, 8, 0, 1)


def test_the_governor_rises_when_a_new_pair_costs_too_much_and_falls_with_room_to_spare() -> None:
    """Stride = ceil((encode s + prefill s) x pairs/s at stride 1 / 0.7): up when a fifth over, down with a third
    to spare, at most max_stride; before a prefill is measured the encoding alone counts."""
    gov = StrideGovernor(max_stride=16)
    assert gov.update([2.0]) == 1  # nothing measured yet
    gov.encoded(0.3)  # a 2 fps stream gains 1 pair/s at stride 1: 0.3 s of each second
    assert gov.update([2.0]) == 1  # 0.3 / 0.7: it fits
    gov.encoded(1.3)  # the mean of the first ten: 0.8 s a pair
    assert gov.update([2.0]) == 1  # 0.8 / 0.7 = 1.14: within a fifth of its share
    gov.encoded(1.0)  # (0.3 + 1.3 + 1.0) / 3 = 0.87 s
    assert gov.update([2.0]) == 2  # 0.87 / 0.7 = 1.24: up to ceil(1.24)
    gov.prefilled(2.6)  # each new pair's window is prefilled too (the first estimate counts at once): 3.47 s
    assert gov.update([2.0]) == 5  # ceil(3.47 / 0.7)
    assert gov.update([2.0, 2.0]) == 10  # two streams: ceil(6.93 / 0.7)
    assert gov.update([2.0]) == 7  # one stream again: down to what fits with a third to spare, ceil(4.61 / 0.7)
    gov.encode_s, gov.prefill_s = 0.2, 0.1
    assert gov.update([2.0]) == 1  # a faster machine: ceil(0.3 x 1.33 / 0.7) = 1
    gov.prefill_s = 100.0
    assert gov.update([2.0]) == 16  # at most max_stride
    with pytest.raises(ValueError):
        StrideGovernor(0)


def test_the_governor_keeps_its_stride_through_a_slow_spell() -> None:
    """Settled at stride 8 (5.5 s a pair at 2 fps), five pairs that cost 1.5 times as much (a shared host's
    slow 40 s) keep it; a slowdown that lasts raises it, and the prefill's estimate counts once per pair."""
    gov = StrideGovernor(max_stride=16)
    for _ in range(10):
        gov.prefilled(3.5)
        gov.encoded(2.0)
    assert (gov.encode_s, gov.prefill_s) == (pytest.approx(2.0), pytest.approx(3.5))
    assert gov.update([2.0]) == 8  # ceil(5.5 / 0.7)
    for _ in range(50):
        gov.prefilled(5.25)  # many estimates between two pairs weigh as one
    for _ in range(5):
        gov.encoded(3.0)
        assert gov.update([2.0]) == 8
    for _ in range(10):
        gov.encoded(3.0)
    assert gov.update([2.0]) >= 11


def test_the_governor_says_once_when_its_largest_stride_is_short(caplog: pytest.LogCaptureFixture) -> None:
    """A new pair that costs more than its share even at max_stride: a warning naming the knobs, once."""
    gov = StrideGovernor(max_stride=4)
    gov.encoded(2.0)
    gov.prefilled(3.0)
    with caplog.at_level("WARNING", logger="streamer.inference.policy"):
        assert gov.update([2.0]) == 4
        assert gov.update([2.0]) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "max_frame_stride" in warnings[0] and "5.00 s" in warnings[0]


def test_a_young_stream_gets_whole_windows_at_a_lower_stride() -> None:
    """With too few frames held for 8 frames at stride 4, the window has 8 frames at the stride that fits."""
    from streamer.inference.loop import Strides

    strides = Strides(frame_stride=4)
    feed = StreamFeed(_ring(25), 2.0)  # seq 0-24: 25 // (8 + 2) = 2
    (window,), stride = strides.windows(feed, 8, 4, 1)
    assert stride == 2 and [f.seq for f in window] == [8, 10, 12, 14, 16, 18, 20, 22]
    feed = StreamFeed(_ring(60), 2.0)
    (window,), stride = strides.windows(feed, 8, 4, 1)
    assert stride == 4 and len(window) == 8 and window[-1].seq == 52  # 56 starts a pair


def test_a_young_stream_halves_the_stride_and_a_short_buffer_caps_it() -> None:
    """Stride 12 for 8 frames (120 frames held): 6 with 60-119 held, 3 with 30-59, 1 below; a 64-frame buffer
    caps it at 6 however long the stream runs."""
    from streamer.inference.loop import Strides

    strides = Strides(frame_stride=12)
    for held, expected in ((29, 1), (30, 3), (59, 3), (60, 6), (119, 6), (120, 12)):
        ring = _ring(held, capacity=256)
        assert strides.windows(StreamFeed(ring, 2.0), 8, 12, 1)[1] == expected, held
    assert strides.windows(StreamFeed(_ring(200, capacity=64), 2.0), 8, 12, 1)[1] == 6


def test_once_every_window_is_ready_warm_up_works_ahead_on_the_grid_only() -> None:
    """Stride 3: with nothing left to prepare, warm-up hands the newest grid window to warm_ahead (at 2/3 fps);
    at stride 1 (windows not on a grid) it never does."""
    from streamer.inference.engine import Engine
    from streamer.inference.loop import Strides, Warmer

    class Ready(Engine):
        note = None
        model_id = "x"

        def __init__(self) -> None:
            self.ahead: list[tuple[str, list[int], float]] = []

        def generate(self, request, on_text, should_stop):  # pragma: no cover - never asked
            raise AssertionError

        def warm(self, stream, frames, ids, sample_fps) -> bool:
            return False  # every window is ready

        def warm_ahead(self, stream, frames, ids, sample_fps) -> bool:
            self.ahead.append((stream, [seq for seq, _ in ids], sample_fps))
            return True

    feeds = {"s": StreamFeed(_ring(40), 2.0)}
    engine = Ready()
    assert Warmer(engine, 4, strides=Strides(frame_stride=3)).step(feeds)  # type: ignore[arg-type]
    assert engine.ahead == [("s", [30, 33, 36, 39], 2.0 / 3)]
    engine.ahead.clear()
    assert not Warmer(engine, 4, strides=Strides(frame_stride=1)).step(feeds)  # type: ignore[arg-type]
    assert engine.ahead == []


def test_warm_up_works_ahead_instead_of_a_prefill_that_would_end_after_the_next_pair_comes() -> None:
    """Stride 3 at 2 fps (a pair every 3 s): an encoded window whose prefill needs longer than the time until
    the next pair is passed over for the next window's prefill ahead (questions will take that one); one
    whose prefill fits goes on, and so does the late one once nothing is left to do ahead."""
    from streamer.inference.engine import Engine, Readiness
    from streamer.inference.loop import Strides, Warmer

    class Prefilling(Engine):
        note = None
        model_id = "x"

        def __init__(self, left_s: float, ahead_work: bool) -> None:
            self.left_s, self.ahead_work = left_s, ahead_work
            self.calls: list[str] = []

        def generate(self, request, on_text, should_stop):  # pragma: no cover - never asked
            raise AssertionError

        def readiness(self, stream, frames, ids, sample_fps) -> Readiness:
            return Readiness(missing_pairs=0, prefix_ready=False, prefill_left_s=self.left_s)

        def warm(self, stream, frames, ids, sample_fps) -> bool:
            self.calls.append("warm")
            return True

        def warm_ahead(self, stream, frames, ids, sample_fps) -> bool:
            self.calls.append("ahead")
            return self.ahead_work

    feeds = {"s": StreamFeed(_ring(40), 2.0)}  # frames captured just now: the next pair comes in about 3 s
    for left_s, ahead_work, calls in (
        (60.0, True, ["ahead"]),
        (60.0, False, ["ahead", "warm"]),
        (0.01, True, ["warm"]),
    ):
        engine = Prefilling(left_s, ahead_work)
        assert Warmer(engine, 4, strides=Strides(frame_stride=3)).step(feeds)  # type: ignore[arg-type]
        assert engine.calls == calls, (left_s, ahead_work)
    engine = Prefilling(60.0, True)
    assert Warmer(engine, 4, strides=Strides(frame_stride=1)).step(feeds)  # type: ignore[arg-type]
    assert engine.calls == ["warm"]  # not on a grid: no next window to work ahead on


def test_warm_up_tells_the_governor_what_a_new_pair_costs() -> None:
    """With frame_stride auto, the encode time warm-up measures and the engine's whole-prefill estimate
    reach the governor."""
    from streamer.inference.engine import Engine, Readiness
    from streamer.inference.loop import Strides, Warmer

    class Encoding(Engine):
        note = None
        model_id = "x"

        def generate(self, request, on_text, should_stop):  # pragma: no cover - never asked
            raise AssertionError

        def readiness(self, stream, frames, ids, sample_fps) -> Readiness:
            return Readiness(missing_pairs=1, prefix_ready=False, prefill_left_s=3.5, prefill_s=3.5)

        def warm(self, stream, frames, ids, sample_fps) -> bool:
            return True  # it encoded a pair

    strides = Strides(frame_stride="auto")
    assert Warmer(Encoding(), 4, strides=strides).step({"s": StreamFeed(_ring(40), 2.0)})
    assert strides.governor is not None
    assert strides.governor.prefill_s == 3.5 and strides.governor.encode_s is not None


class _Answers:
    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.errors: dict[str, str] = {}
        self.done = threading.Condition()

    def on_accepted(self, q: Question, position: int) -> None:
        pass

    def on_text(self, q: Question, text: str) -> None:
        pass

    def on_answer(self, q: Question, answer: Answer) -> None:
        with self.done:
            self.answers[q.id] = answer
            self.done.notify_all()

    def on_error(self, q: Question, code: str, message: str) -> None:
        with self.done:
            self.errors[q.id] = code
            self.done.notify_all()

    def wait(self, n: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.answers) + len(self.errors) >= n, 120), self.errors


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["tiny-random-instruct", "tiny-random-qwen2.5-vl"])
def test_a_strided_answer_is_the_seed_pipelines_on_its_frames_at_the_strided_rate(
    streamer_cache: Path, model_id: str
) -> None:
    """frame_stride 3 at 2 fps: the answer names frames 3 apart on the grid, and its token ids are generate's on
    those frames as a video at 2/3 fps."""
    ensure_tiny_model(model_id)
    cfg = ModelConfig(id=model_id)
    engine = TransformersEngine(load_model(cfg), cfg)
    ring = _ring(40, side=112)
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=4, frame_stride=3)
    sink = _Answers()
    loop.start()
    try:
        loop.submit(
            Question(id="q", stream="s", text="What is moving?", owner="o", sink=sink, frames=4, max_new_tokens=12)
        )  # type: ignore[arg-type]
        sink.wait(1)
    finally:
        loop.stop()
    answer = sink.answers["q"]
    assert answer.frames.stride == 3 and list(answer.frames.seqs()) == [30, 33, 36, 39]
    frames = {f.seq: f.rgb for f in ring.latest(64)}
    inputs = reference_inputs(
        engine.loaded.processor,
        [frames[s] for s in answer.frames.seqs()],
        "What is moving?",
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        fps=2.0 / 3,
    )
    assert list(answer.token_ids) == reference_generate(engine.loaded.model, inputs, max_new_tokens=12)


@pytest.mark.slow
@pytest.mark.parametrize(("model_id", "chunk"), [("tiny-random-instruct", 4096), ("tiny-random-qwen2.5-vl", 16)])
def test_a_window_prefilled_before_its_newest_pair_came_answers_as_the_seed_pipeline(
    streamer_cache: Path, model_id: str, chunk: int
) -> None:
    """Stride 3: the next window's prefill runs ahead up to its newest pair's tokens; when the pair comes, the
    answer prefills only that pair's tokens and its own, and its token ids are generate's on those frames."""
    from streamer.inference.fastpath import split_prompt
    from streamer.inference.loop import _ids

    ensure_tiny_model(model_id)
    cfg = ModelConfig(id=model_id, prefill_chunk_tokens=chunk)
    engine = TransformersEngine(load_model(cfg), cfg)
    ring = _ring(40, side=112)
    (window,) = strided_windows(ring, 4, 3, 1)
    assert [f.seq for f in window] == [30, 33, 36, 39]
    rgb, ids = [f.rgb for f in window], _ids(window)
    while engine.warm("s", rgb, ids, 2.0 / 3):
        pass
    ahead = 0
    while engine.warm_ahead("s", rgb, ids, 2.0 / 3):
        ahead += 1
    assert ahead > 0 and engine.fast.ahead["s"][1].blocked
    for _ in range(6):  # seq 40-45: the pair (42, 45) comes
        ring.push(np.random.default_rng(45).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    question = "What is moving?"
    prompt = engine.fast.prompt_ids(question, 1)
    _, suffix = split_prompt(prompt, engine.fast._vision_end)
    encoded = engine.vision.window("s", rgb, ids)
    assert encoded is not None
    pair_tokens = encoded.embeds.shape[0] // 2
    lengths: list[int] = []  # the first decoder layer's input lengths, in passes that run it
    layer = engine.loaded.model.model.language_model.layers[0]
    hook = layer.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=4, frame_stride=3)
    sink = _Answers()
    loop.start()
    try:
        loop.submit(Question(id="q", stream="s", text=question, owner="o", sink=sink, frames=4, max_new_tokens=12))  # type: ignore[arg-type]
        sink.wait(1)
    finally:
        loop.stop()
        hook.remove()
    answer = sink.answers["q"]
    assert list(answer.frames.seqs()) == [36, 39, 42, 45]
    assert "s" not in engine.fast.ahead  # taken by the question
    # The tokens the decoder saw: the new pair's, <|vision_end|> and the question's (the prefill, in chunks
    # of 16 or one), then each token generated but the last.
    assert sum(lengths) == pair_tokens + 1 + len(suffix) + len(answer.token_ids) - 1, lengths
    frames = {f.seq: f.rgb for f in ring.latest(64)}
    inputs = reference_inputs(
        engine.loaded.processor,
        [frames[s] for s in answer.frames.seqs()],
        question,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        fps=2.0 / 3,
    )
    assert list(answer.token_ids) == reference_generate(engine.loaded.model, inputs, max_new_tokens=12)


def test_a_ring_buffer_too_short_for_the_largest_stride_is_reported_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """frame_stride auto with max 8 and 8-frame windows needs 80 frames held: the default 64 gets a
    warning that names the stride it allows and the size to set; enough frames, or stride 1, get none."""
    from streamer.config import SourceConfig
    from streamer.server.runtime import _warn_if_short_of_stride

    auto = ModelConfig(id="m", frames=8, frame_stride="auto", max_frame_stride=8)
    with caplog.at_level("WARNING", logger="streamer.server.runtime"):
        _warn_if_short_of_stride(SourceConfig(name="cam", url="x.mp4"), auto)
        _warn_if_short_of_stride(SourceConfig(name="big", url="x.mp4", buffer_frames=80), auto)
        _warn_if_short_of_stride(SourceConfig(name="one", url="x.mp4"), ModelConfig(id="m", frames=8))
    assert [r.getMessage() for r in caplog.records] == [
        "stream cam: buffer_frames 64 holds 8-frame windows up to stride 6, not 8; set buffer_frames to 80"
    ]
