"""CPU cost of capture: streamer's path against a naive OpenCV read()-every-frame loop.

Decodes a 1080p30 H.264 file (made on first run with libx264's default settings: B-frames,
keyframe every 250 frames) sampled at 2 fps, and prints CPU-seconds per second of video
for, in the same run:

- naive: ``cv2.VideoCapture.read()`` on every frame (decode + BGR conversion of each),
  keeping every 15th frame, converted to RGB and resized like streamer's;
- pyav-all: PyAV decoding every frame, converting only the kept ones (no skip hints);
- streamer: the real ``CaptureThread`` (PyAV, non-reference frames that will not be kept
  are not decoded, only kept frames converted).

    python benchmarks/capture_decode.py [--seconds 20] [--fps 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from streamer.capture import CaptureThread, TimestampSampler
from streamer.capture.sources import PyAVSource, fit_within
from streamer.config import SourceConfig

MAX_SIDE = 640


def make_clip(path: Path, seconds: int, fps: int = 30, size: tuple[int, int] = (1920, 1080)) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"encoding a {size[0]}x{size[1]} {fps} fps H.264 test clip of {seconds} s (once) ...", flush=True)
    tmp = path.with_suffix(".part.mp4")
    src = av.open(f"testsrc2=size={size[0]}x{size[1]}:rate={fps}", format="lavfi")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i, frame in enumerate(src.decode(video=0)):
            if i >= seconds * fps:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            frame.pict_type = av.video.frame.PictureType.NONE  # lavfi marks every frame I: let x264 choose
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    src.close()
    tmp.rename(path)
    return path


def naive_opencv(path: Path, sample_fps: float) -> int:
    cap = cv2.VideoCapture(str(path))
    every = round(cap.get(cv2.CAP_PROP_FPS) / sample_fps)
    kept, i = 0, 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if i % every == 0:
            w, h = fit_within(bgr.shape[1], bgr.shape[0], MAX_SIDE)
            cv2.cvtColor(cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
            kept += 1
        i += 1
    cap.release()
    return kept


def pyav_decode_all(path: Path, sample_fps: float) -> int:
    source = PyAVSource(str(path))
    source.open()
    sampler = TimestampSampler(sample_fps)
    kept = 0
    for frame in source.frames(wanted=None):
        if sampler.keep(frame.pts or 0.0):
            frame.to_rgb(MAX_SIDE)
            kept += 1
    source.close()
    return kept


def streamer_capture(path: Path, sample_fps: float) -> int:
    cfg = SourceConfig(
        name="bench", url=str(path), sample_fps=sample_fps, realtime=False, loop=False, max_side=MAX_SIDE
    )
    capture = CaptureThread(cfg)
    capture.start()
    while capture.is_alive():
        time.sleep(0.01)
    return capture.status().frames_sampled


def measure(fn, path: Path, sample_fps: float) -> tuple[float, float, int]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    kept = fn(path, sample_fps)
    return time.process_time() - cpu0, time.perf_counter() - wall0, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="length of the test clip")
    parser.add_argument("--fps", type=float, default=2.0, help="sample_fps")
    parser.add_argument("--clip", type=Path, help="use this file instead of the generated 1080p30 clip")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path (best is reported)")
    args = parser.parse_args()
    clip = args.clip or make_clip(
        Path(tempfile.gettempdir()) / f"streamer-bench-1080p30-{args.seconds}s-v2.mp4", args.seconds
    )
    with av.open(str(clip)) as c:
        s = c.streams.video[0]
        duration = float(s.frames / s.average_rate) if s.frames else float(c.duration / 1e6)
        desc = f"{s.width}x{s.height} {float(s.average_rate):g} fps {s.codec_context.name}, {duration:.1f} s"
    print(f"clip: {clip} ({desc}), sampled at {args.fps:g} fps, kept frames scaled to {MAX_SIDE} px")
    rows = {}
    for name, fn in [("naive", naive_opencv), ("pyav-all", pyav_decode_all), ("streamer", streamer_capture)]:
        runs = [measure(fn, clip, args.fps) for _ in range(args.repeat)]
        rows[name] = min(runs)
    base = rows["naive"][0] / duration
    print(f"{'path':<10} {'cpu_s/video_s':>14} {'wall_s':>8} {'kept':>6} {'vs naive':>9}")
    for name, (cpu, wall, kept) in rows.items():
        per = cpu / duration
        print(f"{name:<10} {per:>14.3f} {wall:>8.2f} {kept:>6} {per / base:>8.2f}x")
    ratio = (rows["streamer"][0] / duration) / base
    ours = rows["streamer"][0] / duration
    print(f"streamer_cpu_per_video_s={ours:.3f} naive_cpu_per_video_s={base:.3f} ratio={ratio:.2f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
