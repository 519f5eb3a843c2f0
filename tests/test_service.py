"""The service layer without a WebSocket: sessions ask through the real inference loop and
read their events, as any adapter would (an HTTP endpoint, a rule runner)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from streamer.capture import RingBuffer
from streamer.config import Settings, parse_settings
from streamer.inference.engine import Engine, GenerationResult
from streamer.inference.loop import InferenceLoop
from streamer.inference.questions import StreamFeed
from streamer.service import (
    Accepted,
    Alerted,
    Answered,
    AskRequest,
    AskService,
    Event,
    EventHub,
    Failed,
    Session,
    Token,
    WatchRequest,
)

SETTINGS = {
    "sources": [{"name": "cam", "url": "demo"}, {"name": "still", "url": "demo", "mode": "image"}],
    "model": {"id": "tiny-random", "frames": 4, "max_new_tokens": 5},
}


class WordEngine(Engine):
    """Answers every question with ``words`` tokens, one text piece each; records what it was asked."""

    model_id = "words"

    def __init__(self, words: int = 3, hold: threading.Event | None = None) -> None:
        self.words = words
        self.hold = hold
        self.requests: list = []

    def generate(self, request, on_text, should_stop) -> GenerationResult:
        self.requests.append(request)
        if self.hold is not None:
            assert self.hold.wait(60), "the test never released the engine"
        pieces = []
        for i in range(self.words):
            if should_stop():
                break
            pieces.append(f"w{i} ")
            on_text(pieces[-1])
        return GenerationResult("".join(pieces), list(range(len(pieces))), False, time.monotonic())


def _ring(n: int = 6) -> RingBuffer:
    ring = RingBuffer(16)
    for i in range(n):
        ring.push(np.full((8, 8, 3), i, np.uint8))
    return ring


@pytest.fixture
def settings() -> Settings:
    return parse_settings(SETTINGS)


@contextmanager
def running(settings: Settings, engine: Engine) -> Iterator[AskService]:
    """A service on a started inference loop with two hand-filled streams."""
    service = AskService(settings, EventHub())
    loop = InferenceLoop(engine, {"cam": StreamFeed(_ring(), 2.0), "still": StreamFeed(_ring(), 2.0)}, queue_size=4)
    service.attach(loop)
    loop.start()
    try:
        yield service
    finally:
        loop.stop()


@pytest.fixture
def engine() -> WordEngine:
    return WordEngine()


@pytest.fixture
def service(settings: Settings, engine: WordEngine) -> Iterator[AskService]:
    with running(settings, engine) as service:
        yield service


def until_final(session: Session, qid: str, timeout: float = 60) -> list[Event]:
    """The session's events for ``qid`` up to and including its final one (others are dropped)."""
    got: list[Event] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no final event for {qid} after {timeout} s: {got}"
        for event in session.events.wait(left):
            if getattr(event, "id", None) != qid:
                continue
            got.append(event)
            if isinstance(event, Answered | Failed) and event.final:
                return got


def test_an_ask_streams_tokens_and_ends_with_one_answer(service: AskService, engine: WordEngine) -> None:
    """Accepted, tokens that make the text, one final Answered; defaults come from the config."""
    session = service.session("test", max_open=2)
    session.ask(AskRequest("q1", "cam", "What is moving?"))
    events = until_final(session, "q1")
    assert isinstance(events[0], Accepted) and events[0].position == 0
    tokens = [e.text for e in events if isinstance(e, Token)]
    answer = events[-1]
    assert isinstance(answer, Answered) and answer.final and answer.stream == "cam"
    assert "".join(tokens) == answer.answer.text == "w0 w1 w2 "
    assert session.events.wait(0.3) == []  # nothing after the final event
    request = engine.requests[0]
    assert (request.max_new_tokens, len(request.frames), request.mode) == (5, 4, "video")  # model defaults
    session.ask(AskRequest("q2", "still", "?", frames=2, max_new_tokens=1))
    until_final(session, "q2")
    assert (engine.requests[1].mode, engine.requests[1].max_new_tokens) == ("image", 1)  # the stream's mode


