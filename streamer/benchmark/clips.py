"""Video files made from frames: the benchmark's input clip, and the tests' clips.

Written with PyAV, read back by streamer's own sources like any other file."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    codec: str = "libx264",
    fps: int = 10,
    pix_fmt: str = "yuv420p",
    container_format: str | None = None,
    first_pts: int = 0,
) -> Path:
    """Encode ``H x W x 3`` uint8 RGB frames, one per ``1 / fps`` seconds, into ``path``.

    ``codec="ffv1", pix_fmt="bgr0"`` is lossless RGB (a reader decodes exactly these
    pixels); ``mjpeg`` encodes every frame on its own; ``libx264`` is what cameras send.
    ``first_pts`` lets clips be concatenated (MPEG-TS) with increasing timestamps.
    """
    import av

    path = Path(path)
    stream = None
    with av.open(str(path), "w", format=container_format) as out:
        for i, rgb in enumerate(frames):
            if stream is None:
                stream = out.add_stream(codec, rate=fps)
                stream.width, stream.height = rgb.shape[1], rgb.shape[0]
                stream.pix_fmt = pix_fmt
                stream.time_base = Fraction(1, fps)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format=pix_fmt)
            frame.pts = first_pts + i
            for packet in stream.encode(frame):
                out.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                out.mux(packet)
    return path
