"""The inference loop's decisions as plain code: no threads, no model, no clock.

:class:`Policy` holds what waits, what runs and which watches stand, and decides who is
admitted, who is superseded, which watch rounds fall due, which questions make the next
batch, and what a cancel, a stop or a removed stream ends. A method that needs the time
takes it as ``now``; none blocks, calls a sink, or touches a model. The loop's thread
(:mod:`streamer.inference.loop`) calls it under one lock and does the rest: waiting, the
engine, the sinks.

Guarantees:

- people go first: a waiting ask always runs before a waiting watch round; within each
  class the stream served least recently goes next, and within a stream the owner served
  least recently, so a flood on one stream or from one client starves nobody;
- a new ask from an owner about a stream supersedes that owner's asks about that stream
  that have not started yet;
- a watch has at most one round waiting or running: a round that falls due meanwhile is
  skipped and counted, and rounds keep to the ``every_s`` grid; a round its ``gate``
  refuses is skipped too (the gate counts why);
- a batch is the next question plus, up to ``max_batch``, the waiting questions about the
  same window (stream, mode and frame count), in the order they would have been served;
  while it decodes, questions that arrive about its window join it (:meth:`Policy.take_joiners`)
  up to ``max_batch`` running at once;
- a question takes the newest window unless a window at most ``window_lag_s`` older is
  better prepared: prefilled, or with fewer pairs still to encode, or a prefilled window
  that was the newest when it arrived (:func:`choose_window`);
- :meth:`Policy.finish` says yes once per job, so each question ends exactly once.

Imports nothing heavier than :mod:`streamer.inference.questions`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from streamer.capture.ring import Frame
from streamer.inference.questions import Answer, ErrorCode, FrameSpan, Question, StreamFeed, Watch

log = logging.getLogger(__name__)

#: Why something was refused: an error code and a message for the asker.
Refusal = tuple[ErrorCode, str]
SHUTTING_DOWN: Refusal = ("shutting_down", "the server is shutting down")


class Queued(Protocol):
    """What :class:`FairQueue` orders by."""

    @property
    def stream(self) -> str: ...
    @property
    def owner(self) -> Hashable: ...
    @property
    def watch(self) -> object | None: ...


Q = TypeVar("Q", bound=Queued)


class FairQueue(Generic[Q]):
    """Waiting questions in the order the loop serves them (see the module's guarantees)."""

    def __init__(self) -> None:
        self.items: list[Q] = []
        self._served_stream: dict[str, int] = {}
        self._served_owner: dict[tuple[str, Hashable], int] = {}
        self._tick = 0

    def __len__(self) -> int:
        return len(self.items)

    def asks(self) -> int:
        return sum(1 for q in self.items if q.watch is None)

    def append(self, q: Q) -> None:
        self.items.append(q)

    def remove(self, q: Q) -> None:
        self.items.remove(q)

    def _rank(self, q: Q) -> tuple[bool, int, int]:
        return (
            q.watch is not None,  # people first
            self._served_stream.get(q.stream, -1),  # then the stream served least recently
            self._served_owner.get((q.stream, q.owner), -1),  # then the owner served least recently
        )  # min() keeps arrival order among equals

    def peek(self) -> Q:
        """The question :meth:`pop` would return now."""
        return min(self.items, key=self._rank)

    def pop(self) -> Q:
        q = self.peek()
        self.items.remove(q)
        self._tick += 1
        self._served_stream[q.stream] = self._tick
        self._served_owner[(q.stream, q.owner)] = self._tick
        return q

    def position(self, q: Q) -> int:
        """How many waiting questions go before ``q`` (which is waiting) if nothing else arrives."""
        trial: FairQueue[Q] = FairQueue()
        trial.items = list(self.items)
        trial._served_stream = dict(self._served_stream)
        trial._served_owner = dict(self._served_owner)
        trial._tick = self._tick
        ahead = 0
        while trial.pop() is not q:
            ahead += 1
        return ahead


@dataclass(eq=False)
class Standing:
    """A watch the loop keeps asking: its place on the grid and its one open round."""

    watch: Watch
    next_due: float
    rounds: int = 0
    skipped: int = 0
    #: Rounds its gate skipped (no motion, outside its hours).
    gated: int = 0
    pending: Job | None = None
    ended: bool = False


class WatchProgress(Protocol):
    """How a watch is going, for whoever started it (read only)."""

    @property
    def rounds(self) -> int: ...
    @property
    def skipped(self) -> int: ...


@dataclass(eq=False)
class Job:
    """A question on its way through the loop: what the loop knows of it that its asker does not."""

    question: Question
    #: Newest frame of the stream when the question arrived (the answer uses this or newer).
    received_seq: int | None
    #: The watch this is a round of.
    standing: Standing | None = None
    #: Set while it runs when it must stop early (cancel, shutdown).
    stop_code: ErrorCode | None = None
    finished: bool = False

    @property
    def id(self) -> str:
        return self.question.id

    @property
    def stream(self) -> str:
        return self.question.stream

    @property
    def owner(self) -> Hashable:
        return self.question.owner

    @property
    def watch(self) -> Watch | None:
        return self.question.watch

    @property
    def silenced(self) -> bool:
        """A round of a watch that has ended says nothing more: the watch's end was the last word."""
        return self.standing is not None and self.standing.ended


T = TypeVar("T")


@dataclass
class Admission(Generic[T]):
    """What the policy made of a new question or watch."""

    item: T
    #: Questions that go before it (0: it runs next); meaningless when refused.
    position: int = 0
    refusal: Refusal | None = None
    #: The owner's earlier asks it replaces, to be ended with ``superseded``.
    superseded: list[Job] = field(default_factory=list)


@dataclass
class Ended:
    """What a cancel, a stop or a removed stream ends."""

    #: Waiting questions, taken out of the queue: to be ended.
    queued: list[Job] = field(default_factory=list)
    #: Watches, taken off the list: to be ended.
    watches: list[Standing] = field(default_factory=list)
    #: Running questions, told to stop (``stop_code``): they end when their generation returns.
    running: list[Job] = field(default_factory=list)


class Policy:
    """The loop's state and every decision about it. Not thread-safe: the loop holds a lock
    around each call. ``streams`` is the loop's live view of its streams."""

    def __init__(self, streams: Mapping[str, StreamFeed], *, queue_size: int, max_batch: int = 1) -> None:
        self.streams = streams
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.queue: FairQueue[Job] = FairQueue()
        self.watches: list[Standing] = []
        self.running: list[Job] = []
        self.stopping = False
        #: How questions ended, by outcome ("answer" or an error code); watch rounds included.
        self.outcomes: Counter[str] = Counter()
        #: Asks handed to :meth:`admit` (each ends in exactly one outcome).
        self.submitted = 0
        #: Watch rounds skipped because the watch's last round was still open.
        self.skipped_rounds = 0

    # -- admission -----------------------------------------------------------------------

    def admit(self, q: Question) -> Admission[Job]:
        """Queue a person's ask, superseding the owner's waiting asks about the same stream,
        unless it must be refused (unknown stream, no frames yet, stopping, queue full)."""
        self.submitted += 1
        feed = self.streams.get(q.stream)
        job = Job(q, received_seq=feed.ring.newest_seq if feed is not None else None)
        if feed is None:
            return Admission(job, refusal=("unknown_stream", f"no stream named {q.stream!r}"))
        if job.received_seq is None:
            return Admission(job, refusal=("stream_unavailable", f"stream {q.stream!r} has no frames yet"))
        if self.stopping:
            return Admission(job, refusal=SHUTTING_DOWN)
        superseded = [p for p in self.queue.items if p.watch is None and p.owner == q.owner and p.stream == q.stream]
        for p in superseded:
            self.queue.remove(p)
        if self.queue.asks() >= self.queue_size:
            busy = f"the question queue is full ({self.queue_size}); try again shortly"
            return Admission(job, refusal=("busy", busy), superseded=superseded)
        self.queue.append(job)
        position = self.queue.position(job) + (1 if self.running else 0)
        return Admission(job, position=position, superseded=superseded)

    def admit_watch(self, w: Watch, now: float) -> Admission[Standing]:
        """Start a standing question, its first round due ``now``, unless it must be refused."""
        standing = Standing(w, next_due=now)
        if w.stream not in self.streams:
            return Admission(standing, refusal=("unknown_stream", f"no stream named {w.stream!r}"))
        if self.stopping:
            return Admission(standing, refusal=SHUTTING_DOWN)
        self.watches.append(standing)
        return Admission(standing, position=len(self.queue) + (1 if self.running else 0))

    # -- serving -------------------------------------------------------------------------

    def enqueue_due_rounds(self, now: float) -> float | None:
        """Queue the watch rounds that are due; the time until the next one is (None: no watches)."""
        wait: float | None = None
        for st in self.watches:
            if now >= st.next_due:
                # Every round that fell due since the last look: one runs, the rest are
                # skipped (the loop was busy, or the last round is still waiting or running).
                due = int((now - st.next_due) // st.watch.every_s) + 1
                st.next_due += due * st.watch.every_s  # stay on the grid
                skipped = due if st.pending is not None else due - 1
                st.skipped += skipped
                self.skipped_rounds += skipped
                if st.pending is None and self._gated(st):
                    st.gated += 1
                elif st.pending is None:
                    st.rounds += 1
                    st.pending = self._round_of(st, now)
                    self.queue.append(st.pending)
            until = st.next_due - now
            wait = until if wait is None else min(wait, until)
        return wait

    @staticmethod
    def _gated(st: Standing) -> bool:
        """The watch's gate skips this round (a gate that fails lets it run)."""
        if st.watch.gate is None:
            return False
        try:
            return st.watch.gate() is not None
        except Exception:
            log.exception("gate of watch %s failed; the round runs", st.watch.id)
            return False

    def _round_of(self, st: Standing, now: float) -> Job:
        w = st.watch
        question = Question(
            id=w.id,
            stream=w.stream,
            text=w.text,
            owner=w.owner,
            sink=w.sink,
            frames=w.frames,
            max_new_tokens=w.max_new_tokens,
            mode=w.mode,
            received_at=now,
            watch=w,
        )
        return Job(question, received_seq=self.streams[w.stream].ring.newest_seq, standing=st)

    def wants_more(self) -> bool:
        """A batch about to start could still grow: questions wait, but fewer than ``max_batch``."""
        return not self.stopping and 0 < len(self.queue) < self.max_batch

    def take_batch(self) -> list[Job]:
        """The next question and, up to ``max_batch``, those waiting for the same window; they
        are running from now until :meth:`batch_done`."""
        first = self.queue.pop()
        batch = [first]
        for job in list(self.queue.items):
            if len(batch) >= self.max_batch:
                break
            q = job.question
            if q.stream == first.stream and q.mode == first.question.mode and q.frames == first.question.frames:
                self.queue.remove(job)
                batch.append(job)
        self.running = list(batch)  # joiners extend what runs, not the batch handed out
        return batch

    def take_joiners(self, first: Job, room: int, fresh_enough: Callable[[Job], bool]) -> list[Job]:
        """Waiting questions that may join the running batch led by ``first`` (same stream,
        mode and frame count, and ``fresh_enough``: its window is one the question may be
        answered from), at most ``room`` and at most ``max_batch`` running at once; they are
        running from now until :meth:`batch_done`. Only the question next in line joins (then
        the next): a batch that others keep joining must not hold back a question about
        another stream that the fair order serves first."""
        if self.stopping:
            return []
        running = sum(1 for job in self.running if not job.finished)
        room = min(room, self.max_batch - running)
        joined = []
        while len(joined) < room and self.queue:
            job = self.queue.peek()
            q = job.question
            same = q.stream == first.stream and q.mode == first.question.mode and q.frames == first.question.frames
            if not (same and fresh_enough(job)):
                break
            joined.append(self.queue.pop())
        self.running.extend(joined)
        return joined

    def batch_done(self) -> None:
        self.running = []

    def finish(self, job: Job, outcome: str) -> bool:
        """Record how ``job`` ended; False if it had ended already (nothing more may be said)."""
        if job.finished:
            return False
        job.finished = True
        self.outcomes[outcome] += 1
        if job.standing is not None and job.standing.pending is job:
            job.standing.pending = None
        return True

    def end_watch(self, st: Standing) -> bool:
        """Mark a watch ended; False if it had ended already."""
        if st.ended:
            return False
        st.ended = True
        return True

    # -- endings -------------------------------------------------------------------------

    def cancel(self, match: Callable[[Hashable, str], bool]) -> Ended:
        """Take out the asks and watches whose (owner, id) ``match``es, and tell the running
        ones (a matched ask, or a round of a matched watch) to stop with ``cancelled``."""
        ended = Ended()
        ended.queued = [j for j in self.queue.items if j.watch is None and match(j.owner, j.id)]
        for job in ended.queued:
            self.queue.remove(job)
        ended.watches = [st for st in self.watches if match(st.watch.owner, st.watch.id)]
        for st in ended.watches:
            self.watches.remove(st)
            if st.pending is not None and st.pending in self.queue.items:
                self.queue.remove(st.pending)
        for job in self.running:
            hit = match(job.owner, job.id) if job.standing is None else job.standing in ended.watches
            if hit and job.stop_code is None:
                job.stop_code = "cancelled"
                ended.running.append(job)
        return ended

    def stop(self) -> Ended:
        """Refuse everything new; hand back what waits and every watch, to be ended."""
        self.stopping = True
        ended = Ended(queued=list(self.queue.items), watches=self.watches)
        self.queue.items.clear()
        self.watches = []
        return ended

    def stop_running(self) -> None:
        """Tell the running questions to stop with ``shutting_down`` (unless told otherwise already)."""
        for job in self.running:
            if job.stop_code is None:
                job.stop_code = "shutting_down"

    def drop_stream(self, name: str) -> Ended:
        """The stream is gone: hand back its waiting asks and its watches, to be ended."""
        ended = Ended()
        ended.watches = [st for st in self.watches if st.watch.stream == name]
        self.watches = [st for st in self.watches if st.watch.stream != name]
        for job in [j for j in self.queue.items if j.stream == name]:
            self.queue.remove(job)
            if job.standing is None:
                ended.queued.append(job)
        return ended

    # -- reading -------------------------------------------------------------------------

    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return not self.queue and not self.running


@dataclass(frozen=True)
class WindowOption:
    """A window a question could take: how far its newest frame lags the stream's newest,
    and how much of its work is done (``missing_pairs`` None: the engine cannot tell).
    ``since_asked``: its newest frame is no older than the newest frame when each of the
    batch's questions arrived."""

    lag_s: float
    missing_pairs: int | None
    prefix_ready: bool
    since_asked: bool = False


def choose_window(options: list[WindowOption], window_lag_s: float) -> int:
    """Which of ``options`` (newest first) a question takes: the newest whose prefix is
    prefilled, else the newest of those with the fewest pairs still to encode; only windows
    lagging the newest by at most ``window_lag_s`` count, and prefilled windows that were
    the newest when the questions arrived (a burst whose late asks come after its first
    batch ended stays on that batch's window). A prepared window answers in a fraction of
    a prefill, so on a slow machine it is fresher at the first token than the newest frames
    would be."""
    known = [i for i, o in enumerate(options) if o.missing_pairs is not None]
    allowed = [i for i in known if options[i].lag_s <= window_lag_s]
    ready = next((i for i in known if options[i].prefix_ready and (i in allowed or options[i].since_asked)), None)
    if ready is not None:
        return ready
    if not allowed:
        return 0
    return min(allowed, key=lambda i: (options[i].missing_pairs, i))


class StrideGovernor:
    """How many sampled frames apart a window's frames are (the stride), so that the loop
    keeps pace with the streams (``model.frame_stride: auto``).

    A window of ``frames`` frames at stride ``k`` gains one new frame pair every ``2k``
    sampled frames, and each new pair costs the loop its encoding and the prefill of the
    window it makes (whether warm-up or a question does them). The stride is the smallest
    ``k`` at which that work for every stream takes at most ``warm_share`` of the time, so
    that the rest is left for questions, up to ``max_stride``. Both costs are measured while
    running: a pair's encoding by warm-up (:meth:`encoded`), a window's prefill by the
    engine's prefill steps (:meth:`prefilled`, sampled once per encoded pair); before the
    prefill is measured the encoding alone counts.

    Cached pairs belong to one stride's grid, so every change costs a window's vision work,
    and a shared host's speed swings by a fifth for tens of seconds. So the costs are slow
    averages (the mean of the first ten, then each new one weighs a tenth), the stride rises
    only when the work takes a fifth more than its share and falls only when the smaller
    stride fits with a third to spare. When even ``max_stride`` is short it says so once:
    questions then wait for pairs and prefills. Plain code: measurements come in as
    arguments."""

    #: Weight of a new measurement once ``1 / SLOW`` have come (before: their mean).
    SLOW = 0.1
    #: The work may exceed its share by this factor before the stride rises.
    RISE = 1.2
    #: A smaller stride is taken when its work fits in its share with this factor to spare.
    FALL = 1.33

    def __init__(self, max_stride: int, *, warm_share: float = 0.7) -> None:
        if max_stride < 1:
            raise ValueError("max_stride must be at least 1")
        self.max_stride = max_stride
        self.warm_share = warm_share
        self.stride = 1
        #: Seconds to encode one frame pair (slow average), None before the first.
        self.encode_s: float | None = None
        #: Seconds a window's whole prefill takes (slow average of the engine's estimates),
        #: None before the first.
        self.prefill_s: float | None = None
        self._encodes = self._prefills = 0  # measurements in each average
        self._prefill_now: float | None = None  # the engine's latest estimate, not yet counted
        self._short = False

    def _slow(self, old: float | None, count: int, sample: float) -> float:
        """The average ``old`` of ``count - 1`` measurements with ``sample`` added."""
        return sample if old is None else old + max(self.SLOW, 1 / count) * (sample - old)

    def encoded(self, seconds: float) -> None:
        """Warm-up encoded one frame pair in ``seconds``; the prefill's latest estimate then
        counts once."""
        self._encodes += 1
        self.encode_s = self._slow(self.encode_s, self._encodes, seconds)
        if self._prefill_now is not None:
            self._prefills += 1
            self.prefill_s = self._slow(self.prefill_s, self._prefills, self._prefill_now)

    def prefilled(self, seconds: float) -> None:
        """A window's whole prefill takes ``seconds`` at the speed the engine measures now
        (the first estimate counts at once, later ones with the next encoded pair)."""
        if self.prefill_s is None:
            self._prefills, self.prefill_s = 1, seconds
        else:
            self._prefill_now = seconds

    def update(self, sample_fps: list[float]) -> int:
        """The stride to use now for streams sampled at ``sample_fps``."""
        if self.encode_s is None or not sample_fps:
            return self.stride
        pair_s = self.encode_s + (self.prefill_s or 0.0)  # the loop's work for one new pair
        pairs_per_s_at_1 = sum(sample_fps) / 2

        def needed(margin: float) -> int:
            return math.ceil(pair_s * pairs_per_s_at_1 * margin / self.warm_share)

        rise, fall = needed(1 / self.RISE) > self.stride, needed(self.FALL) < self.stride
        if rise or fall:
            stride = max(1, min(self.max_stride, needed(1.0) if rise else needed(self.FALL)))
            if stride != self.stride:
                self.stride = stride
                log.info(
                    "frame stride %d: a new frame pair costs %.2f s (encoding %.2f s, prefill %s)",
                    stride,
                    pair_s,
                    self.encode_s,
                    "not measured yet" if self.prefill_s is None else f"{self.prefill_s:.2f} s",
                )
        if needed(1 / self.RISE) > self.max_stride and not self._short:
            self._short = True
            log.warning(
                "frame stride %d (max_frame_stride) is short: each new frame pair costs %.2f s, more than "
                "%.0f%% of its %.1f s; questions will wait for pairs and prefills (raise max_frame_stride "
                "and buffer_frames, or lower sample_fps)",
                self.max_stride,
                pair_s,
                self.warm_share * 100,
                self.max_stride / pairs_per_s_at_1,
            )
        return self.stride


def answer_of(
    job: Job,
    text: str,
    frames: list[Frame],
    started: float,
    first_token_at: float | None,
    done: float,
    token_ids: tuple[int, ...] = (),
    readiness: WindowOption | None = None,
    wall_minus_monotonic: float | None = None,
    stride: int = 1,
) -> Answer:
    """The answer to ``job`` from its generated text (and ``token_ids``); times are
    ``time.monotonic()`` values; ``wall_minus_monotonic`` turns them into capture times
    (Unix seconds), for the capture-to-first-token figure."""
    received = job.question.received_at
    capture = None
    if first_token_at is not None and wall_minus_monotonic is not None:
        capture = round((first_token_at + wall_minus_monotonic - frames[-1].ts) * 1000, 1)
    return Answer(
        text=text,
        frames=FrameSpan.of(frames, stride),
        queued_ms=round((started - received) * 1000, 1),
        first_token_ms=None if first_token_at is None else round((first_token_at - received) * 1000, 1),
        total_ms=round((done - received) * 1000, 1),
        matched=job.watch.matches(text) if job.watch is not None else None,
        token_ids=token_ids,
        capture_to_first_token_ms=capture,
        pairs_missing=None if readiness is None else readiness.missing_pairs,
        prefix_ready=None if readiness is None or readiness.missing_pairs is None else readiness.prefix_ready,
    )
