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
from collections.abc import Callable

from streamer.capture.health import StatusListener, StreamHealth, StreamStatus
from streamer.capture.ring import RingBuffer
from streamer.capture.sources import Source, make_source, mask_url
from streamer.config import SourceConfig

log = logging.getLogger(__name__)


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
        self.health = StreamHealth(cfg.name, self.ring, stall_timeout_s=cfg.stall_timeout_s, on_status=on_status)
        self._source_factory = source_factory
        self._stop = threading.Event()
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
        return self.health.status()

    def _run(self) -> None:
        backoff = self.cfg.backoff_initial_s
        first = True
        while not self._stop.is_set():
            if not first:
                self.health.reconnecting()
            first = False
            self.health.set_state("connecting", self.health.error)
            source = self._source_factory(self.cfg)
            try:
                source.open()
                delivered = self._pump(source)
                if delivered:
                    backoff = self.cfg.backoff_initial_s
                if self._stop.is_set():
                    break
                if source.finite:
                    self.health.set_state("down", "end of file")
                    return
                self.health.set_state("down", "end of stream")
            except Exception as err:  # any failure of a source is reported and retried
                self.health.set_state("down", mask_url(f"{type(err).__name__}: {err}"))
            finally:
                source.close()
            if self._stop.is_set():
                break
            delay = backoff * random.uniform(0.8, 1.2)
            self.health.backing_off(delay)
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
            self.health.frames_read(new_in, now)
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
            old_size = self.health.frame_kept(frame, now)
            if old_size is not None:
                log.warning(
                    "stream %s: resolution changed from %dx%d to %dx%d (input %dx%d)",
                    self.cfg.name,
                    *old_size,
                    frame.width,
                    frame.height,
                    decoded.width,
                    decoded.height,
                )
            if not delivered:
                delivered = True
                self.health.set_state("live")
        return delivered
