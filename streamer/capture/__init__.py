"""Capture: where frames come from, the ring buffers that hold the newest of them, and how
each stream is doing.

Pulled streams (a thread reading a camera, a file or an RTSP URL) and pushed ones (frames
handed in) fill a :class:`RingBuffer` the same way and report one :class:`StreamStatus`.
May import :mod:`streamer.config` and nothing else of streamer: it knows nothing of the
model, the service or the server.
"""

from streamer.capture.health import StreamHealth, StreamStatus
from streamer.capture.pushed import PushedSource
from streamer.capture.ring import Frame, RingBuffer
from streamer.capture.sources import DecodedFrame, Source, SourceError, make_source, mask_url
from streamer.capture.stream import Stream, stream_for
from streamer.capture.thread import CaptureThread, TimestampSampler

__all__ = [
    "CaptureThread",
    "DecodedFrame",
    "Frame",
    "PushedSource",
    "RingBuffer",
    "Source",
    "SourceError",
    "Stream",
    "StreamHealth",
    "StreamStatus",
    "TimestampSampler",
    "make_source",
    "mask_url",
    "stream_for",
]