def test_open_ids_limits_and_throttle_are_refused_with_one_final_event(settings: Settings) -> None:
    """duplicate_id and busy (open questions) come before the adapter's throttle; each is one final Failed."""
    hold = threading.Event()
    with running(settings, WordEngine(hold=hold)) as service:
        throttled: list[str] = []

        def throttle() -> tuple[str, str] | None:
            throttled.append("asked")
            return ("rate_limited", "slow down") if len(throttled) > 2 else None

        session = service.session("limited", max_open=2, throttle=throttle)
        session.ask(AskRequest("a", "cam", "?"))
        session.ask(AskRequest("a", "cam", "?"))  # still open
        session.watch(WatchRequest("w", "cam", "?", every_s=60))
        session.ask(AskRequest("c", "cam", "?"))  # two open already: busy, the throttle is not asked
        refusals = [e for e in session.events.wait(1) if isinstance(e, Failed)]
        assert [(e.id, e.code, e.final) for e in refusals] == [("a", "duplicate_id", True), ("c", "busy", True)]
        assert len(throttled) == 2
        hold.set()
        until_final(session, "a")
        session.cancel("w")
        until_final(session, "w")
        session.ask(AskRequest("d", "cam", "?"))  # room again, but the throttle says no
        assert [(e.id, e.code) for e in until_final(session, "d")] == [("d", "rate_limited")]


def test_nothing_is_served_before_a_loop_is_attached_or_after_shutdown(settings: Settings) -> None:
    """Without a loop, and once shutting down, an ask ends with shutting_down."""
    service = AskService(settings, EventHub())
    session = service.session("early", max_open=2)
    session.ask(AskRequest("q", "cam", "?"))
    assert [(e.code, e.final) for e in until_final(session, "q")] == [("shutting_down", True)]  # type: ignore[union-attr]
    with running(settings, WordEngine()) as service:
        service.shutdown()
        session = service.session("late", max_open=2)
        session.ask(AskRequest("q", "cam", "?"))
        assert [e.code for e in until_final(session, "q")] == ["shutting_down"]  # type: ignore[union-attr]


def test_a_watch_alerts_and_ends_once_and_closing_a_session_cancels_it(service: AskService) -> None:
    """Rounds are non-final answers with alerts when they match; closing the session ends its watch."""
    session = service.session("watcher", max_open=2)
    session.watch(WatchRequest("w", "cam", "?", every_s=1, alert_contains="W1"))
    seen: list[Event] = []
    deadline = time.monotonic() + 60
    while not any(isinstance(e, Alerted) for e in seen):
        assert time.monotonic() < deadline, seen
        seen += session.events.wait(1)
    answered = next(e for e in seen if isinstance(e, Answered))
    alert = next(e for e in seen if isinstance(e, Alerted))
    assert answered.watch and not answered.final and alert.matched == "W1" and alert.text == answered.answer.text
    other = service.session("other", max_open=1)
    assert not other.cancel("w")  # not its watch
    session.close()
    assert session.events.drain() == []  # closed: nothing more arrives


def test_a_session_that_never_reads_delays_no_other_session(settings: Settings) -> None:
    """A session whose queue overflows is cut off; another session's ask is answered all the same."""
    with running(settings, WordEngine(words=200)) as service:
        stuck = service.session("stuck", max_open=1, maxsize=20)
        stuck.ask(AskRequest("long", "cam", "Go on."))
        reader = service.session("reader", max_open=1)
        reader.ask(AskRequest("q", "cam", "?"))
        events = until_final(reader, "q")
        assert isinstance(events[-1], Answered) and events[-1].answer.text.count("w") == 200
        assert stuck.events.cut_off


@pytest.mark.slow
def test_an_in_process_adapter_gets_exactly_one_answer_from_the_real_model(tiny_model: Path) -> None:
    """A Runtime with the tiny model and the demo source, asked through a session: one real answer."""
    from streamer.server.runtime import Runtime

    runtime = Runtime(parse_settings({**SETTINGS, "model": {"id": str(tiny_model), "frames": 2}}))
    runtime.start_capture()
    try:
        runtime.start_inference()
        deadline = time.monotonic() + 60
        while len(runtime.captures["cam"].ring) < 2:
            assert time.monotonic() < deadline, "the demo source gave no frames"
            time.sleep(0.05)
        session = runtime.service.session("in-process", max_open=1)
        session.ask(AskRequest("q", "cam", "What is moving?", max_new_tokens=6))
        events = until_final(session, "q")
        finals = [e for e in events if isinstance(e, Answered | Failed)]
        assert len(finals) == 1 and isinstance(finals[0], Answered), events
        assert "".join(e.text for e in events if isinstance(e, Token)) == finals[0].answer.text
        assert finals[0].answer.frames.count == 2
    finally:
        runtime.stop()
