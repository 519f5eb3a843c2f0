"""What every stream offers, whichever way its frames arrive, and the one place that picks the kind.

A stream is pulled (:class:`~streamer.capture.thread.CaptureThread` reads a camera, a file
or a network URL) or pushed into (:class:`~streamer.capture.pushed.PushedSource`, url
``push``). Both keep a ring buffer and report through a
:class:`~streamer.capture.health.StreamHealth`; the rest of streamer sees only :class:`Stream`.
"""

from __future__ import annotations

from typing import Protocol

from streamer.capture.health import StatusListener, StreamHealth, StreamStatus
from streamer.capture.pushed import PushedSource
from streamer.capture.ring import RingBuffer
from streamer.capture.thread import CaptureThread
from streamer.config import SourceConfig


class Stream(Protocol):
    cfg: SourceConfig
    ring: RingBuffer
    health: StreamHealth

    @property
    def name(self) -> str: ...
    def start(self) -> None: ...
    def stop(self, timeout: float = ...) -> None: ...
    def status(self) -> StreamStatus: ...


def stream_for(cfg: SourceConfig, on_status: StatusListener | None = None) -> Stream:
    """The stream a source config describes: pushed into for url ``push``, else read by a thread."""
    if cfg.kind == "push":
        return PushedSource(cfg, on_status=on_status)
    return CaptureThread(cfg, on_status=on_status)
