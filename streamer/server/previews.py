"""Preview JPEGs for subscribers, encoded once per (stream, rate, width), not per client.

A :class:`PreviewFeed` task wakes ``fps`` times a second, encodes the stream's newest frame
if it is new (in a worker thread: the event loop never encodes), and hands the same bytes to
every subscriber of that key. Subscribers treat previews as droppable: a slow client loses
previews, never answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from streamer.capture import Frame, RingBuffer
from streamer.server.protocol import preview_header

#: A stream's ring buffer by name (None once the stream is gone).
RingOf = Callable[[str], RingBuffer | None]

log = logging.getLogger(__name__)

DEFAULT_MAX_WIDTH = 640
JPEG_QUALITY = 75


class PreviewSubscriber(Protocol):
    def deliver_preview(self, header: dict[str, Any], jpeg: bytes) -> None: ...


@dataclass(frozen=True)
class PreviewKey:
    stream: str
    fps: float
    max_width: int

    @classmethod
    def of(cls, stream: str, fps: float, max_width: int | None) -> PreviewKey:
        # Snap to coarse steps so clients asking for nearly the same thing share one feed.
        snapped_fps = max(0.5, round(fps * 2) / 2)
        width = max(64, (max_width or DEFAULT_MAX_WIDTH) // 32 * 32)
        return cls(stream, snapped_fps, width)


def encode_preview(frame: Frame, max_width: int) -> tuple[bytes, int, int]:
    """The frame as JPEG bytes, scaled down to ``max_width``; returns (bytes, width, height)."""
    rgb = frame.rgb
    h, w = rgb.shape[:2]
    if w > max_width:
        nh = max(2, math.floor(h * max_width / w / 2) * 2)
        rgb = cv2.resize(rgb, (max_width, nh), interpolation=cv2.INTER_AREA)
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes(), rgb.shape[1], rgb.shape[0]


class PreviewFeed:
    def __init__(self, key: PreviewKey, ring_of: RingOf) -> None:
        self.key = key
        self.ring_of = ring_of
        self.subscribers: set[PreviewSubscriber] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"preview-{self.key}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        ring = self.ring_of(self.key.stream)
        period = 1.0 / self.key.fps
        last_seq: int | None = None
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self.subscribers and ring is not None:
            frame = ring.newest()
            if frame is not None and frame.seq != last_seq:
                last_seq = frame.seq
                try:
                    jpeg, w, h = await asyncio.to_thread(encode_preview, frame, self.key.max_width)
                except Exception:
                    log.exception("preview of %s failed", self.key.stream)
                else:
                    header = preview_header(self.key.stream, frame.seq, frame.ts, w, h, len(jpeg))
                    for subscriber in list(self.subscribers):
                        subscriber.deliver_preview(header, jpeg)
            next_at = max(next_at + period, loop.time())
            await asyncio.sleep(next_at - loop.time())


class PreviewHub:
    """Feeds by key; a subscriber follows at most one feed per stream (event loop only)."""

    def __init__(self, ring_of: RingOf) -> None:
        self.ring_of = ring_of
        self.feeds: dict[PreviewKey, PreviewFeed] = {}

    def follow(self, subscriber: PreviewSubscriber, key: PreviewKey | None, stream: str) -> None:
        """Make ``subscriber`` follow ``key`` on ``stream`` (None: no previews of it)."""
        for old_key, feed in list(self.feeds.items()):
            if old_key.stream == stream and old_key != key:
                self._leave(feed, subscriber)
        if key is None:
            return
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = PreviewFeed(key, self.ring_of)
            feed.subscribers.add(subscriber)
            feed.start()
        else:
            feed.subscribers.add(subscriber)

    def leave_all(self, subscriber: PreviewSubscriber) -> None:
        for feed in list(self.feeds.values()):
            self._leave(feed, subscriber)

    def _leave(self, feed: PreviewFeed, subscriber: PreviewSubscriber) -> None:
        feed.subscribers.discard(subscriber)
        if not feed.subscribers:
            feed.stop()
            self.feeds.pop(feed.key, None)

    def close(self) -> None:
        for feed in self.feeds.values():
            feed.stop()
        self.feeds.clear()
