"""Frames as JPEG, encoded once per frame and reused by every question about a window.

A remote engine sends each question's window as JPEG frames. Encoding a frame costs far
more than sending it, and vLLM's prefix cache only recognises a window whose bytes are the
same as before, so :class:`JpegFrames` keeps each frame's encoding, keyed by (stream, frame
id), and hands the same string back every time: questions about one window send
byte-identical frames, and a frame is encoded once while it slides through the windows.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import cv2
import numpy as np


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """An RGB frame as JPEG bytes (OpenCV's encoder, which is deterministic for a given input)."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class JpegFrames:
    """Base64 JPEG encodings of frames by (stream, frame id), least recently used dropped
    first once they take more than ``max_bytes`` (0: nothing is kept).

    A frame id must name one frame of its stream forever (the inference loop uses
    (seq, capture time)). Not thread-safe: the inference thread alone uses it; the counters
    may be read from anywhere.
    """

    def __init__(self, max_bytes: int, quality: int) -> None:
        self.max_bytes = max_bytes
        self.quality = quality
        self._items: OrderedDict[tuple[str, Hashable], str] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple[str, Hashable]) -> bool:
        return key in self._items

    def frame(self, stream: str | None, frame_id: Hashable | None, rgb: np.ndarray) -> str:
        """The frame's JPEG as base64 text: the kept one when there is one, else encoded now
        (and kept when it has an identity)."""
        key = None if stream is None or frame_id is None else (stream, frame_id)
        if key is not None and (kept := self._items.get(key)) is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return kept
        self.misses += 1
        text = base64.b64encode(encode_jpeg(rgb, self.quality)).decode("ascii")
        if key is not None and len(text) <= self.max_bytes:
            self._items[key] = text
            self.bytes += len(text)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)
        return text

    def window(self, stream: str | None, frames: Sequence[np.ndarray], ids: Sequence[Hashable] | None) -> list[str]:
        """Every frame of a window as base64 JPEG, in order."""
        if ids is None:
            return [self.frame(None, None, rgb) for rgb in frames]
        return [self.frame(stream, frame_id, rgb) for rgb, frame_id in zip(frames, ids, strict=True)]

    def encode_missing(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable]) -> int:
        """Encode the frames of a window that are not kept yet; how many were encoded (none
        when nothing is kept)."""
        if self.max_bytes == 0:
            return 0
        missing = [(rgb, i) for rgb, i in zip(frames, ids, strict=True) if (stream, i) not in self._items]
        for rgb, frame_id in missing:
            self.frame(stream, frame_id, rgb)
        return len(missing)
