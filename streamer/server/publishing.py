"""Streams that callers publish: the bridge from a WHIP call or a WebSocket ``publish`` to a
pushed source (:class:`~streamer.capture.PushedSource`).

:class:`Publishers` owns the limits (``server.publish``): how many streams may be published
at once, the largest side kept (larger frames are scaled down while decoding), the largest
JPEG accepted, and the idle timeout after which a silent publisher is hung up. A name that
a configured source or another publication uses is refused. Each :class:`Publication` is a
stream added to the running server (:meth:`Runtime.add_source`) and removed again when it
ends, however it ends (hang-up, socket gone, idle, shutdown), so subscribers hear a
``stream_status`` both times.

Decoding (JPEG, or an ``av.VideoFrame`` to RGB) runs on one worker thread owned here, never
on the event loop; callers await it, which is their back-pressure.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from streamer.capture import PushedSource
from streamer.capture.sources import fit_within
from streamer.config import SOURCE_NAME_PATTERN, PublishConfig, SourceConfig
from streamer.server.runtime import Runtime

log = logging.getLogger(__name__)

#: Frames whose side is larger than this are refused outright, not decoded and scaled.
MAX_DECODED_SIDE = 8192


class PublishError(Exception):
    """A publish or a published frame was refused: a protocol ``error`` code, or an HTTP status."""

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


class Publication:
    """One published stream, open until :meth:`Publishers.close`."""

    def __init__(self, name: str, source: PushedSource, kind: str, hang_up: Callable[[str], None]) -> None:
        self.name = name
        self.source = source
        self.kind = kind  # "whip" or "websocket"
        self.hang_up = hang_up  # called on the event loop with the reason (idle, shutdown)
        self.opened = time.monotonic()
        self.last_frame = self.opened
        self.frames = 0
        self.closed = False

    def push(self, rgb: np.ndarray, pts: float | None = None) -> None:
        """Hand one decoded frame to the stream (any thread)."""
        if self.closed:
            return
        self.last_frame = time.monotonic()
        self.frames += 1
        self.source.publish(rgb, pts)


class Publishers:
    """The server's published streams and their limits."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cfg: PublishConfig = runtime.settings.server.publish
        self.active: dict[str, Publication] = {}
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-decode")
        self._reaper: asyncio.Task[None] | None = None
        #: Told each published stream's name as it opens (the server makes every client follow it).
        self.on_open: Callable[[str], None] | None = None

    # -- opening and closing -------------------------------------------------------------

    def check(self, name: str) -> None:
        """Raise the :class:`PublishError` that :meth:`open` would raise for ``name``, if any."""
        if not re.fullmatch(SOURCE_NAME_PATTERN, name):
            why = f"{name[:64]!r} is not a stream name: 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
            raise PublishError("bad_request", why, 400)
        if self.cfg.max_streams == 0:
            raise PublishError("forbidden", "publishing is off on this server (server.publish.max_streams: 0)", 403)
        if self.runtime.settings.source(name) is not None:
            raise PublishError("name_taken", f"{name!r} is a configured source's name: publish under another", 409)
        if name in self.runtime.captures:
            raise PublishError("name_taken", f"a stream named {name!r} is already published", 409)
        if len(self.active) >= self.cfg.max_streams:
            why = f"the server has its maximum of {self.cfg.max_streams} published streams"
            raise PublishError("busy", why, 503)

    def open(self, name: str, kind: str, hang_up: Callable[[str], None], fps: float | None = None) -> Publication:
        """Add a published stream named ``name``; raises :class:`PublishError` when refused."""
        self.check(name)
        sample_fps = self.cfg.sample_fps if fps is None else min(self.cfg.sample_fps, fps)
        cfg = SourceConfig(
            name=name,
            url="push",
            sample_fps=sample_fps,
            max_side=self.cfg.max_side,
            stall_timeout_s=self.cfg.stall_timeout_s,
        )
        source = self.runtime.add_source(cfg)
        assert isinstance(source, PushedSource)
        publication = Publication(name, source, kind, hang_up)
        self.active[name] = publication
        if self.on_open is not None:
            self.on_open(name)
        log.info("stream %s: published over %s", name, kind)
        return publication

    def close(self, publication: Publication, reason: str = "hung up") -> None:
        """End a publication (idempotent): its stream is removed and subscribers hear so."""
        if publication.closed:
            return
        publication.closed = True
        if self.active.get(publication.name) is publication:
            del self.active[publication.name]
            self.runtime.remove_source(publication.name)
            log.info("stream %s: publication ended (%s) after %d frames", publication.name, reason, publication.frames)

    # -- decoding, off the event loop ----------------------------------------------------

    async def decode_jpeg(self, data: bytes) -> np.ndarray:
        """An RGB array of a JPEG, scaled to fit ``max_side``; raises :class:`PublishError`."""
        if len(data) > self.cfg.max_frame_bytes:
            raise PublishError("frame_too_large", f"a frame of {len(data)} bytes; at most {self.cfg.max_frame_bytes}")
        if not data.startswith(b"\xff\xd8\xff"):
            raise PublishError("bad_frame", "a published binary frame must be a JPEG image")
        return await asyncio.get_running_loop().run_in_executor(self._decoder, _decode_jpeg, data, self.cfg.max_side)

    async def to_rgb(self, frame: Any) -> np.ndarray:
        """An ``av.VideoFrame`` as an RGB array scaled to fit ``max_side``."""
        return await asyncio.get_running_loop().run_in_executor(
            self._decoder, _video_frame_rgb, frame, self.cfg.max_side
        )

    # -- idle publishers and shutdown ----------------------------------------------------

    def start(self) -> None:
        """Start hanging up idle publishers (on the running event loop)."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle(), name="publish-idle")

    async def _reap_idle(self) -> None:
        timeout = self.cfg.idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for publication in list(self.active.values()):
                if now - publication.last_frame > timeout:
                    log.info("stream %s: no frame for %.0f s, hanging up", publication.name, timeout)
                    publication.hang_up("idle")
                    self.close(publication, "idle")

    async def stop(self) -> None:
        """Hang up every publisher and stop the decoding thread."""
        if self._reaper is not None:
            self._reaper.cancel()
        for publication in list(self.active.values()):
            publication.hang_up("shutdown")
            self.close(publication, "shutdown")
        await asyncio.sleep(0)  # let the hang-ups' tasks start
        self._decoder.shutdown(wait=False, cancel_futures=True)


def _decode_jpeg(data: bytes, max_side: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            width, height = image.size
            if max(width, height) > MAX_DECODED_SIDE:
                why = f"a {width}x{height} frame; sides of at most {MAX_DECODED_SIDE} are decoded"
                raise PublishError("frame_too_large", why)
            image.draft("RGB", fit_within(width, height, max_side))  # the JPEG decoder scales by 1/2, 1/4, 1/8
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise PublishError("bad_frame", f"the frame is not a readable JPEG image ({err})") from None


def _video_frame_rgb(frame: Any, max_side: int) -> np.ndarray:
    width, height = fit_within(frame.width, frame.height, max_side)
    return frame.to_ndarray(format="rgb24", width=width, height=height)
