"""The inference loop: one thread, one model, a bounded queue of questions, standing watches.

Guarantees:

- every submitted :class:`Question` ends with exactly one call of its sink's ``on_answer``
  or ``on_error`` (after cancel, supersede, shutdown or an exception alike); every
  :class:`Watch` ends with exactly one ``on_watch_end``;
- a question is answered from the newest frames of its stream at the moment its
  inference starts;
- a new question from the same owner about the same stream supersedes that owner's
  questions that have not started yet;
- people go first: a waiting ask always runs before a waiting watch round; within each
  class the stream served least recently goes next, and within a stream the owner served
  least recently, so a flood on one stream or from one client starves nobody;
- a watch has at most one round waiting or running: a round that falls due meanwhile is
  skipped and counted;
- the loop never waits on a sink: sinks must return at once (the server hands results to
  its event loop with ``call_soon_threadsafe``).

Sink callbacks run on the inference thread, except ``on_accepted`` and the errors that
``submit``/``cancel``/``stop`` cause, which run on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from streamer.capture.ring import Frame, RingBuffer
from streamer.inference.engine import Engine, GenerationRequest, is_out_of_memory

log = logging.getLogger(__name__)

#: How often an idle loop with warming enabled looks for new frames, seconds.
WARM_POLL_S = 0.2
#: How long warming pauses after it failed, seconds.
WARM_PAUSE_S = 30.0

ErrorCode = Literal[
    "unknown_stream", "stream_unavailable", "busy", "cancelled", "superseded", "internal", "shutting_down"
]
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


@dataclass(eq=False)
class Question:
    id: str
    stream: str
    text: str
    owner: Hashable
    sink: AnswerSink
    frames: int
    max_new_tokens: int
    mode: Mode = "video"
    received_at: float = field(default_factory=time.monotonic)
    #: Newest frame of the stream when the question arrived (the answer uses this or newer).
    received_seq: int | None = None
    #: The standing question this is a round of, or None for a person's ask.
    watch: Watch | None = None
    _stop_code: ErrorCode | None = None
    _finished: bool = False


@dataclass(eq=False)
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
    next_due: float = field(default_factory=time.monotonic)
    rounds: int = 0
    skipped: int = 0
    _pending: Question | None = None
    _ended: bool = False

    def matches(self, text: str) -> str | None:
        if self.alert_contains and self.alert_contains.casefold() in text.casefold():
            return self.alert_contains
        return None


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


class FairQueue:
    """Waiting questions in the order the loop serves them (see the module's guarantees).

    Not thread-safe: the loop guards it with its lock.
    """

    def __init__(self) -> None:
        self.items: list[Question] = []
        self._served_stream: dict[str, int] = {}
        self._served_owner: dict[tuple[str, Hashable], int] = {}
        self._tick = 0

    def __len__(self) -> int:
        return len(self.items)

    def asks(self) -> int:
        return sum(1 for q in self.items if q.watch is None)

    def append(self, q: Question) -> None:
        self.items.append(q)

    def remove(self, q: Question) -> None:
        self.items.remove(q)

    def _rank(self, q: Question) -> tuple:
        return (
            q.watch is not None,  # people first
            self._served_stream.get(q.stream, -1),  # then the stream served least recently
            self._served_owner.get((q.stream, q.owner), -1),  # then the owner served least recently
        )  # min() keeps arrival order among equals

    def pop(self) -> Question:
        q = min(self.items, key=self._rank)
        self.items.remove(q)
        self._tick += 1
        self._served_stream[q.stream] = self._tick
        self._served_owner[(q.stream, q.owner)] = self._tick
        return q

    def position(self, q: Question) -> int:
        """How many waiting questions go before ``q`` (which is waiting) if nothing else arrives."""
        trial = FairQueue()
        trial.items = list(self.items)
        trial._served_stream = dict(self._served_stream)
        trial._served_owner = dict(self._served_owner)
        trial._tick = self._tick
        ahead = 0
        while trial.pop() is not q:
            ahead += 1
        return ahead


class InferenceLoop:
    def __init__(
        self,
        engine: Engine,
        streams: Mapping[str, StreamFeed],
        *,
        queue_size: int,
        max_batch: int = 1,
        batch_window_s: float = 0.0,
        warm_frames: int = 0,
    ) -> None:
        """``max_batch``: questions about the same window answered together (people's asks
        and watch rounds alike); a batch that could grow waits up to ``batch_window_s`` for
        questions arriving at nearly the same time. ``warm_frames``: when idle, let the engine
        prepare the window of that many newest frames of each stream (0: never)."""
        self.engine = engine
        self.streams = dict(streams)
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.warm_frames = warm_frames
        self._warm_paused_until = 0.0
        self._queue = FairQueue()
        self._watches: list[Watch] = []
        self._running: list[Question] = []
        self._lock = threading.Condition(threading.Lock())
        self._stopping = False
        #: How questions ended, by outcome ("answer" or an error code); watch rounds included.
        self.outcomes: Counter[str] = Counter()
        #: Questions handed to :meth:`submit` (each ends in exactly one outcome).
        self.submitted = 0
        self._skipped_rounds = 0
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    # -- control, from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0, finish_running_within: float = 0.0) -> None:
        """Refuse new questions, end queued ones and watches with ``shutting_down``, let the
        running question finish for up to ``finish_running_within`` seconds, then stop it
        too, and wait (up to ``timeout``) for the thread."""
        with self._lock:
            self._stopping = True
            queued = list(self._queue.items)
            self._queue.items.clear()
            watches, self._watches = self._watches, []
            self._lock.notify_all()
        for w in watches:
            self._end_watch(w, "shutting_down", "the server is shutting down")
        for q in queued:
            self._fail(q, "shutting_down", "the server is shutting down")
        if finish_running_within > 0 and self._thread.is_alive():
            self._thread.join(finish_running_within)
        with self._lock:
            for q in self._running:
                if q._stop_code is None:
                    q._stop_code = "shutting_down"
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, q: Question) -> int:
        """Queue a person's ``q`` and return its position (0 = runs now). Raises :class:`Rejected`."""
        with self._lock:
            self.submitted += 1
        feed = self._feed_for(q.stream, lambda code, msg: self._reject(q, code, msg))
        q.received_seq = feed.ring.newest_seq
        if q.received_seq is None:
            self._reject(q, "stream_unavailable", f"stream {q.stream!r} has no frames yet")
        superseded: list[Question] = []
        reject: tuple[ErrorCode, str] | None = None
        position = 0
        with self._lock:
            if self._stopping:
                reject = ("shutting_down", "the server is shutting down")
            else:
                superseded = [
                    p for p in self._queue.items if p.watch is None and p.owner == q.owner and p.stream == q.stream
                ]
                for p in superseded:
                    self._queue.remove(p)
                if self._queue.asks() >= self.queue_size:
                    reject = ("busy", f"the question queue is full ({self.queue_size}); try again shortly")
                else:
                    self._queue.append(q)
                    position = self._queue.position(q) + (1 if self._running else 0)
                    # Accepted goes out before the worker can pick the question up.
                    q.sink.on_accepted(q, position)
                    self._lock.notify_all()
        for p in superseded:
            self._fail(p, "superseded", f"superseded by question {q.id!r}")
        if reject is not None:
            self._reject(q, *reject)
        return position

    def add_watch(self, w: Watch) -> None:
        """Start a standing question; its first round is due now. Raises :class:`Rejected`
        (after ending the watch with the reason)."""

        def refuse(code: ErrorCode, message: str) -> None:
            self._end_watch(w, code, message)
            raise Rejected(code, message)

        self._feed_for(w.stream, refuse)
        with self._lock:
            if self._stopping:
                refuse("shutting_down", "the server is shutting down")
            w.next_due = time.monotonic()
            self._watches.append(w)
            w.sink.on_watch_accepted(w, len(self._queue) + (1 if self._running else 0))
            self._lock.notify_all()

    def cancel(self, owner: Hashable, question_id: str) -> bool:
        """Cancel the owner's queued or running question, or end its watch; False if none."""
        return bool(self._cancel_where(lambda owner_, id_: owner_ == owner and id_ == question_id))

    def cancel_owner(self, owner: Hashable) -> int:
        """Cancel everything an owner has open (its connection closed)."""
        return self._cancel_where(lambda owner_, id_: owner_ == owner)

    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        with self._lock:
            return not self._queue and not self._running

    def skipped_rounds(self) -> int:
        """Watch rounds skipped so far because the watch's last round was still open."""
        with self._lock:
            return self._skipped_rounds

    # -- internals -----------------------------------------------------------------------

    def _feed_for(self, stream: str, refuse: Callable[[ErrorCode, str], None]) -> StreamFeed:
        feed = self.streams.get(stream)
        if feed is None:
            refuse("unknown_stream", f"no stream named {stream!r}")
        assert feed is not None
        return feed

    def _cancel_where(self, match: Callable[[Hashable, str], bool]) -> int:
        with self._lock:
            queued = [q for q in self._queue.items if q.watch is None and match(q.owner, q.id)]
            for q in queued:
                self._queue.remove(q)
            watches = [w for w in self._watches if match(w.owner, w.id)]
            for w in watches:
                self._watches.remove(w)
                if w._pending is not None and w._pending in self._queue.items:
                    self._queue.remove(w._pending)
            hit_running = [
                q
                for q in self._running
                if q._stop_code is None
                and ((q.watch is None and match(q.owner, q.id)) or (q.watch is not None and q.watch in watches))
            ]
            for q in hit_running:
                q._stop_code = "cancelled"
        for q in queued:
            self._fail(q, "cancelled", "cancelled by the client")
        for w in watches:
            self._end_watch(w, "cancelled", "cancelled by the client")
        return len(queued) + len(watches) + sum(1 for q in hit_running if q.watch is None)

    def _reject(self, q: Question, code: ErrorCode, message: str) -> None:
        self._fail(q, code, message)
        raise Rejected(code, message)

    def _finish_once(self, q: Question, outcome: str) -> bool:
        with self._lock:
            if q._finished:
                return False
            q._finished = True
            self.outcomes[outcome] += 1
            if q.watch is not None and q.watch._pending is q:
                q.watch._pending = None
            return True

    def _fail(self, q: Question, code: ErrorCode, message: str) -> None:
        if self._finish_once(q, code) and not _silenced(q):
            try:
                q.sink.on_error(q, code, message)
            except Exception:
                log.exception("sink failed on error for question %s", q.id)

    def _end_watch(self, w: Watch, code: ErrorCode, message: str) -> None:
        with self._lock:
            if w._ended:
                return
            w._ended = True
        try:
            w.sink.on_watch_end(w, code, message)
        except Exception:
            log.exception("sink failed ending watch %s", w.id)

    def _enqueue_due_rounds(self, now: float) -> float | None:
        """Queue the rounds that are due (lock held); the time until the next one is due."""
        wait: float | None = None
        for w in self._watches:
            if now >= w.next_due:
                # Every round that fell due since the last look: one runs, the rest are
                # skipped (the loop was busy, or the last round is still waiting or running).
                due = int((now - w.next_due) // w.every_s) + 1
                w.next_due += due * w.every_s  # stay on the grid
                skipped = due if w._pending is not None else due - 1
                w.skipped += skipped
                self._skipped_rounds += skipped
                if w._pending is None:
                    w.rounds += 1
                    w._pending = Question(
                        id=w.id,
                        stream=w.stream,
                        text=w.text,
                        owner=w.owner,
                        sink=w.sink,
                        frames=w.frames,
                        max_new_tokens=w.max_new_tokens,
                        mode=w.mode,
                        received_at=now,
                        received_seq=self.streams[w.stream].ring.newest_seq,
                        watch=w,
                    )
                    self._queue.append(w._pending)
            until = w.next_due - now
            wait = until if wait is None else min(wait, until)
        return wait

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    wait = self._enqueue_due_rounds(time.monotonic())
                    if self._queue:
                        break
                    if self.warm_frames:
                        break  # idle: prepare the streams' windows instead of waiting
                    self._lock.wait(wait)
                if self._queue and self.max_batch > 1:
                    # Questions sent "together" arrive a few milliseconds apart: let them in.
                    deadline = time.monotonic() + self.batch_window_s
                    while len(self._queue) < self.max_batch and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._lock.wait(left)
                    if self._stopping:
                        return
                batch = self._take_batch() if self._queue else []
                self._running = batch
            if not batch:
                if not self._warm():
                    with self._lock:
                        if not self._queue and not self._stopping:
                            self._lock.wait(min(wait, WARM_POLL_S) if wait is not None else WARM_POLL_S)
                continue
            try:
                self._answer(batch)
            except Exception as err:  # the loop outlives any one question
                log.exception("questions %s failed", [q.id for q in batch])
                for q in batch:
                    self._fail(q, "internal", _describe_failure(err))
            finally:
                with self._lock:
                    self._running = []

    def _take_batch(self) -> list[Question]:
        """The next question and, up to ``max_batch``, those waiting for the same window
        (lock held)."""
        first = self._queue.pop()
        batch = [first]
        for q in list(self._queue.items):
            if len(batch) >= self.max_batch:
                break
            if q.stream == first.stream and q.mode == first.mode and q.frames == first.frames:
                self._queue.remove(q)
                batch.append(q)
        return batch

    def _warm(self) -> bool:
        """One piece of work ahead of questions; True if the engine had some. A failure here
        is logged and warming pauses for a while; questions are not affected."""
        if time.monotonic() < self._warm_paused_until:
            return False
        try:
            for name, feed in self.streams.items():
                frames = window_of(feed.ring, self.warm_frames)
                rgb, ids = [f.rgb for f in frames], [(f.seq, f.ts) for f in frames]
                if frames and self.engine.warm(name, rgb, ids, feed.sample_fps):
                    return True
        except Exception:
            log.exception("preparing windows ahead of questions failed; pausing it for %.0f s", WARM_PAUSE_S)
            self._warm_paused_until = time.monotonic() + WARM_PAUSE_S
        return False

    def _answer(self, batch: list[Question]) -> None:
        started = time.monotonic()
        first = batch[0]
        feed = self.streams[first.stream]
        frames = window_of(feed.ring, 1 if first.mode == "image" else first.frames)
        if not frames:
            for q in batch:
                self._fail(q, "stream_unavailable", f"stream {q.stream!r} has no frames")
            return
        requests = [
            GenerationRequest(
                frames=[f.rgb for f in frames],
                question=q.text,
                max_new_tokens=q.max_new_tokens,
                sample_fps=feed.sample_fps,
                mode=q.mode,
                stream=q.stream,
                frame_ids=tuple((f.seq, f.ts) for f in frames),
            )
            for q in batch
        ]

        def text_sink(q: Question) -> Callable[[str], None]:
            def on_text(piece: str) -> None:
                if q._stop_code is None and not _silenced(q):
                    q.sink.on_text(q, piece)

            return on_text

        def stop_check(q: Question) -> Callable[[], bool]:
            return lambda: q._stop_code is not None

        results = self.engine.generate_batch(requests, [text_sink(q) for q in batch], [stop_check(q) for q in batch])
        done = time.monotonic()
        for q, result in zip(batch, results, strict=True):
            code = q._stop_code
            if code is not None:
                reason = "cancelled by the client" if code == "cancelled" else "the server is shutting down"
                self._fail(q, code, reason)
                continue
            first_at = result.first_token_at
            answer = Answer(
                text=result.text,
                frames=FrameSpan.of(frames),
                queued_ms=round((started - q.received_at) * 1000, 1),
                first_token_ms=None if first_at is None else round((first_at - q.received_at) * 1000, 1),
                total_ms=round((done - q.received_at) * 1000, 1),
                matched=q.watch.matches(result.text) if q.watch is not None else None,
                token_ids=tuple(result.token_ids),
            )
            if self._finish_once(q, "answer") and not _silenced(q):
                q.sink.on_answer(q, answer)


def _silenced(q: Question) -> bool:
    """A round of a watch that has ended says nothing more: the watch's end was the last word."""
    return q.watch is not None and q.watch._ended


def _describe_failure(err: Exception) -> str:
    import torch

    if is_out_of_memory(err):
        where = "GPU memory" if isinstance(err, torch.OutOfMemoryError) else "memory"
        return f"inference ran out of {where}; try fewer frames or a smaller max_pixels"
    return f"inference failed: {type(err).__name__}: {err}"
