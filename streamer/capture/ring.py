"""Frames and the per-stream ring buffer that holds the newest of them."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One sampled video frame.

    ``seq`` only ever increases within a stream (also across reconnects); ``ts`` is the
    wall-clock capture time in Unix seconds; ``pts`` the media time in seconds when the
    source has one; ``rgb`` is an ``H x W x 3`` uint8 array that is never written to again.
    """

    seq: int
    ts: float
    rgb: np.ndarray
    pts: float | None = None
    #: How much the picture changed since the stream's previous frame: the mean absolute
    #: difference of their luma on a coarse grid, 0 (same) to 1; None for a first frame or
    #: a new size.
    motion: float | None = None

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


#: Pixels between samples of the coarse grid motion is measured on.
MOTION_STRIDE = 8


def motion_between(before: np.ndarray, after: np.ndarray) -> float | None:
    """The change from ``before`` to ``after`` (RGB frames): mean absolute difference of their
    luma sampled every :data:`MOTION_STRIDE` pixels, 0 to 1; None when their sizes differ.
    About 5 000 samples for a 640 x 480 frame: cheap enough for every kept frame."""
    if before.shape != after.shape:
        return None
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    a = before[::MOTION_STRIDE, ::MOTION_STRIDE] @ weights
    b = after[::MOTION_STRIDE, ::MOTION_STRIDE] @ weights
    return float(np.abs(a - b).mean() / 255.0)


class RingBuffer:
    """A fixed-capacity, thread-safe buffer of the newest frames of one stream.

    One capture thread appends; any number of readers take snapshots. The buffer assigns
    ``seq`` itself, so numbering survives the source being closed and reopened. Memory is
    bounded by ``capacity`` frames whatever runs for how long.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._frames: deque[Frame] = deque(maxlen=capacity)
        self._next_seq = 0
        self._changed = threading.Condition(threading.Lock())

    def push(self, rgb: np.ndarray, ts: float | None = None, pts: float | None = None) -> Frame:
        """Store a frame (taking ownership of ``rgb``, which is made read-only) and return it."""
        rgb.flags.writeable = False
        previous = self.newest()
        motion = motion_between(previous.rgb, rgb) if previous is not None else None  # on the pushing thread
        with self._changed:
            frame = Frame(seq=self._next_seq, ts=time.time() if ts is None else ts, rgb=rgb, pts=pts, motion=motion)
            self._next_seq += 1
            self._frames.append(frame)
            self._changed.notify_all()
        return frame

    def latest(self, n: int) -> list[Frame]:
        """The newest ``n`` frames (fewer if fewer are held), oldest first, pixels not copied."""
        if n <= 0:
            return []
        with self._changed:
            k = min(n, len(self._frames))
            return [self._frames[i] for i in range(len(self._frames) - k, len(self._frames))]

    def newest(self) -> Frame | None:
        with self._changed:
            return self._frames[-1] if self._frames else None

    @property
    def newest_seq(self) -> int | None:
        """``seq`` of the newest frame, or None while the buffer is empty."""
        with self._changed:
            return self._next_seq - 1 if self._frames else None

    def wait_for_frame_after(self, seq: int | None, timeout: float) -> Frame | None:
        """Block until a frame newer than ``seq`` is held (None: any frame), or time out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self._frames and (seq is None or self._frames[-1].seq > seq):
                    return self._frames[-1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def __len__(self) -> int:
        with self._changed:
            return len(self._frames)
