"""Capture: sources, the ring buffer of sampled frames, and the capture thread.

Nothing here knows about the model or the server.
"""

from streamer.capture.ring import Frame, RingBuffer
from streamer.capture.sources import DecodedFrame, Source, SourceError, make_source, mask_url
from streamer.capture.thread import CaptureThread, StreamStatus, TimestampSampler

__all__ = [
    "CaptureThread",
    "DecodedFrame",
    "Frame",
    "RingBuffer",
    "Source",
    "SourceError",
    "StreamStatus",
    "TimestampSampler",
    "make_source",
    "mask_url",
]
