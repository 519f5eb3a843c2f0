"""Video sources: where decoded frames come from.

A :class:`Source` opens, yields :class:`DecodedFrame` objects in presentation order, and
closes. Decoded frames convert to RGB lazily (:meth:`DecodedFrame.to_rgb`), so the capture
thread pays for colour conversion and resizing only on the frames it keeps.

- ``demo``: FFmpeg's ``testsrc2`` pattern through PyAV's lavfi, stamped with its own frame
  number and the wall clock;
- files and network URLs (``rtsp://`` and anything else FFmpeg opens) through PyAV;
- webcams (a device index or ``/dev/videoN``) through OpenCV, since PyAV's wheel has no v4l2.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from streamer.config import SourceConfig

log = logging.getLogger(__name__)

DEMO_SIZE = (640, 480)
DEMO_FPS = 15.0


class SourceError(RuntimeError):
    """A source could not be opened or stopped delivering frames."""


_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")


def mask_url(text: str) -> str:
    """Hide credentials in URLs (``rtsp://user:pass@host`` -> ``rtsp://***@host``), also
    inside longer text such as a library's error message, before it is logged or shown."""
    return _CREDENTIALS.sub(r"\1***@", text)


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (width, height) down so the longer side is at most ``max_side``; even sizes."""
    scale = min(1.0, max_side / max(width, height))
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    return w, h


class DecodedFrame(Protocol):
    """A frame as the source decoded it, not yet converted to RGB."""

    pts: float | None
    width: int
    height: int

    def to_rgb(self, max_side: int) -> np.ndarray:
        """An ``H x W x 3`` uint8 RGB array, the longer side at most ``max_side``."""
        ...


#: Told the frame time (media seconds) of the next input frame, answers whether it may be
#: kept; a source may then skip decoding frames nobody wants (never a frame it says yes to).
WantedHint = Callable[[float], bool]


class Source(ABC):
    """One video source. Not thread-safe: a source belongs to one capture thread.

    ``frames_in`` counts input frames read (decoded or skipped), for the input rate.
    """

    frames_in: int = 0

    #: True when frames come faster than real time unless the reader paces them (files,
    #: synthetic patterns); live cameras deliver at their own rate.
    paced: bool = False
    #: True for sources that end (a file played once): their end is not a failure to retry.
    finite: bool = False

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def description(self) -> str:
        return mask_url(self.url)

    @abstractmethod
    def open(self) -> None:
        """Open the source; raises :class:`SourceError` (or the library's error) on failure."""

    @abstractmethod
    def frames(self, wanted: WantedHint | None = None) -> Iterator[DecodedFrame]:
        """Decoded frames in presentation order; returns at the end of the input."""

    @abstractmethod
    def close(self) -> None:
        """Release the source; safe to call more than once."""


class _AVFrame:
    __slots__ = ("_frame", "_stamp", "height", "pts", "width")

    def __init__(self, frame: Any, pts: float | None, stamp: int | None = None) -> None:
        self._frame = frame
        self.pts = pts
        self.width = frame.width
        self.height = frame.height
        self._stamp = stamp

    def to_rgb(self, max_side: int) -> np.ndarray:
        w, h = fit_within(self.width, self.height, max_side)
        rgb = self._frame.to_ndarray(width=w, height=h, format="rgb24")
        if self._stamp is not None:
            rgb = _stamp_demo_frame(np.ascontiguousarray(rgb), self._stamp)
        return rgb


def _stamp_demo_frame(rgb: np.ndarray, frame_number: int) -> np.ndarray:
    import cv2

    clock = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 10) % 10}"
    text = f"frame {frame_number}  {clock}"
    scale = max(0.4, rgb.shape[1] / 640 * 0.8)
    cv2.rectangle(rgb, (0, 0), (rgb.shape[1], int(34 * scale)), (0, 0, 0), thickness=-1)
    cv2.putText(rgb, text, (6, int(26 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
    return rgb


class PyAVSource(Source):
    """Anything FFmpeg opens: files, ``rtsp://`` and other network URLs, lavfi graphs.

    Frames that the capture thread will not keep are dropped as early as FFmpeg allows:
    when the ``wanted`` hint says no, the decoder is told to skip non-reference frames
    (``skip_frame=NONREF``), so they are never decoded, and no frame is converted to RGB
    unless it is kept.
    """

    def __init__(
        self,
        url: str,
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
        loop: bool = False,
        paced: bool = False,
        stamp_frames: bool = False,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(url)
        self._format = format
        self._options = options or {}
        self._loop = loop
        self.paced = paced
        self._stamp_frames = stamp_frames
        self._timeouts = (open_timeout_s, read_timeout_s)
        self._container: Any = None

    def open(self) -> None:
        import av

        self.close()
        try:
            self._container = av.open(self.url, format=self._format, options=self._options, timeout=self._timeouts)
        except av.FFmpegError as err:
            raise SourceError(mask_url(f"cannot open {self.url}: {err}")) from None
        if not self._container.streams.video:
            self.close()
            raise SourceError(f"{self.description} has no video stream")

    def frames(self, wanted: WantedHint | None = None) -> Iterator[DecodedFrame]:
        import av

        if self._container is None:
            raise SourceError("source is not open")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        codec = stream.codec_context
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        offset = 0.0  # media time added per loop, so pts keeps increasing across loops
        number = 0
        while True:
            last_pts: float | None = None
            try:
                for packet in self._container.demux(stream):
                    if packet.size:
                        self.frames_in += 1
                        if wanted is not None and packet.pts is not None and packet.time_base is not None:
                            keep = wanted(float(packet.pts * packet.time_base) + offset)
                            codec.skip_frame = "DEFAULT" if keep else "NONREF"
                    else:
                        codec.skip_frame = "DEFAULT"  # the flush at the end gives buffered frames back
                    for frame in packet.decode():
                        pts = None if frame.time is None else frame.time + offset
                        yield _AVFrame(frame, pts, number if self._stamp_frames else None)
                        number += 1
                        last_pts = pts
            except av.FFmpegError as err:
                raise SourceError(mask_url(f"{self.url}: {err}")) from None
            if not self._loop:
                return
            if last_pts is None:
                raise SourceError(f"{self.description} decoded no frame")
            self._container.seek(0)
            offset = last_pts + 1.0 / rate

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            finally:
                self._container = None


class _CVFrame:
    __slots__ = ("_cap", "height", "pts", "width")

    def __init__(self, cap: Any, pts: float, width: int, height: int) -> None:
        self._cap = cap
        self.pts = pts
        self.width = width
        self.height = height

    def to_rgb(self, max_side: int) -> np.ndarray:
        # grab() already moved the frame off the device; retrieve() decodes it, and only for
        # frames that are kept. Must be called before the next grab().
        import cv2

        ok, bgr = self._cap.retrieve()
        if not ok or bgr is None:
            raise SourceError("webcam frame could not be decoded")
        w, h = fit_within(bgr.shape[1], bgr.shape[0], max_side)
        if (w, h) != (bgr.shape[1], bgr.shape[0]):
            bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class OpenCVSource(Source):
    """A webcam (device index or ``/dev/videoN``) through OpenCV."""

    def __init__(self, url: str, *, width: int | None, height: int | None, fps: float | None) -> None:
        super().__init__(url)
        self._requested = (width, height, fps)
        self._cap: Any = None

    def open(self) -> None:
        import cv2

        self.close()
        device: int | str = int(self.url) if self.url.isdigit() else self.url
        cap = cv2.VideoCapture(device)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open webcam {self.url}")
        width, height, fps = self._requested
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps:
            cap.set(cv2.CAP_PROP_FPS, fps)
        got = (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT), cap.get(cv2.CAP_PROP_FPS))
        if any(r and abs(r - g) > 0.5 for r, g in zip(self._requested, got, strict=True)):
            log.warning("webcam %s: asked for %s, device gives %s", self.url, self._requested, got)
        self._cap = cap

    def frames(self, wanted: WantedHint | None = None) -> Iterator[DecodedFrame]:
        import cv2

        if self._cap is None:
            raise SourceError("source is not open")
        width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        started = time.monotonic()
        while True:
            if not self._cap.grab():
                raise SourceError(f"webcam {self.url} stopped delivering frames")
            self.frames_in += 1
            yield _CVFrame(self._cap, time.monotonic() - started, width, height)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def make_source(cfg: SourceConfig) -> Source:
    """The source for a config entry, chosen by its URL."""
    kind = cfg.kind
    if kind == "push":
        raise SourceError(f"source {cfg.name!r} is pushed into (url 'push'): there is nothing to read")
    if kind == "demo":
        w, h = cfg.width or DEMO_SIZE[0], cfg.height or DEMO_SIZE[1]
        fps = cfg.fps or DEMO_FPS
        return PyAVSource(
            f"testsrc2=size={w}x{h}:rate={fps:g}",
            format="lavfi",
            paced=cfg.realtime,
            stamp_frames=True,
        )
    if kind == "webcam":
        return OpenCVSource(cfg.url, width=cfg.width, height=cfg.height, fps=cfg.fps)
    if kind == "rtsp":
        options: dict[str, str] = {"fflags": "nobuffer", "flags": "low_delay"}
        if cfg.url.lower().startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = cfg.transport
        return PyAVSource(
            cfg.url, options=options, open_timeout_s=cfg.open_timeout_s, read_timeout_s=cfg.stall_timeout_s
        )
    path = cfg.url[len("file://") :] if cfg.url.startswith("file://") else cfg.url
    source = PyAVSource(path, loop=cfg.loop, paced=cfg.realtime)
    source.finite = not cfg.loop
    return source
