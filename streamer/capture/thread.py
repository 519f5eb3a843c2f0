"""The capture thread: one per source, keeping that source's ring buffer fresh.

It reads decoded frames, keeps one every ``1 / sample_fps`` seconds of *presentation time*
(not every Nth frame, so a variable frame rate still samples evenly), converts only the
kept frames to RGB, and pushes them into the ring buffer. It never waits on anything
downstream. When the source fails it says so in its status and reopens it after a backoff.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from streamer.capture.ring import RingBuffer
from streamer.capture.sources import Source, make_source
from streamer.config import SourceConfig

log = logging.getLogger(__name__)

StreamState = Literal["connecting", "live", "down"]

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self._window = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        span = max(self._times[-1] - self._times[0], 1e-6)
        return (len(self._times) - 1) / span


@dataclass
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
    reconnects: int = 0
    error: str | None = None


class TimestampSampler:
    """Decides which frames to keep so kept frames are ``1 / fps`` apart in media time."""

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self._next_due: float | None = None

    def reset(self) -> None:
        self._next_due = None

    def keep(self, pts: float) -> bool:
        # Half a millisecond of slack absorbs rounding in container time bases.
        if self._next_due is None or pts >= self._next_due - 5e-4:
            if self._next_due is None or pts - self._next_due > self.interval:
                self._next_due = pts + self.interval  # first frame, or fell behind: re-anchor
            else:
                self._next_due += self.interval
            return True
        return False


class CaptureThread:
    """Owns one source and its ring buffer; runs until :meth:`stop`."""

    def __init__(
        self,
        cfg: SourceConfig,
        ring: RingBuffer | None = None,
        *,
        source_factory: Callable[[SourceConfig], Source] = make_source,
    ) -> None:
        self.cfg = cfg
        self.ring = ring if ring is not None else RingBuffer(cfg.buffer_frames)
        self._source_factory = source_factory
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state: StreamState = "connecting"
        self._error: str | None = None
        self._size: tuple[int, int] | None = None
        self._reconnects = 0
        self._fps_in = RateMeter()
        self._fps_sampled = RateMeter()
        self._thread = threading.Thread(target=self._run, name=f"capture-{cfg.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.cfg.name

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> StreamStatus:
        now = time.monotonic()
        with self._lock:
            w, h = self._size or (None, None)
            return StreamStatus(
                name=self.cfg.name,
                status=self._state,
                width=w,
                height=h,
                fps_in=round(self._fps_in.rate(now), 2),
                fps_sampled=round(self._fps_sampled.rate(now), 2),
                frames_buffered=len(self.ring),
                last_seq=self.ring.newest_seq,
                reconnects=self._reconnects,
                error=self._error,
            )

    def _set_state(self, state: StreamState, error: str | None = None) -> None:
        with self._lock:
            changed = state != self._state or error != self._error
            self._state = state
            self._error = error
        if changed:
            log_fn = log.warning if state == "down" else log.info
            log_fn("stream %s: %s%s", self.cfg.name, state, f" ({error})" if error else "")

    def _run(self) -> None:
        backoff = BACKOFF_INITIAL_S
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
                    backoff = BACKOFF_INITIAL_S
                if source.finite and not self._stop.is_set():
                    self._set_state("down", "end of file")
                    return
                if not self._stop.is_set():
                    self._set_state("down", "end of stream")
            except Exception as err:  # any failure of a source is reported and retried
                self._set_state("down", f"{type(err).__name__}: {err}")
            finally:
                source.close()
            if self._stop.is_set():
                break
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            self._stop.wait(delay)

    def _pump(self, source: Source) -> bool:
        """Read frames until the source ends or we are stopped; True if any frame was kept."""
        sampler = TimestampSampler(self.cfg.sample_fps)
        wall_start: float | None = None
        pts_start = 0.0
        delivered = False
        for decoded in source.frames():
            if self._stop.is_set():
                break
            now = time.monotonic()
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
            self._fps_in.tick(now)
            if not sampler.keep(pts):
                continue
            rgb = decoded.to_rgb(self.cfg.max_side)
            frame = self.ring.push(rgb, ts=time.time(), pts=decoded.pts)
            self._fps_sampled.tick(now)
            with self._lock:
                self._size = (frame.width, frame.height)
            if not delivered:
                delivered = True
                self._set_state("live")
        return delivered
