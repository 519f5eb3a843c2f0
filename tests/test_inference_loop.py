"""The inference loop in-process, with the tiny model and hand-filled ring buffers."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamer.capture.ring import RingBuffer
from streamer.config import ModelConfig
from streamer.inference.engine import Engine
from streamer.inference.loader import load_model
from streamer.inference.loop import InferenceLoop
from streamer.inference.questions import Answer, Question, Rejected, StreamFeed, window_of
from streamer.inference.transformers_engine import TransformersEngine


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def _add(self, kind: str, q: Question, value: object) -> None:
        with self.lock:
            self.events.append((kind, q.id, value))
            self.done.notify_all()

    def on_accepted(self, q: Question, position: int) -> None:
        self._add("accepted", q, position)

    def on_text(self, q: Question, text: str) -> None:
        self._add("token", q, text)

    def on_answer(self, q: Question, answer: Answer) -> None:
        self._add("answer", q, answer)

    def on_error(self, q: Question, code: str, message: str) -> None:
        self._add("error", q, code)

    def finals(self) -> dict[str, list[object]]:
        out: dict[str, list[object]] = {}
        with self.lock:
            for kind, qid, value in self.events:
                if kind in ("answer", "error"):
                    out.setdefault(qid, []).append(value if kind == "error" else "answer")
        return out

    def wait_finals(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.done:
            while sum(len(v) for v in self._finals_unlocked().values()) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {self._finals_unlocked()} after {timeout} s"
                self.done.wait(left)

    def _finals_unlocked(self) -> dict[str, list[object]]:
        out: dict[str, list[object]] = {}
        for kind, qid, value in self.events:
            if kind in ("answer", "error"):
                out.setdefault(qid, []).append(value)
        return out


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> TransformersEngine:
    cfg = ModelConfig(id=str(tiny_model))
    return TransformersEngine(load_model(cfg), cfg)


def _filled_ring(n: int = 8, size: tuple[int, int] = (336, 448)) -> RingBuffer:
    ring = RingBuffer(16)
    rng = np.random.default_rng(n)
    for _ in range(n):
        ring.push(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return ring


def _question(qid: str, sink: RecordingSink, owner: object = "c1", stream: str = "s", tokens: int = 4) -> Question:
    return Question(id=qid, stream=stream, text="What?", owner=owner, sink=sink, frames=4, max_new_tokens=tokens)


def test_window_keeps_only_frames_of_the_newest_size() -> None:
    ring = _filled_ring(3, (100, 100))
    for _ in range(2):
        ring.push(np.zeros((120, 160, 3), dtype=np.uint8))
    assert [f.seq for f in window_of(ring, 8)] == [3, 4]


def test_answers_use_newest_frames_and_stream_tokens(engine: TransformersEngine) -> None:
    ring = _filled_ring(10)
    loop = InferenceLoop(engine, {"s": StreamFeed(ring, 2.0)}, queue_size=4)
    loop.start()
    sink = RecordingSink()
    try:
        assert loop.submit(_question("a", sink, tokens=6)) == 0
        sink.wait_finals(1)
    finally:
        loop.stop()
    answer = next(v for k, _, v in sink.events if k == "answer")
    assert isinstance(answer, Answer)
    assert (answer.frames.first_seq, answer.frames.last_seq, answer.frames.count) == (6, 9, 4)
    assert "".join(str(v) for k, _, v in sink.events if k == "token") == answer.text
    assert sink.events[0] == ("accepted", "a", 0)


def test_refusals_end_the_question_once(engine: TransformersEngine) -> None:
    loop = InferenceLoop(engine, {"s": StreamFeed(RingBuffer(4), 2.0)}, queue_size=1)
    sink = RecordingSink()
    with pytest.raises(Rejected) as info:
        loop.submit(_question("nostream", sink, stream="other"))
    assert info.value.code == "unknown_stream"
    with pytest.raises(Rejected) as info:
        loop.submit(_question("noframes", sink))
    assert info.value.code == "stream_unavailable"
    assert sink.finals() == {"nostream": ["unknown_stream"], "noframes": ["stream_unavailable"]}


def test_queue_full_is_busy_and_stop_ends_queued_questions(engine: TransformersEngine) -> None:
    loop = InferenceLoop(engine, {"s": StreamFeed(_filled_ring(), 2.0)}, queue_size=2)  # not started
    sink = RecordingSink()
    loop.submit(_question("q1", sink, owner="a"))
    loop.submit(_question("q2", sink, owner="b"))
    with pytest.raises(Rejected) as info:
        loop.submit(_question("q3", sink, owner="c"))
    assert info.value.code == "busy"
    loop.stop()
    assert sink.finals() == {"q3": ["busy"], "q1": ["shutting_down"], "q2": ["shutting_down"]}
    with pytest.raises(Rejected):
        loop.submit(_question("late", sink, owner="d"))


def test_engine_failure_is_internal_and_the_loop_lives_on(engine: TransformersEngine) -> None:
    class FailingOnce(Engine):
        note = None
        model_id = "x"

        def __init__(self) -> None:
            self.failed = False

        def generate(self, request, on_text, should_stop):
            if not self.failed:
                self.failed = True
                raise RuntimeError("simulated failure")
            return engine.generate(request, on_text, should_stop)

    loop = InferenceLoop(FailingOnce(), {"s": StreamFeed(_filled_ring(), 2.0)}, queue_size=4)  # type: ignore[arg-type]
    loop.start()
    sink = RecordingSink()
    try:
        loop.submit(_question("boom", sink, owner="a"))
        sink.wait_finals(1)
        loop.submit(_question("fine", sink, owner="a"))
        sink.wait_finals(2)
    finally:
        loop.stop()
    assert sink.finals() == {"boom": ["internal"], "fine": ["answer"]}


def test_random_mix_of_asks_and_cancels_ends_each_question_exactly_once(engine: TransformersEngine) -> None:
    rings = {"s": StreamFeed(_filled_ring(), 2.0), "t": StreamFeed(_filled_ring(6), 2.0)}
    loop = InferenceLoop(engine, rings, queue_size=8)
    loop.start()
    sink = RecordingSink()
    rng = random.Random(7)
    submitted: list[str] = []
    try:
        for i in range(60):
            owner = rng.choice(["a", "b", "c"])
            action = rng.random()
            if action < 0.6:
                qid = f"q{i}"
                submitted.append(qid)
                try:
                    loop.submit(
                        _question(qid, sink, owner=owner, stream=rng.choice(["s", "t"]), tokens=rng.randint(1, 24))
                    )
                except Rejected:
                    pass
            elif action < 0.85 and submitted:
                loop.cancel(owner, rng.choice(submitted))
            else:
                loop.cancel_owner(owner)
            time.sleep(rng.random() * 0.01)
        sink.wait_finals(len(submitted), timeout=120)
    finally:
        loop.stop()
    finals = sink.finals()
    assert sorted(finals) == sorted(submitted)
    assert all(len(v) == 1 for v in finals.values()), finals
    outcomes = {v[0] for v in finals.values()}
    assert "answer" in outcomes and outcomes <= {"answer", "cancelled", "superseded", "busy"}


class WatchRecorder(RecordingSink):
    def on_watch_accepted(self, w, position: int) -> None:
        self._add("watch_accepted", w, position)

    def on_watch_end(self, w, code: str, message: str) -> None:
        self._add("watch_end", w, code)


def test_watch_rounds_never_pile_up_behind_a_slow_generation(engine: TransformersEngine) -> None:
    """While one round's generation is held up, at most one more round waits; the rounds that
    fall due meanwhile are skipped and counted, and the watch ends exactly once."""
    from streamer.inference.questions import Watch

    release = threading.Event()

    class HeldFirst(Engine):
        note = None
        model_id = "x"
        calls = 0

        def generate(self, request, on_text, should_stop):
            HeldFirst.calls += 1
            if HeldFirst.calls == 1:
                assert release.wait(60), "the test never released the first generation"
            return engine.generate(request, on_text, should_stop)

    loop = InferenceLoop(HeldFirst(), {"s": StreamFeed(_filled_ring(), 2.0)}, queue_size=4)  # type: ignore[arg-type]
    sink = WatchRecorder()
    watch = Watch(id="w", stream="s", text="?", owner="o", sink=sink, every_s=0.25, frames=2, max_new_tokens=1)
    loop.start()
    depths = []
    try:
        progress = loop.add_watch(watch)
        held_from = time.monotonic()
        # Hold the first round for at least 1.5 s: 6 more rounds fall due at 4 a second, however
        # loaded the machine (a lower bound on time, not an upper one).
        while time.monotonic() - held_from < 1.5:
            depths.append(loop.depth())
            time.sleep(0.05)
        release.set()
        deadline = time.monotonic() + 60
        while progress.rounds < 2:
            assert time.monotonic() < deadline, "the watch did not go on after the held round"
            depths.append(loop.depth())
            time.sleep(0.02)
    finally:
        release.set()
        loop.stop()
    assert progress.skipped >= 4, progress.skipped  # the rounds that fell due while held: skipped, and counted
    assert max(depths) <= 1  # one round at most waits while one runs
    kinds = [k for k, _, _ in sink.events]
    assert kinds[0] == "watch_accepted" and kinds[-1] == "watch_end"
    assert sink.events[-1][2] == "shutting_down"
    assert kinds.count("watch_end") == 1


def test_a_failing_warm_up_does_not_stop_the_loop(engine: TransformersEngine) -> None:
    class WarmFails(Engine):
        note = None
        model_id = "x"
        warm_calls = 0

        def warm(self, stream, frames, ids, sample_fps) -> bool:
            WarmFails.warm_calls += 1
            raise RuntimeError("simulated failure while warming")

        def generate(self, request, on_text, should_stop):
            return engine.generate(request, on_text, should_stop)

    loop = InferenceLoop(WarmFails(), {"s": StreamFeed(_filled_ring(), 2.0)}, queue_size=4, warm_frames=4)  # type: ignore[arg-type]
    loop.start()
    sink = RecordingSink()
    try:
        deadline = time.monotonic() + 30
        while WarmFails.warm_calls == 0:  # the loop is idle: it warms, which fails
            assert time.monotonic() < deadline, "the loop never warmed"
            time.sleep(0.02)
        time.sleep(0.5)  # idle a while longer: a loop that did not pause would warm again and again
        loop.submit(_question("after-warm-failure", sink))
        sink.wait_finals(1)
    finally:
        loop.stop()
    assert WarmFails.warm_calls == 1  # failed once, then paused instead of spinning
    assert sink.finals() == {"after-warm-failure": ["answer"]}


@pytest.mark.slow
def test_a_burst_is_one_batch_and_a_lone_question_waits_one_gap_not_the_window(engine: TransformersEngine) -> None:
    """Questions that keep coming within the gap start as one batch; a lone one starts after
    one gap, long before the (here huge) batch window ends."""

    sizes: list[int] = []

    class BatchSizes(Engine):
        note = None
        model_id = "x"

        def generate(self, request, on_text, should_stop):
            return self.generate_batch([request], [on_text], [should_stop])[0]

        def generate_batch(self, requests, on_texts, should_stops, **kwargs):
            sizes.append(len(requests))
            return engine.generate_batch(requests, on_texts, should_stops, **kwargs)

    window_s = 600.0
    loop = InferenceLoop(
        BatchSizes(),
        {"s": StreamFeed(_filled_ring(), 2.0)},
        queue_size=8,
        max_batch=4,
        batch_window_s=window_s,
        batch_gap_s=2.0,  # generous: the three submits below come microseconds apart
    )
    sink = RecordingSink()
    loop.start()
    try:
        for qid in ("a", "b", "c"):
            loop.submit(_question(qid, sink, owner=qid))
        sink.wait_finals(3, timeout=120)
        deadline = time.monotonic() + 60
        while not loop.idle():  # else the lone question would join the ending batch
            assert time.monotonic() < deadline, "the loop never went idle"
            time.sleep(0.01)
        lone_from = time.monotonic()
        loop.submit(_question("lone", sink))
        sink.wait_finals(4, timeout=120)
        lone_s = time.monotonic() - lone_from
    finally:
        loop.stop()
    assert sizes == [3, 1]
    assert set(sink.finals()) == {"a", "b", "c", "lone"} and all(v == ["answer"] for v in sink.finals().values())
    assert 2.0 <= lone_s < window_s  # it waited its gap (a lower bound), not the window


@pytest.mark.slow
def test_an_ask_that_starts_after_its_bursts_batch_keeps_that_prefilled_window(engine: TransformersEngine) -> None:
    """An ask that arrived while its burst's window was the newest keeps that window (prefilled)
    even if it starts after a newer frame came; an ask that arrives after the frame takes it."""
    release, held = threading.Event(), threading.Event()

    class HeldAfterFirst(Engine):
        note = None
        model_id = "x"
        calls = 0

        def generate(self, request, on_text, should_stop):
            return self.generate_batch([request], [on_text], [should_stop])[0]

        def generate_batch(self, requests, on_texts, should_stops, **kwargs):
            results = engine.generate_batch(requests, on_texts, should_stops, **{**kwargs, "joiners": None})
            HeldAfterFirst.calls += 1
            if HeldAfterFirst.calls == 1:  # the first batch's answer is out; its window is prefilled
                held.set()
                assert release.wait(60), "the test never released the first batch"
            return results

        def readiness(self, stream, frames, ids, sample_fps):
            return engine.readiness(stream, frames, ids, sample_fps)

    ring = _filled_ring(8)
    loop = InferenceLoop(HeldAfterFirst(), {"s": StreamFeed(ring, 2.0)}, queue_size=4, max_batch=4)  # type: ignore[arg-type]
    sink = RecordingSink()
    loop.start()
    try:
        loop.submit(_question("first", sink, owner="a"))
        assert held.wait(120), "the first batch never ran"
        loop.submit(_question("late", sink, owner="b"))  # arrives while frame 7 is the newest
        ring.push(np.random.default_rng(99).integers(0, 256, (336, 448, 3), dtype=np.uint8))
        release.set()
        sink.wait_finals(2, timeout=120)
        loop.submit(_question("after", sink, owner="c"))  # arrives after frame 8 came
        sink.wait_finals(3, timeout=120)
    finally:
        release.set()
        loop.stop()
    answers = {qid: value for kind, qid, value in sink.events if kind == "answer"}
    assert set(answers) == {"first", "late", "after"}
    assert answers["first"].frames.last_seq == answers["late"].frames.last_seq == 7  # type: ignore[attr-defined]
    assert answers["after"].frames.last_seq == 8  # type: ignore[attr-defined]
    assert answers["late"].prefix_ready is True  # type: ignore[attr-defined]
