"""The inference loop: one thread, one model, a bounded queue of questions.

Guarantees:

- every submitted :class:`Question` ends with exactly one call of its sink's ``on_answer``
  or ``on_error`` (after cancel, supersede, shutdown or an exception alike);
- a question is answered from the newest frames of its stream at the moment its
  inference starts;
- a new question from the same owner about the same stream supersedes that owner's
  questions that have not started yet;
- the loop never waits on a sink: sinks must return at once (the server hands results to
  its event loop with ``call_soon_threadsafe``).

Sink callbacks run on the inference thread, except ``on_accepted`` and the errors that
``submit``/``cancel`` cause, which run on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from streamer.capture.ring import Frame, RingBuffer
from streamer.inference.engine import Engine, GenerationRequest

log = logging.getLogger(__name__)

ErrorCode = Literal[
    "unknown_stream", "stream_unavailable", "busy", "cancelled", "superseded", "internal", "shutting_down"
]


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


class AnswerSink(Protocol):
    """Where a question's progress goes. Every method must return immediately."""

    def on_accepted(self, question: Question, position: int) -> None: ...
    def on_text(self, question: Question, text: str) -> None: ...
    def on_answer(self, question: Question, answer: Answer) -> None: ...
    def on_error(self, question: Question, code: ErrorCode, message: str) -> None: ...


@dataclass(eq=False)
class Question:
    id: str
    stream: str
    text: str
    owner: Hashable
    sink: AnswerSink
    frames: int
    max_new_tokens: int
    received_at: float = field(default_factory=time.monotonic)
    #: Newest frame of the stream when the question arrived (the answer uses this or newer).
    received_seq: int | None = None
    _stop_code: ErrorCode | None = None
    _finished: bool = False


@dataclass(frozen=True)
class StreamFeed:
    """What the loop needs of a stream: its frames and the rate they were sampled at."""

    ring: RingBuffer
    sample_fps: float


class Rejected(Exception):
    """``submit`` refused a question; it has already been ended with ``code``."""

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


class InferenceLoop:
    def __init__(self, engine: Engine, streams: Mapping[str, StreamFeed], *, queue_size: int) -> None:
        self.engine = engine
        self.streams = dict(streams)
        self.queue_size = queue_size
        self._queue: deque[Question] = deque()
        self._running: Question | None = None
        self._lock = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    # -- control, from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new questions, end queued ones with ``shutting_down``, stop the running one."""
        with self._lock:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            if self._running is not None and self._running._stop_code is None:
                self._running._stop_code = "shutting_down"
            self._lock.notify_all()
        for q in queued:
            self._fail(q, "shutting_down", "the server is shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, q: Question) -> int:
        """Queue ``q`` and return its position (0 = runs now). Raises :class:`Rejected`."""
        feed = self.streams.get(q.stream)
        if feed is None:
            self._reject(q, "unknown_stream", f"no stream named {q.stream!r}")
        assert feed is not None
        q.received_seq = feed.ring.newest_seq
        if q.received_seq is None:
            self._reject(q, "stream_unavailable", f"stream {q.stream!r} has no frames yet")
        superseded: list[Question] = []
        position = 0
        with self._lock:
            if self._stopping:
                reject: tuple[ErrorCode, str] | None = ("shutting_down", "the server is shutting down")
            else:
                superseded = [p for p in self._queue if p.owner == q.owner and p.stream == q.stream]
                for p in superseded:
                    self._queue.remove(p)
                if len(self._queue) >= self.queue_size:
                    reject = ("busy", f"the question queue is full ({self.queue_size}); try again shortly")
                else:
                    reject = None
                    position = len(self._queue) + (1 if self._running is not None else 0)
                    # Accepted goes out before the worker can pick the question up.
                    q.sink.on_accepted(q, position)
                    self._queue.append(q)
                    self._lock.notify_all()
        for p in superseded:
            self._fail(p, "superseded", f"superseded by question {q.id!r}")
        if reject is not None:
            self._reject(q, *reject)
        return position

    def cancel(self, owner: Hashable, question_id: str) -> bool:
        """Cancel the owner's queued or running question; False if there was none."""
        return bool(self._cancel_where(lambda q: q.owner == owner and q.id == question_id))

    def cancel_owner(self, owner: Hashable) -> int:
        """Cancel everything an owner has open (its connection closed)."""
        return self._cancel_where(lambda q: q.owner == owner)

    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- internals -----------------------------------------------------------------------

    def _cancel_where(self, match) -> int:
        with self._lock:
            queued = [q for q in self._queue if match(q)]
            for q in queued:
                self._queue.remove(q)
            running = self._running
            hit_running = running is not None and match(running) and running._stop_code is None
            if hit_running:
                running._stop_code = "cancelled"
        for q in queued:
            self._fail(q, "cancelled", "cancelled by the client")
        return len(queued) + int(hit_running)

    def _reject(self, q: Question, code: ErrorCode, message: str) -> None:
        self._fail(q, code, message)
        raise Rejected(code, message)

    def _finish_once(self, q: Question) -> bool:
        with self._lock:
            if q._finished:
                return False
            q._finished = True
            return True

    def _fail(self, q: Question, code: ErrorCode, message: str) -> None:
        if self._finish_once(q):
            try:
                q.sink.on_error(q, code, message)
            except Exception:
                log.exception("sink failed on error for question %s", q.id)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                q = self._queue.popleft()
                self._running = q
            try:
                self._answer(q)
            except Exception as err:  # the loop outlives any one question
                log.exception("question %s failed", q.id)
                self._fail(q, "internal", _describe_failure(err))
            finally:
                with self._lock:
                    self._running = None

    def _answer(self, q: Question) -> None:
        started = time.monotonic()
        feed = self.streams[q.stream]
        frames = window_of(feed.ring, q.frames)
        if not frames:
            self._fail(q, "stream_unavailable", f"stream {q.stream!r} has no frames")
            return
        request = GenerationRequest(
            frames=[f.rgb for f in frames],
            question=q.text,
            max_new_tokens=q.max_new_tokens,
            sample_fps=feed.sample_fps,
        )

        def on_text(piece: str) -> None:
            if q._stop_code is None:
                q.sink.on_text(q, piece)

        result = self.engine.generate(request, on_text, lambda: q._stop_code is not None)
        code = q._stop_code
        if code is not None:
            self._fail(q, code, "cancelled by the client" if code == "cancelled" else "the server is shutting down")
            return
        done = time.monotonic()
        answer = Answer(
            text=result.text,
            frames=FrameSpan.of(frames),
            queued_ms=round((started - q.received_at) * 1000, 1),
            first_token_ms=None
            if result.first_token_at is None
            else round((result.first_token_at - q.received_at) * 1000, 1),
            total_ms=round((done - q.received_at) * 1000, 1),
        )
        if self._finish_once(q):
            q.sink.on_answer(q, answer)


def _describe_failure(err: Exception) -> str:
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "inference ran out of GPU memory; try fewer frames or a smaller max_pixels"
    return f"inference failed: {type(err).__name__}: {err}"
