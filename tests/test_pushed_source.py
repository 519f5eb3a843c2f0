"""Pushed sources: frames handed in go through the same sampling, ring buffer and status
machinery as pulled ones, and a running server can add and remove them. No model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamer.capture import PushedSource, StreamStatus, stream_for
from streamer.config import SourceConfig, parse_settings
from streamer.server.runtime import Runtime
from streamer.service import Answered, AskRequest, Failed, StreamChanged, WatchRequest
from tests.test_service import WordEngine, until_final


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)


class Statuses:
    """A status listener that records what it hears, from any thread."""

    def __init__(self) -> None:
        self.heard: list[StreamStatus] = []
        self.lock = threading.Lock()

    def __call__(self, status: StreamStatus) -> None:
        with self.lock:
            self.heard.append(status)

    def states(self) -> list[str]:
        with self.lock:
            return [s.status for s in self.heard]


def test_publish_samples_by_media_time_and_scales_a_copy() -> None:
    """One frame per 1/sample_fps of pts is kept, scaled to max_side; the caller's array is left alone."""
    source = PushedSource(SourceConfig(name="phone", url="push", sample_fps=2, max_side=320))
    frames = [np.full((480, 640, 3), i, np.uint8) for i in range(12)]
    kept = [source.publish(rgb, pts=i / 6) for i, rgb in enumerate(frames)]  # 6 fps in, 2 fps kept
    assert [i for i, frame in enumerate(kept) if frame is not None] == [0, 3, 6, 9]
    newest = source.ring.newest()
    assert newest is not None and newest.rgb.shape == (240, 320, 3) and newest.rgb[0, 0, 0] == 9
    assert newest.pts == 1.5 and frames[9].flags.writeable
    status = source.status()
    assert (status.frames_in, status.frames_sampled, status.frames_dropped) == (12, 4, 8)
    assert (status.width, status.height, status.last_seq) == (320, 240, 3)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        source.publish(np.zeros((4, 4), np.uint8))


def test_a_pushed_stream_is_live_while_frames_come_and_down_after_a_stall() -> None:
    """connecting -> live on the first frame -> down (said by the watchdog) -> live again."""
    heard = Statuses()
    source = stream_for(SourceConfig(name="phone", url="push", stall_timeout_s=0.3), on_status=heard)
    assert isinstance(source, PushedSource) and source.status().status == "connecting"
    source.start()
    try:
        source.publish(np.zeros((64, 64, 3), np.uint8))
        assert heard.states() == ["live"]
        _wait_for(lambda: heard.states()[-1] == "down", "the stall report")
        assert heard.heard[-1].error is not None and heard.heard[-1].error.startswith("stalled")
        assert source.status().status == "down"
        source.publish(np.zeros((64, 64, 3), np.uint8))
        assert heard.states() == ["live", "down", "live"]
    finally:
        source.stop()
    assert not source.is_alive()
    assert source.publish(np.zeros((64, 64, 3), np.uint8)) is None  # stopped: takes no more frames


def test_a_runtime_adds_and_removes_pushed_streams_while_serving() -> None:
    """A pushed stream added at run time is asked about like any other; removing it ends its watch."""
    settings = parse_settings(
        {"sources": [{"name": "cam", "url": "push"}], "model": {"id": "tiny-random", "frames": 2}}
    )
    runtime = Runtime(settings, engine=WordEngine())
    runtime.start_capture()
    runtime.start_inference()
    try:
        session = runtime.service.session("test", max_open=4)
        phone = runtime.add_source(SourceConfig(name="phone", url="push", sample_fps=10))
        with pytest.raises(ValueError, match="already"):
            runtime.add_source(SourceConfig(name="phone", url="push"))
        statuses = runtime.events.subscribe(kinds=(StreamChanged,))
        for i in range(3):
            phone.publish(np.full((32, 32, 3), i, np.uint8), pts=i)  # type: ignore[attr-defined]
        assert [s.name for s in runtime.statuses()] == ["cam", "phone"]
        session.ask(AskRequest("q", "phone", "?"))
        answered = until_final(session, "q")[-1]
        assert isinstance(answered, Answered) and answered.answer.frames.last_seq == 2
        session.watch(WatchRequest("w", "phone", "?", every_s=3600))
        runtime.remove_source("phone")
        end = until_final(session, "w")[-1]
        assert isinstance(end, Failed) and (end.code, end.final) == ("unknown_stream", True)
        heard = [(e.status.name, e.status.status, e.status.error) for e in statuses.drain()]  # type: ignore[union-attr]
        assert heard == [("phone", "live", None), ("phone", "down", "removed")]
        assert [s.name for s in runtime.statuses()] == ["cam"]
        session.ask(AskRequest("gone", "phone", "?"))
        assert [e.code for e in until_final(session, "gone")] == ["unknown_stream"]  # type: ignore[union-attr]
    finally:
        runtime.stop()
