"""The inference loop: one thread that drives the :class:`~streamer.inference.policy.Policy`
and the engine.

Guarantees (the order of service is the policy's, see :mod:`streamer.inference.policy`):

- every submitted :class:`Question` ends with exactly one call of its sink's ``on_answer``
  or ``on_error`` (after cancel, supersede, shutdown or an exception alike); every
  :class:`Watch` ends with exactly one ``on_watch_end``;
- a question is answered from the newest frames of its stream at the moment its
  inference starts, or (``window_lag_s`` > 0) from a better prepared window whose newest
  frame lags those by at most ``window_lag_s`` (:func:`~streamer.inference.policy.choose_window`),
  or from a window that was the newest when the question arrived and is prefilled already
  (a running batch's, which it joins, or one just answered); never from frames older than
  the newest at its arrival beyond ``window_lag_s``; its answer says which frames it used;
- each answer goes out as soon as its own generation ends, not when its batch's does;
  questions about a running batch's window join it between decode steps;
- the loop never waits on a sink: sinks must return at once (the service hands results on
  through its events hub, whose subscribers each have their own queue).

Sink callbacks run on the inference thread, except ``on_accepted`` and the errors that
``submit``/``cancel``/``stop`` cause, which run on the caller's thread. The policy is only
touched under the loop's lock; the engine and the sinks are called outside it, except
``on_accepted``, which goes out before the worker can pick the question up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import replace

from streamer.capture.ring import Frame
from streamer.inference.engine import Engine, GenerationRequest, GenerationResult, Joiner, Readiness
from streamer.inference.policy import (
    SHUTTING_DOWN,
    Ended,
    Job,
    Policy,
    Standing,
    StrideGovernor,
    WatchProgress,
    WindowOption,
    answer_of,
    choose_window,
)
from streamer.inference.questions import (
    Answer,
    ErrorCode,
    Question,
    Rejected,
    StreamFeed,
    Watch,
    strided_windows,
    window_of,
)

log = logging.getLogger(__name__)

#: How often an idle loop with warming enabled looks for new frames, seconds.
WARM_POLL_S = 0.2
#: How many windows older than the newest a batch looks back on for one that was the newest
#: when its questions arrived and is already prefilled.
MAX_ASKED_WINDOWS = 8
#: How long warming pauses after it failed, seconds.
WARM_PAUSE_S = 30.0
_STOP_REASONS = {"cancelled": "cancelled by the client", "shutting_down": SHUTTING_DOWN[1]}


class Reports:
    """Tells sinks how questions and watches ended, each exactly once (the policy keeps count)."""

    def __init__(self, lock: threading.Condition, policy: Policy) -> None:
        self._lock = lock
        self._policy = policy

    def end(self, ended: Ended, code: ErrorCode, message: str) -> None:
        """End what the policy took out (watches first: their waiting rounds then say nothing)."""
        for st in ended.watches:
            self.watch_ended(st, code, message)
        for job in ended.queued:
            self.failed(job, code, message)

    def failed(self, job: Job, code: ErrorCode, message: str) -> None:
        with self._lock:
            first = self._policy.finish(job, code)
        if first and not job.silenced:
            q = job.question
            try:
                q.sink.on_error(q, code, message)
            except Exception:
                log.exception("sink failed on error for question %s", q.id)

    def answered(self, job: Job, answer: Answer) -> None:
        with self._lock:
            first = self._policy.finish(job, "answer")
        if first and not job.silenced:
            job.question.sink.on_answer(job.question, answer)

    def watch_ended(self, st: Standing, code: ErrorCode, message: str) -> None:
        with self._lock:
            first = self._policy.end_watch(st)
        if first:
            try:
                st.watch.sink.on_watch_end(st.watch, code, message)
            except Exception:
                log.exception("sink failed ending watch %s", st.watch.id)


def window_span(n: int) -> int:
    """Grid frames a ring must hold for a window of ``n`` frames on a stride's grid: the window
    and room to align it to the grid of pairs (a ring holding ``h`` sampled frames allows
    strides up to ``h // window_span(n)``)."""
    return n + 2


class Strides:
    """How many sampled frames apart each window's frames are: 1 and the newest frames (the
    default), a fixed stride, or (``"auto"``) the :class:`StrideGovernor`'s. With any stride
    but the default, windows lie on that stride's grid of frame pairs
    (:func:`strided_windows`). Used on the inference thread only."""

    def __init__(self, frame_stride: int | str = 1, max_frame_stride: int = 16) -> None:
        self.governor = StrideGovernor(max_frame_stride) if frame_stride == "auto" else None
        self.fixed = 1 if self.governor is not None else int(frame_stride)
        self.aligned = self.governor is not None or self.fixed > 1

    def now(self, streams: Mapping[str, StreamFeed]) -> int:
        if self.governor is None:
            return self.fixed
        return self.governor.update([feed.sample_fps for feed in streams.values()])

    def windows(self, feed: StreamFeed, n: int, stride: int, count: int) -> tuple[list[list[Frame]], int]:
        """Up to ``count`` candidate windows of ``n`` frames, newest first, and their stride:
        lowered to what the buffer holds, then halved until the frames held make a whole
        window (a young stream, or a small ``buffer_frames``, gets ``n`` frames closer
        together, not fewer frames)."""
        if not self.aligned:
            span = window_of(feed.ring, n + count - 1)
            ends = range(len(span), min(n, len(span)) - 1, -1)
            return [span[max(0, end - n) : end] for end in ends], 1
        # At most what the buffer holds; a young stream halves that until its frames make a
        # window: every change of stride costs a window's vision work, so a few steps rather
        # than one per frame.
        stride = max(1, min(stride, feed.ring.capacity // window_span(n)))
        held = len(window_of(feed.ring, feed.ring.capacity))
        while stride > 1 and held < stride * window_span(n):
            stride //= 2
        return strided_windows(feed.ring, n, stride, count), stride

    def encoded(self, seconds: float) -> None:
        if self.governor is not None:
            self.governor.encoded(seconds)

    def measured(self, ready: Readiness) -> None:
        """What the engine says of a window: its whole prefill's time, for the governor."""
        if self.governor is not None and ready.prefill_s is not None:
            self.governor.prefilled(ready.prefill_s)


class Warmer:
    """Work ahead of questions while the loop is idle: the engine prepares a window of
    ``frames`` frames of each stream, one short piece per step. It keeps at one window until
    that is ready or lags the newest frame by more than ``window_lag_s`` (a live window
    slides on faster than a CPU prefills; questions may take a prepared window that recent),
    then moves to the newest window that shares the most pairs with it. With windows on a
    grid of frame pairs (a stride), once every window is ready it begins the prefill of the
    window the stream's next pair will make, as far as the frames it has allow
    (:meth:`Engine.warm_ahead`): when that pair comes, only its encoding and the rest of the
    prefill stand between its capture and a prepared window. It times the pieces that encode
    a frame pair and passes on the engine's estimate of a window's whole prefill, for the
    stride (:class:`Strides`). A failure is logged and pauses it for a while; questions are
    not affected."""

    def __init__(self, engine: Engine, frames: int, window_lag_s: float = 0.0, strides: Strides | None = None) -> None:
        self.engine = engine
        self.frames = frames
        self.window_lag_s = window_lag_s
        self.strides = strides or Strides()
        self._paused_until = 0.0
        self._targets: dict[str, tuple[list[Frame], int]] = {}

    def step(self, streams: Mapping[str, StreamFeed]) -> bool:
        """One piece of work; True if the engine had some."""
        if time.monotonic() < self._paused_until:
            return False
        try:
            stride = self.strides.now(streams)
            newest: list[tuple[str, list[Frame], float]] = []  # per stream: its newest window, its rate
            for name, feed in list(streams.items()):
                windows, k = self._windows(name, feed, stride)
                if windows:
                    newest.append((name, windows[-1], feed.sample_fps / k))
                for frames in windows:
                    rgb, ids, fps = [f.rgb for f in frames], _ids(frames), feed.sample_fps / k
                    before = self.engine.readiness(name, rgb, ids, fps) if self.strides.aligned else None
                    if before is not None:
                        self.strides.measured(before)
                    if (
                        before is not None
                        and frames is windows[-1]
                        and _too_late(before, frames[-1].ts + 2 * k / feed.sample_fps)
                        and self.engine.warm_ahead(name, rgb, ids, fps)
                    ):
                        return True
                    started = time.monotonic()
                    if self.engine.warm(name, rgb, ids, fps):
                        if before is not None and before.missing_pairs > 0:  # it encoded a pair
                            self.strides.encoded(time.monotonic() - started)
                        self._targets[name] = (frames, k)
                        return True
            if self.strides.aligned:
                # Every window is ready: begin the next one's prefill, on the grid the one
                # that adds the stream's next pair, up to where that pair's tokens start.
                for name, frames, fps in newest:
                    if self.engine.warm_ahead(name, [f.rgb for f in frames], _ids(frames), fps):
                        return True
        except Exception:
            log.exception("preparing windows ahead of questions failed; pausing it for %.0f s", WARM_PAUSE_S)
            self._paused_until = time.monotonic() + WARM_PAUSE_S
        return False

    def _windows(self, name: str, feed: StreamFeed, stride: int) -> tuple[list[list[Frame]], int]:
        """The windows to prepare, in order, and their stride: the current target while
        recent enough, then the newest window whose pairs are the target's (on the stride's
        grid, or ending on a frame of the target's parity)."""
        if self.strides.aligned:
            candidates, k = self.strides.windows(feed, self.frames, stride, 1)
            if not candidates or len(candidates[0]) < self.frames:
                return [], k
            newest, (target, target_k) = candidates[0], self._targets.get(name, ([], 0))
            if target_k != k or self.window_lag_s <= 0 or newest[-1].ts - target[-1].ts > self.window_lag_s:
                return [newest], k
            return ([target, newest] if newest[-1].seq != target[-1].seq else [target]), k
        span = window_of(feed.ring, self.frames + 1)
        if len(span) < self.frames:
            return [], 1
        newest = span[-self.frames :]
        target = self._targets.get(name, ([], 1))[0]
        if not target or self.window_lag_s <= 0 or newest[-1].ts - target[-1].ts > self.window_lag_s:
            return [newest], 1
        if len(span) > self.frames and (newest[-1].seq - target[-1].seq) % 2:
            newest = span[: self.frames]
        return ([target, newest] if newest[-1].seq != target[-1].seq else [target]), 1


def _too_late(ready: Readiness, next_pair_at: float) -> bool:
    """A window's prefill would end after the stream's next pair comes (``next_pair_at``, a
    capture time): questions then take the next window, so the time is better spent on that
    window's prefill ahead (:meth:`Engine.warm_ahead`); its pairs must be encoded first."""
    left = ready.prefill_left_s
    if ready.prefix_ready or ready.missing_pairs or left is None:
        return False
    return time.time() + left > next_pair_at


class BatchAnswerer:
    """Answers one batch on the inference thread: picks the window its questions are about
    (:meth:`window`), asks the engine, lets questions about that window join between decode
    steps, and reports each question's answer as its own generation ends. Shares the loop's
    lock, policy, reports and streams (the loop adds and removes streams in that one dict)."""

    def __init__(
        self,
        engine: Engine,
        streams: dict[str, StreamFeed],
        lock: threading.Condition,
        policy: Policy,
        reports: Reports,
        window_lag_s: float,
        strides: Strides | None = None,
    ) -> None:
        self.engine = engine
        self.streams = streams
        self.window_lag_s = window_lag_s
        self.strides = strides or Strides()
        self._lock = lock
        self._policy = policy
        self._reports = reports

    def answer(self, batch: list[Job]) -> None:
        """Answer ``batch`` (questions about one window); each of its questions, and each that
        joins it, ends exactly once."""
        started = time.monotonic()
        first = batch[0].question
        feed = self.streams.get(first.stream)
        frames, option, stride = self.window(batch, feed) if feed is not None else ([], None, 1)
        if feed is None or not frames:
            for job in batch:
                self._reports.failed(job, "stream_unavailable", f"stream {job.stream!r} has no frames")
            return
        wall = time.time() - time.monotonic()
        fps = feed.sample_fps / stride

        # A question that joins the running decode finds the window encoded and prefilled.
        on_join = (
            option
            if option is None or option.missing_pairs is None
            else replace(option, missing_pairs=0, prefix_ready=True)
        )

        def finish(job: Job, at: float, ready: WindowOption | None = option) -> Callable[[GenerationResult], None]:
            def on_result(result: GenerationResult) -> None:
                if job.stop_code is not None:
                    self._reports.failed(job, job.stop_code, _STOP_REASONS[job.stop_code])
                    return
                ids = tuple(result.token_ids)
                done = time.monotonic()
                answer = answer_of(job, result.text, frames, at, result.first_token_at, done, ids, ready, wall, stride)
                self._reports.answered(job, answer)

            return on_result

        def joiners(room: int) -> list[Joiner]:
            # How far the window lags the newest one it could start on now.
            newest, _ = self.strides.windows(feed, len(frames), stride, 1)
            lag = newest[0][-1].ts - frames[-1].ts if newest else None
            recent = lag is not None and lag <= self.window_lag_s

            def fresh_enough(job: Job) -> bool:
                # The window is one it could start on now, or it was the newest when the
                # question came (a burst whose last ask arrived during the first's prefill).
                return recent or (job.received_seq is not None and job.received_seq <= frames[-1].seq)

            with self._lock:
                joined = self._policy.take_joiners(batch[0], room, fresh_enough)
            now = time.monotonic()
            return [
                Joiner(request, _text_to(job), _stop_of(job), finish(job, now, on_join))
                for job, request in zip(joined, _requests(joined, frames, fps), strict=True)
            ]

        results = self.engine.generate_batch(
            _requests(batch, frames, fps),
            [_text_to(job) for job in batch],
            [_stop_of(job) for job in batch],
            on_results=[finish(job, started) for job in batch],
            joiners=joiners,
        )
        for job, result in zip(batch, results, strict=True):  # those an engine did not report (each ends once)
            finish(job, started)(result)

    def window(self, batch: list[Job], feed: StreamFeed) -> tuple[list[Frame], WindowOption | None, int]:
        """The frames ``batch`` is answered from (see :func:`choose_window`), how prepared they
        were, and their stride."""
        first = batch[0].question
        n = 1 if first.mode == "image" else first.frames
        if first.mode == "image":
            return window_of(feed.ring, n), None, 1
        stride = self.strides.now(self.streams)
        # The newest frame when the batch's last question arrived: windows ending on it or
        # later were "now" for every question of the batch.
        asked = max((job.received_seq for job in batch if job.received_seq is not None), default=None)
        newest_seq = feed.ring.newest_seq
        step = stride if self.strides.aligned else 1  # sampled frames from one candidate to the next
        back = int(self.window_lag_s * feed.sample_fps) + 1 if self.window_lag_s > 0 else 0
        if asked is not None and newest_seq is not None:
            back = max(back, min(newest_seq - asked, MAX_ASKED_WINDOWS * step))
        candidates, stride = self.strides.windows(feed, n, stride, 1 + back // step)
        windows, options = [], []
        for window in candidates:
            lag = candidates[0][-1].ts - window[-1].ts
            since_asked = asked is not None and window[-1].seq >= asked
            if windows and lag > self.window_lag_s and not since_asked:
                break
            ids, fps = _ids(window), feed.sample_fps / stride
            ready = self.engine.readiness(first.stream, [f.rgb for f in window], ids, fps)
            windows.append(window)
            options.append(
                WindowOption(lag, None, False)
                if ready is None
                else WindowOption(lag, ready.missing_pairs, ready.prefix_ready, since_asked)
            )
            if ready is None:
                break
        if not windows:
            return [], None, stride
        chosen = choose_window(options, self.window_lag_s)
        return windows[chosen], options[chosen], stride


class InferenceLoop:
    """Owns the inference thread and its control: admits, cancels and stops questions and
    watches, takes batches from the policy and hands each to its :class:`BatchAnswerer`
    (which runs it through the engine and reports each question's progress to its sink), and
    warms windows (:class:`Warmer`) while idle."""

    def __init__(
        self,
        engine: Engine,
        streams: Mapping[str, StreamFeed],
        *,
        queue_size: int,
        max_batch: int = 1,
        batch_window_s: float = 0.0,
        batch_gap_s: float | None = None,
        warm_frames: int = 0,
        window_lag_s: float = 0.0,
        frame_stride: int | str = 1,
        max_frame_stride: int = 16,
    ) -> None:
        """``max_batch``: questions about the same window answered together (people's asks
        and watch rounds alike); a batch that could grow waits up to ``batch_window_s`` for
        questions arriving at nearly the same time, but no longer than ``batch_gap_s`` after
        the last question came (None: the whole window). ``warm_frames``: when idle, let the engine
        prepare the window of that many newest frames of each stream (0: never).
        ``window_lag_s``: how much older than the newest frames a better prepared window a
        question takes may be (0: always the newest frames). ``frame_stride``: sampled frames
        from one frame of a window to the next, or ``"auto"``: as few as keep the loop up
        with the streams' new pairs, at most ``max_frame_stride`` (see :class:`Strides`)."""
        self.engine = engine
        self.streams: dict[str, StreamFeed] = dict(streams)
        self.batch_window_s = batch_window_s
        self.batch_gap_s = batch_window_s if batch_gap_s is None else batch_gap_s
        self._last_arrival = 0.0  # time.monotonic() of the newest question submitted
        self.warm_frames = warm_frames
        self.window_lag_s = window_lag_s
        self._policy = Policy(self.streams, queue_size=queue_size, max_batch=max_batch)
        self._lock = threading.Condition(threading.Lock())
        self._reports = Reports(self._lock, self._policy)
        self._strides = Strides(frame_stride, max_frame_stride)
        self._warmer = Warmer(engine, warm_frames, window_lag_s, self._strides)
        self._answerer = BatchAnswerer(
            engine, self.streams, self._lock, self._policy, self._reports, window_lag_s, self._strides
        )
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    # -- control, from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0, finish_running_within: float = 0.0) -> None:
        """Refuse new questions, end queued ones and watches with ``shutting_down``, let the
        running question finish for up to ``finish_running_within`` seconds, then stop it
        too, and wait (up to ``timeout``) for the thread."""
        with self._lock:
            ended = self._policy.stop()
            self._lock.notify_all()
        self._reports.end(ended, *SHUTTING_DOWN)
        if finish_running_within > 0 and self._thread.is_alive():
            self._thread.join(finish_running_within)
        with self._lock:
            self._policy.stop_running()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, q: Question) -> int:
        """Queue a person's ``q`` and return its position (0 = runs now). Raises :class:`Rejected`."""
        with self._lock:
            admission = self._policy.admit(q)
            self._last_arrival = time.monotonic()
            if admission.refusal is None:
                # Accepted goes out before the worker can pick the question up.
                q.sink.on_accepted(q, admission.position)
                self._lock.notify_all()
        for job in admission.superseded:
            self._reports.failed(job, "superseded", f"superseded by question {q.id!r}")
        if admission.refusal is not None:
            self._reports.failed(admission.item, *admission.refusal)
            raise Rejected(*admission.refusal)
        return admission.position

    def add_watch(self, w: Watch) -> WatchProgress:
        """Start a standing question; its first round is due now. Returns its progress (rounds
        run and skipped). Raises :class:`Rejected` (after ending the watch with the reason)."""
        with self._lock:
            admission = self._policy.admit_watch(w, time.monotonic())
            if admission.refusal is None:
                w.sink.on_watch_accepted(w, admission.position)
                self._lock.notify_all()
        if admission.refusal is not None:
            self._reports.watch_ended(admission.item, *admission.refusal)
            raise Rejected(*admission.refusal)
        return admission.item

    def cancel(self, owner: Hashable, question_id: str) -> bool:
        """Cancel the owner's queued or running question, or end its watch; False if none."""
        return bool(self._cancel_where(lambda owner_, id_: owner_ == owner and id_ == question_id))

    def cancel_owner(self, owner: Hashable) -> int:
        """Cancel everything an owner has open (its connection closed)."""
        return self._cancel_where(lambda owner_, id_: owner_ == owner)

    def add_stream(self, name: str, feed: StreamFeed) -> None:
        """Serve questions about a stream added while running (a pushed source)."""
        with self._lock:
            self.streams[name] = feed

    def remove_stream(self, name: str) -> None:
        """Stop serving a stream: its waiting asks and its watches end with ``unknown_stream``."""
        with self._lock:
            self.streams.pop(name, None)
            ended = self._policy.drop_stream(name)
        self._reports.end(ended, "unknown_stream", f"stream {name!r} was removed")

    # -- reading, from any thread ---------------------------------------------------------

    def depth(self) -> int:
        with self._lock:
            return len(self._policy.queue)

    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        with self._lock:
            return self._policy.idle()

    def skipped_rounds(self) -> int:
        """Watch rounds skipped so far because the watch's last round was still open."""
        with self._lock:
            return self._policy.skipped_rounds

    @property
    def submitted(self) -> int:
        """Questions handed to :meth:`submit` (each ends in exactly one outcome)."""
        with self._lock:
            return self._policy.submitted

    @property
    def outcomes(self) -> dict[str, int]:
        """How questions ended, by outcome ("answer" or an error code); watch rounds included."""
        with self._lock:
            return dict(self._policy.outcomes)

    def _cancel_where(self, match: Callable[[Hashable, str], bool]) -> int:
        with self._lock:
            ended = self._policy.cancel(match)
        self._reports.end(ended, "cancelled", _STOP_REASONS["cancelled"])
        return len(ended.queued) + len(ended.watches) + sum(1 for job in ended.running if job.standing is None)

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            step = self._next_batch()
            if step is None:
                return
            batch, wait = step
            if not batch:
                if not (self.warm_frames and self._warmer.step(self.streams)):
                    with self._lock:
                        if not self._policy.queue and not self._policy.stopping:
                            self._lock.wait(min(wait, WARM_POLL_S) if wait is not None else WARM_POLL_S)
                continue
            try:
                self._answerer.answer(batch)
            except Exception as err:  # the loop outlives any one question
                log.exception("questions %s failed", [job.id for job in batch])
                describe = self.engine.describe_failure(err) or f"inference failed: {type(err).__name__}: {err}"
                for job in batch:
                    self._reports.failed(job, "internal", describe)
            finally:
                with self._lock:
                    self._policy.batch_done()

    def _next_batch(self) -> tuple[list[Job], float | None] | None:
        """Wait for work: a batch to answer, or (with warming on) an empty one when idle, with
        the time until the next watch round is due. None once stopping."""
        policy = self._policy
        with self._lock:
            while True:
                if policy.stopping:
                    return None
                wait = policy.enqueue_due_rounds(time.monotonic())
                if policy.queue or self.warm_frames:
                    break  # work, or idle time to prepare the streams' windows
                self._lock.wait(wait)
            if policy.wants_more():
                # Questions sent "together" arrive a few milliseconds apart: let them in, while
                # they keep coming (a lone question waits one gap, not the whole window).
                deadline = time.monotonic() + self.batch_window_s
                while policy.wants_more():
                    left = min(deadline, self._last_arrival + self.batch_gap_s) - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                if policy.stopping:
                    return None
            return (policy.take_batch() if policy.queue else []), wait


def _ids(frames: list[Frame]) -> tuple[tuple[int, float], ...]:
    return tuple((f.seq, f.ts) for f in frames)


def _requests(batch: list[Job], frames: list[Frame], sample_fps: float) -> list[GenerationRequest]:
    """What the engine is asked: each question of the batch about the same frames."""
    return [
        GenerationRequest(
            frames=[f.rgb for f in frames],
            question=job.question.text,
            max_new_tokens=job.question.max_new_tokens,
            sample_fps=sample_fps,
            mode=job.question.mode,
            stream=job.stream,
            frame_ids=_ids(frames),
            sampling=job.question.sampling,
        )
        for job in batch
    ]


def _text_to(job: Job) -> Callable[[str], None]:
    """Where the engine's text pieces for ``job`` go: its sink, until it must stop."""

    def on_text(piece: str) -> None:
        if job.stop_code is None and not job.silenced:
            job.question.sink.on_text(job.question, piece)

    return on_text


def _stop_of(job: Job) -> Callable[[], bool]:
    return lambda: job.stop_code is not None
