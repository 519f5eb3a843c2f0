"""The vocabulary of asking: questions, standing watches, answers, and how a question ends.

Plain data and protocols, shared by the inference loop, the service layer and the adapters.
Importable without torch or a model: it knows capture's frames and ring buffers, nothing else.

Question and Watch are what an asker builds; they are frozen, and nobody writes to them
afterwards: the loop keeps its own record of each (:mod:`streamer.inference.policy`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

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
    #: Sampled frames from one frame of the window to the next (1: consecutive frames).
    stride: int = 1

    @classmethod
    def of(cls, frames: list[Frame], stride: int = 1) -> FrameSpan:
        return cls(frames[0].seq, frames[-1].seq, len(frames), frames[0].ts, frames[-1].ts, stride)

    def as_dict(self) -> dict[str, Any]:
        """The protocol's ``frames`` object (``stride`` only when above 1)."""
        span = asdict(self)
        if self.stride == 1:
            del span["stride"]
        return span

    def seqs(self) -> range:
        """The ``seq`` of every frame used, oldest first."""
        return range(self.first_seq, self.last_seq + 1, self.stride)


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


@dataclass(frozen=True)
class Sampling:
    """One question's decoding settings over the configured ones, as OpenAI's API means them:
    ``temperature`` 0 decodes greedily, above 0 samples at that temperature; ``top_p`` samples
    from that much probability mass; ``seed`` seeds the draws. Unset ones stay as configured
    (the model's generation config and ``model.*``)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, float | bool]:
        """The overrides these settings make to transformers' ``generate`` (no seed: it is not one)."""
        if self.temperature == 0:
            return {"do_sample": False}
        kwargs: dict[str, float | bool] = {}
        if self.temperature is not None:
            kwargs.update(do_sample=True, temperature=self.temperature)
        if self.top_p is not None:
            kwargs.update(do_sample=True, top_p=self.top_p)
        return kwargs


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
    #: Decoding settings of this question over the configured ones (None: the configured ones).
    sampling: Sampling | None = None


#: Words that count as a yes at the start of an answer (see :class:`AlertIf`).
YES_WORDS = frozenset({"yes", "yeah", "yep", "yup", "affirmative"})
_FIRST_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class AlertIf:
    """When a watch round's answer is an alert: exactly one of ``contains`` (case-insensitive
    substring), ``regex`` (Python syntax, searched anywhere in the answer) or ``yes`` (the
    answer's first word, ignoring case and any leading punctuation, quotes or markdown, is one
    of :data:`YES_WORDS`: "Yes.", "**Yes**, a truck", "yeah" match; "No", "Yesterday", "I
    think yes" do not)."""

    contains: str | None = None
    regex: str | None = None
    yes: bool = False

    def __post_init__(self) -> None:
        if sum((self.contains is not None, self.regex is not None, self.yes)) != 1:
            raise ValueError("give exactly one of contains, regex or yes")
        if self.regex is not None:
            re.compile(self.regex)

    def matches(self, text: str) -> str | None:
        """What matched in ``text`` (the ``contains`` text, the regex's match, ``yes``), or None."""
        if self.contains is not None:
            return self.contains if self.contains and self.contains.casefold() in text.casefold() else None
        if self.regex is not None:
            found = re.search(self.regex, text)
            return found.group(0) if found else None
        first = _FIRST_WORD.search(text)
        if first is not None and text[: first.start()].strip(" \t\n*_\"'`>#-([") == "":
            return "yes" if first.group(0).casefold() in YES_WORDS else None
        return None


#: Asked on the loop's thread when a watch round falls due: None to run it, or why it is
#: skipped (``"no_motion"``, ``"inactive"``). Must return at once.
RoundGate = Callable[[], "str | None"]


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
    #: A richer condition than ``alert_contains`` (which it replaces when set).
    alert_if: AlertIf | None = None
    #: Consulted before each round; a round it refuses is skipped and costs no model time.
    gate: RoundGate | None = None

    def matches(self, text: str) -> str | None:
        """What in ``text`` makes this round an alert (see :class:`AlertIf`), else None."""
        condition = self.alert_if or (AlertIf(contains=self.alert_contains) if self.alert_contains else None)
        return condition.matches(text) if condition is not None else None


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
    return _newest_size(ring.latest(n))


def _newest_size(frames: list[Frame]) -> list[Frame]:
    if not frames:
        return frames
    size = frames[-1].rgb.shape
    start = len(frames)
    while start > 0 and frames[start - 1].rgb.shape == size:
        start -= 1
    return frames[start:]


def strided_windows(ring: RingBuffer, n: int, stride: int, count: int) -> list[list[Frame]]:
    """Up to ``count`` windows of (up to) ``n`` frames ``stride`` sampled frames apart, newest
    first, each one pair of grid frames older than the last. The frames lie on a fixed grid
    (``seq`` a multiple of ``stride``) and every window ends on the second frame of a grid
    pair, so windows of one stride share their frame pairs as the stream moves on (the vision
    work of a pair is done once), at the price of a newest frame up to ``2 * stride - 1``
    sampled frames older than the stream's. Frames of the newest size only."""
    if stride < 1 or n < 1 or count < 1:
        raise ValueError("n, stride and count must be at least 1")
    newest = ring.newest_seq
    if newest is None:
        return []
    # From the newest frame back to the start of the oldest window (with room to align).
    frames = _newest_size(ring.latest(stride * (n + 2 * count + 1)))
    grid = [f for f in frames if f.seq % stride == 0]
    while grid and (grid[-1].seq // stride) % 2 == 0:  # end on the second frame of a pair
        grid.pop()
    windows = []
    for k in range(count):
        end = len(grid) - 2 * k
        if end <= 0 or (windows and end < n):
            break
        windows.append(grid[max(0, end - n) : end])
    return windows
