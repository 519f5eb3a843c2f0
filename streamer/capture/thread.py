"""The capture thread: one per source, keeping that source's ring buffer fresh.

It reads decoded frames, keeps one every ``1 / sample_fps`` seconds of *presentation time*
(not every Nth frame, so a variable frame rate still samples evenly), converts only the
kept frames to RGB, and pushes them into the ring buffer. It never waits on anything
downstream.

When the source fails (cannot open, read error, end of a live stream, no frame for
``stall_timeout_s``) the thread says so in its status, keeps the buffered frames, and
reopens the source after an exponential backoff with jitter. ``seq`` keeps counting.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from streamer.capture.ring import RingBuffer
from streamer.capture.sources import Source, make_source, mask_url
from streamer.config import SourceConfig

log = logging.getLogger(__name__)

StreamState = Literal["connecting", "live", "down"]


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self._window = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int = 1) -> None:
        self._events.append((now, count))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self._window:
            self._events.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        if len(self._events) < 2:
            return 0.0
        span = max(self._events[-1][0] - self._events[0][0], 1e-6)
        return sum(c for _, c in list(self._events)[1:]) / span


@dataclass(frozen=True)
class StreamStatus:
    """A consistent snapshot of one capture thread's state."""

    name: str
    status: StreamState
    width: int | None = None
    height: int | None = None
    fps_in: float = 0.0
    fps_sampled: float = 0.0
    frames_buffered: int = 0
    last_seq: int | None = None
    frames_in: int = 0
    frames_sampled: int = 0
    #: Input frames not kept (by design: sampling) since start.
    frames_dropped: int = 0
    reconnects: int = 0
    #: The wait before the latest reopen attempt, seconds (0 before any failure).
    backoff_s: float = 0.0
    error: str | None = None


class TimestampSampler:
    """Decides which frames to keep so kept frames are ``1 / fps`` apart in media time."""

    # Half a millisecond of slack absorbs rounding in container time bases.
    SLACK_S = 5e-4

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self._next_due: float | None = None

    def wanted(self, pts: float) -> bool:
        """Whether a frame at ``pts`` would be kept now (does not change the state)."""
        return self._next_due is None or pts >= self._next_due - self.SLACK_S

    def keep(self, pts: float) -> bool:
        """Decide for a frame at ``pts``; a kept frame moves the next due time on."""
        if not self.wanted(pts):
            return False
        if self._next_due is None or pts - self._next_due > self.interval:
            self._next_due = pts + self.interval  # first frame, or a long gap: re-anchor
        else:
            self._next_due += self.interval  # stay on the grid: the average rate holds
        return True


StatusListener = Callable[[StreamStatus], None]

_running: weakref.WeakSet[CaptureThread] = weakref.WeakSet()


@atexit.register
def _stop_running_threads() -> None:
    # A capture thread still inside FFmpeg when the interpreter tears down can crash it:
    # stop them first, also when the program forgot to.
    for capture in list(_running):
        capture.stop(timeout=2.0)


