"""The vocabulary of asking: questions, standing watches, answers, and how a question ends.

Plain data and protocols, shared by the inference loop, the service layer and the adapters.
Importable without torch or a model: it knows capture's frames and ring buffers, nothing else.

Question and Watch are what an asker builds; they are frozen, and nobody writes to them
afterwards: the loop keeps its own record of each (:mod:`streamer.inference.policy`).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from streamer.capture.ring import Frame, RingBuffer

#: How the inference loop ends a question that gets no answer.
ErrorCode = Literal[
    "unknown_stream", "stream_unavailable", "busy", "cancelled", "superseded", "internal", "shutting_down"
]
#: ``video``: the newest frames as one video; ``image``: the newest frame alone.
Mode = Literal["video", "image"]


@dataclass(frozen=True)
class FrameSpan:
    """Which frames an answer was based on."""

    first_seq: int
    last_seq: int
    count: int
    first_ts: float
    last_ts: float

    @classmethod
    def of(cls, frames: list[Frame]) -> FrameSpan:
        return cls(frames[0].seq, frames[-1].seq, len(frames), frames[0].ts, frames[-1].ts)


@dataclass(frozen=True)
class Answer:
    text: str
    frames: FrameSpan
    queued_ms: float
    first_token_ms: float | None
    total_ms: float
    #: For a watch round: the ``alert_contains`` text when the answer contains it.
    matched: str | None = None
    #: The generated token ids (the end token included when the answer ended with one).
    token_ids: tuple[int, ...] = ()
    #: From the capture of the newest frame used to the first token, ms (freshness and speed).
    capture_to_first_token_ms: float | None = None
    #: How prepared the window was when the question started: frame pairs not yet encoded,
    #: and whether its prefix was prefilled (None: the engine prepares nothing ahead).
    pairs_missing: int | None = None
    prefix_ready: bool | None = None


class AnswerSink(Protocol):
    """Where a question's progress goes. Every method must return immediately."""

    def on_accepted(self, question: Question, position: int) -> None: ...
    def on_text(self, question: Question, text: str) -> None: ...
    def on_answer(self, question: Question, answer: Answer) -> None: ...
    def on_error(self, question: Question, code: ErrorCode, message: str) -> None: ...


class WatchSink(AnswerSink, Protocol):
    """An :class:`AnswerSink` for a watch's rounds (``question.watch`` is set), plus its end."""

    def on_watch_accepted(self, watch: Watch, position: int) -> None: ...
    def on_watch_end(self, watch: Watch, code: ErrorCode, message: str) -> None: ...


@dataclass(frozen=True, eq=False)
class Question:
    """One question about the newest frames of ``stream``; ``owner`` is whoever may cancel it."""

    id: str
    stream: str
    text: str
    owner: Hashable
    sink: AnswerSink
    frames: int
    max_new_tokens: int
    mode: Mode = "video"
    received_at: float = field(default_factory=time.monotonic)
    #: The standing question this is a round of, or None for a person's ask.
    watch: Watch | None = None


@dataclass(frozen=True, eq=False)
class Watch:
    """A standing question, asked again every ``every_s`` seconds on fresh frames."""

    id: str
    stream: str
    text: str
    owner: Hashable
    sink: WatchSink
    every_s: float
    frames: int
    max_new_tokens: int
    mode: Mode = "video"
    alert_contains: str | None = None

    def matches(self, text: str) -> str | None:
        """The ``alert_contains`` text when ``text`` contains it (case-insensitive), else None."""
        if self.alert_contains and self.alert_contains.casefold() in text.casefold():
            return self.alert_contains
        return None


@dataclass(frozen=True)
class StreamFeed:
    """What the loop needs of a stream: its frames and the rate they were sampled at."""

    ring: RingBuffer
    sample_fps: float


class Rejected(Exception):
    """A question or watch was refused; it has already been ended with ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def window_of(ring: RingBuffer, n: int) -> list[Frame]:
    """The newest ``n`` frames that share the newest frame's size (a clip has one size)."""
    frames = ring.latest(n)
    if not frames:
        return frames
    size = frames[-1].rgb.shape
    start = len(frames)
    while start > 0 and frames[start - 1].rgb.shape == size:
        start -= 1
    return frames[start:]
