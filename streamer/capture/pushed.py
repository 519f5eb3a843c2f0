"""A stream whose frames are handed in instead of read: a browser camera, an uploaded clip.

:class:`PushedSource` offers what a :class:`~streamer.capture.thread.CaptureThread` offers (a
ring buffer, a status, ``start`` and ``stop``), so the inference loop, previews and status
subscribers treat it as any other stream. :meth:`PushedSource.publish` keeps one frame per
``1 / sample_fps`` seconds of media time, scales it to ``max_side`` and pushes it into the
ring buffer, through the same :class:`~streamer.capture.health.StreamHealth` as a pulled
source: ``connecting`` until the first frame, ``live`` while frames come, ``down`` once none
came for ``stall_timeout_s`` (a watchdog tells the listener) until the next one.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from streamer.capture.health import StatusListener, StreamHealth, StreamStatus
from streamer.capture.ring import Frame, RingBuffer
from streamer.capture.sources import fit_within
from streamer.capture.thread import TimestampSampler
from streamer.config import SourceConfig

log = logging.getLogger(__name__)


class PushedSource:
    """A stream fed by :meth:`publish` (from any thread); runs a stall watchdog from
    :meth:`start` until :meth:`stop`."""

    def __init__(self, cfg: SourceConfig, ring: RingBuffer | None = None, *, on_status: StatusListener | None = None):
        self.cfg = cfg
        self.ring = ring if ring is not None else RingBuffer(cfg.buffer_frames)
        self.health = StreamHealth(cfg.name, self.ring, stall_timeout_s=cfg.stall_timeout_s, on_status=on_status)
        self._sampler = TimestampSampler(cfg.sample_fps)
        self._lock = threading.Lock()  # one frame at a time through the sampler
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"pushed-{cfg.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.cfg.name

    def start(self) -> None:
        self._watchdog.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Take no more frames and stop the watchdog; the buffered frames stay readable."""
        self._stop.set()
        if self._watchdog.is_alive():
            self._watchdog.join(timeout)

    def is_alive(self) -> bool:
        return self._watchdog.is_alive()

    def status(self) -> StreamStatus:
        return self.health.status()

    def publish(self, rgb: np.ndarray, pts: float | None = None) -> Frame | None:
        """Hand in one ``H x W x 3`` uint8 RGB frame shown at media time ``pts`` seconds (None:
        now). Returns the frame kept, or None when sampling skipped it (or the source is
        stopped). The caller's array is copied, never kept. Returns at once."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"a frame must be H x W x 3 uint8 RGB, not {rgb.dtype} {rgb.shape}")
        if self._stop.is_set():
            return None
        now = time.monotonic()
        with self._lock:
            self.health.frames_read(1, now)
            kept = self._sampler.keep(now if pts is None else pts)
            frame = self.ring.push(_fit(rgb, self.cfg.max_side), ts=time.time(), pts=pts) if kept else None
            old_size = self.health.frame_kept(frame, now) if frame is not None else None
        if frame is not None and old_size is not None:
            log.warning("stream %s: size changed from %dx%d to %dx%d", self.name, *old_size, frame.width, frame.height)
        self.health.set_state("live")  # frames flow (the first one is always kept)
        return frame

    def _watch(self) -> None:
        stall = self.cfg.stall_timeout_s
        wait = stall
        while not self._stop.wait(wait):
            silent = self.health.silent_for(time.monotonic())
            if silent is None:
                wait = stall
            elif silent <= stall:
                wait = stall - silent + 0.05
            else:
                if self.health.state == "live":
                    self.health.set_state("down", f"stalled: no frame for {silent:.0f} s")
                wait = stall


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """A copy of ``rgb`` scaled down so the longer side is at most ``max_side``."""
    h, w = rgb.shape[:2]
    size = fit_within(w, h, max_side)
    if size == (w, h):
        return np.array(rgb, copy=True, order="C")
    import cv2

    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