class CaptureThread:
    """Owns one source and its ring buffer; runs until :meth:`stop`.

    ``on_status`` (optional) is called on the capture thread whenever the state or error
    changes; it must return at once.
    """

    def __init__(
        self,
        cfg: SourceConfig,
        ring: RingBuffer | None = None,
        *,
        source_factory: Callable[[SourceConfig], Source] = make_source,
        on_status: StatusListener | None = None,
    ) -> None:
        self.cfg = cfg
        self.ring = ring if ring is not None else RingBuffer(cfg.buffer_frames)
        self._source_factory = source_factory
        self._on_status = on_status
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state: StreamState = "connecting"
        self._error: str | None = None
        self._size: tuple[int, int] | None = None
        self._reconnects = 0
        self._backoff_s = 0.0
        self._frames_in = 0
        self._frames_sampled = 0
        self._last_frame_at: float | None = None
        self._fps_in = RateMeter()
        self._fps_sampled = RateMeter()
        self._thread = threading.Thread(target=self._run, name=f"capture-{cfg.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.cfg.name

    def start(self) -> None:
        _running.add(self)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and wait for the thread (a read blocked in a dead camera ends by timeout)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> StreamStatus:
        now = time.monotonic()
        with self._lock:
            state, error = self._state, self._error
            # The thread may sit in a blocked read: report a stall without waiting for it.
            if state == "live" and self._last_frame_at is not None:
                silent = now - self._last_frame_at
                if silent > self.cfg.stall_timeout_s:
                    state, error = "down", f"stalled: no frame for {silent:.0f} s"
            w, h = self._size or (None, None)
            return StreamStatus(
                name=self.cfg.name,
                status=state,
                width=w,
                height=h,
                fps_in=round(self._fps_in.rate(now), 2),
                fps_sampled=round(self._fps_sampled.rate(now), 2),
                frames_buffered=len(self.ring),
                last_seq=self.ring.newest_seq,
                frames_in=self._frames_in,
                frames_sampled=self._frames_sampled,
                frames_dropped=self._frames_in - self._frames_sampled,
                reconnects=self._reconnects,
                backoff_s=round(self._backoff_s, 3),
                error=error,
            )

    def _set_state(self, state: StreamState, error: str | None = None) -> None:
        with self._lock:
            changed = state != self._state or error != self._error
            self._state = state
            self._error = error
        if not changed:
            return
        log_fn = log.warning if state == "down" else log.info
        log_fn("stream %s: %s%s", self.cfg.name, state, f" ({error})" if error else "")
        if self._on_status is not None:
            try:
                self._on_status(self.status())
            except Exception:
                log.exception("stream %s: status listener failed", self.cfg.name)

    def _run(self) -> None:
        backoff = self.cfg.backoff_initial_s
        first = True
        while not self._stop.is_set():
            if not first:
                with self._lock:
                    self._reconnects += 1
            first = False
            with self._lock:
                last_error = self._error
            self._set_state("connecting", last_error)
            source = self._source_factory(self.cfg)
            try:
                source.open()
                delivered = self._pump(source)
                if delivered:
                    backoff = self.cfg.backoff_initial_s
                if self._stop.is_set():
                    break
                if source.finite:
                    self._set_state("down", "end of file")
                    return
                self._set_state("down", "end of stream")
            except Exception as err:  # any failure of a source is reported and retried
                self._set_state("down", mask_url(f"{type(err).__name__}: {err}"))
            finally:
                source.close()
            if self._stop.is_set():
                break
            delay = backoff * random.uniform(0.8, 1.2)
            with self._lock:
                self._backoff_s = delay
            backoff = min(backoff * 2, self.cfg.backoff_max_s)
            self._stop.wait(delay)

    def _pump(self, source: Source) -> bool:
        """Read frames until the source ends or we are stopped; True if any frame was kept."""
        sampler = TimestampSampler(self.cfg.sample_fps)
        wall_start: float | None = None
        pts_start = 0.0
        delivered = False
        counted_in = source.frames_in
        for decoded in source.frames(wanted=sampler.wanted):
            if self._stop.is_set():
                break
            now = time.monotonic()
            new_in, counted_in = source.frames_in - counted_in, source.frames_in
            with self._lock:
                self._frames_in += new_in
                self._last_frame_at = now
            self._fps_in.add(now, new_in)
            pts = decoded.pts
            if pts is None:  # some RTSP cameras send no timestamp on their first frames
                pts = now
            if source.paced:
                if wall_start is None:
                    wall_start, pts_start = now, pts
                delay = wall_start + (pts - pts_start) - now
                if delay > 0 and self._stop.wait(delay):
                    break
                now = time.monotonic()
            if not sampler.keep(pts):
                continue
            rgb = decoded.to_rgb(self.cfg.max_side)
            frame = self.ring.push(rgb, ts=time.time(), pts=decoded.pts)
            self._fps_sampled.add(now)
            size = (frame.width, frame.height)
            with self._lock:
                self._frames_sampled += 1
                old_size, self._size = self._size, size
            if old_size is not None and old_size != size:
                log.warning(
                    "stream %s: resolution changed from %dx%d to %dx%d (input %dx%d)",
                    self.cfg.name,
                    *old_size,
                    *size,
                    decoded.width,
                    decoded.height,
                )
            if not delivered:
                delivered = True
                self._set_state("live")
        return delivered
