"""How a stream is doing: its state machine and counters, shared by every kind of source.

A stream is ``connecting`` until its first frame, ``live`` while frames come, and ``down``
when its source fails, ends or stalls (no frame for ``stall_timeout_s``). :class:`StreamHealth`
keeps that state, the frame counters and rates, and tells its listener of every change of
state or error. Pulled sources (:class:`~streamer.capture.thread.CaptureThread`) and pushed
ones (:class:`~streamer.capture.pushed.PushedSource`) report through it the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from streamer.capture.ring import Frame, RingBuffer

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
    """A consistent snapshot of one stream's state."""

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


StatusListener = Callable[[StreamStatus], None]


class StreamHealth:
    """The state and counters of one stream; thread-safe.

    ``on_status`` (optional) is called on the reporting thread whenever the state or error
    changes; it must return at once.
    """

    def __init__(
        self, name: str, ring: RingBuffer, *, stall_timeout_s: float, on_status: StatusListener | None = None
    ) -> None:
        self.name = name
        self.ring = ring
        self.stall_timeout_s = stall_timeout_s
        self._on_status = on_status
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

    @property
    def state(self) -> StreamState:
        """The state last entered (:meth:`status` also reports a stall the source has not noticed)."""
        with self._lock:
            return self._state

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error

    def silent_for(self, now: float) -> float | None:
        """Seconds since the last input frame (None before the first)."""
        with self._lock:
            return None if self._last_frame_at is None else now - self._last_frame_at

    def status(self) -> StreamStatus:
        now = time.monotonic()
        with self._lock:
            state, error = self._state, self._error
            # The source may sit in a blocked read: report a stall without waiting for it.
            if state == "live" and self._last_frame_at is not None:
                silent = now - self._last_frame_at
                if silent > self.stall_timeout_s:
                    state, error = "down", f"stalled: no frame for {silent:.0f} s"
            w, h = self._size or (None, None)
            return StreamStatus(
                name=self.name,
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

    def set_state(self, state: StreamState, error: str | None = None) -> None:
        """Enter ``state``; the listener hears of it if the state or the error changed."""
        with self._lock:
            changed = state != self._state or error != self._error
            self._state = state
            self._error = error
        if not changed:
            return
        log_fn = log.warning if state == "down" else log.info
        log_fn("stream %s: %s%s", self.name, state, f" ({error})" if error else "")
        if self._on_status is not None:
            try:
                self._on_status(self.status())
            except Exception:
                log.exception("stream %s: status listener failed", self.name)

    def frames_read(self, count: int, now: float) -> None:
        """``count`` input frames arrived (kept or not)."""
        with self._lock:
            self._frames_in += count
            self._last_frame_at = now
        self._fps_in.add(now, count)

    def frame_kept(self, frame: Frame, now: float) -> tuple[int, int] | None:
        """A frame went into the ring buffer; returns the previous frame size when it changed."""
        self._fps_sampled.add(now)
        size = (frame.width, frame.height)
        with self._lock:
            self._frames_sampled += 1
            old_size, self._size = self._size, size
        return old_size if old_size is not None and old_size != size else None

    def reconnecting(self) -> None:
        """The source is being opened again."""
        with self._lock:
            self._reconnects += 1

    def backing_off(self, delay_s: float) -> None:
        """The source failed; it will be reopened after ``delay_s``."""
        with self._lock:
            self._backoff_s = delay_s
