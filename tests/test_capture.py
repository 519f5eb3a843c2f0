"""Capture: sampling by timestamp, the demo source, files (paced, looping, ending, corrupt)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from streamer.benchmark.clips import write_video
from streamer.capture import CaptureThread, TimestampSampler, mask_url
from streamer.capture.sources import fit_within
from streamer.config import SourceConfig


def write_test_video(path: Path, *, seconds: float, fps: int, size: tuple[int, int] = (160, 120)) -> Path:
    """An H.264 file whose frame i is filled with the grey level 8 i (to check order)."""
    frames = (np.full((size[1], size[0], 3), (i * 8) % 256, dtype=np.uint8) for i in range(int(seconds * fps)))
    return write_video(path, frames, fps=fps)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sampler_keeps_one_frame_per_interval_of_media_time() -> None:
    sampler = TimestampSampler(2.0)
    kept = [i for i in range(90) if sampler.keep(i / 30)]  # 3 s at 30 fps
    assert kept == [0, 15, 30, 45, 60, 75]


def test_sampler_follows_timestamps_not_frame_counts() -> None:
    sampler = TimestampSampler(1.0)
    # Variable frame rate: dense then sparse frames; one kept per second of media time.
    times = [0.0, 0.1, 0.2, 0.3, 1.0, 1.05, 2.5, 2.6, 3.0, 3.5, 4.0]
    kept = [t for t in times if sampler.keep(t)]
    assert kept == [0.0, 1.0, 2.5, 3.0, 4.0]  # stays on the 1 s grid across a short gap
    sampler = TimestampSampler(1.0)
    kept = [t for t in [0.0, 5.0, 5.5, 6.0, 6.5, 7.0] if sampler.keep(t)]
    assert kept == [0.0, 5.0, 6.0, 7.0]  # a long gap re-anchors the grid at the next frame


def test_fit_within_keeps_aspect_and_even_sizes() -> None:
    assert fit_within(1920, 1080, 640) == (640, 360)
    assert fit_within(320, 240, 640) == (320, 240)
    w, h = fit_within(1001, 999, 100)
    assert max(w, h) <= 100 and w % 2 == 0 and h % 2 == 0


def test_mask_url_hides_credentials() -> None:
    assert mask_url("rtsp://admin:hunter2@10.0.0.5:554/live") == "rtsp://***@10.0.0.5:554/live"
    assert mask_url("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"


def test_demo_source_is_sampled_at_sample_fps() -> None:
    capture = CaptureThread(SourceConfig(name="demo", url="demo", sample_fps=4, max_side=320, buffer_frames=64))
    capture.start()
    try:
        assert wait_until(lambda: len(capture.ring) >= 9, timeout=15)
        status = capture.status()
    finally:
        capture.stop()
    assert not capture.is_alive()
    frames = capture.ring.latest(9)
    gaps = np.diff([f.pts for f in frames])
    # Sampling follows presentation time, which a loaded machine cannot disturb: 0.25 s of
    # media time, rounded to the 15 fps frame grid (4/15 or 3/15 s), 0.25 s on average.
    assert set(np.round(gaps * 15).astype(int)) <= {3, 4}, gaps
    assert gaps.mean() == pytest.approx(0.25, abs=1 / 15)
    # Paced at real time: 8 intervals of media time cannot pass faster than 2 s of wall time
    # (a little slack for timer jitter); on a loaded machine they may take longer.
    wall = frames[-1].ts - frames[0].ts
    assert wall > 1.8, wall
    assert frames[0].rgb.shape == (240, 320, 3) and frames[0].rgb.dtype == np.uint8
    assert status.status == "live" and (status.width, status.height) == (320, 240)
    # Rates are measured over wall time: never above the source's, however loaded the machine.
    assert 0 < status.fps_in <= 15 * 1.2 and 0 < status.fps_sampled <= 4 * 1.2, status


def test_file_loops_with_increasing_seq_and_pts(tmp_path: Path) -> None:
    video = write_test_video(tmp_path / "clip.mp4", seconds=1.0, fps=10)
    cfg = SourceConfig(name="clip", url=str(video), sample_fps=5, realtime=True, loop=True, buffer_frames=32)
    capture = CaptureThread(cfg)
    capture.start()
    try:
        assert wait_until(lambda: len(capture.ring) >= 8, timeout=10)
    finally:
        capture.stop()
    frames = capture.ring.latest(8)
    assert [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + 8))
    pts = [f.pts for f in frames]
    assert pts == sorted(pts) and pts[-1] >= 1.0  # played past the 1 s end: looped
    # Grey levels repeat after the loop: frame i has level 8 * i.
    levels = [int(f.rgb[0, 0, 0]) for f in frames]
    assert levels[0] in (0, 16, 32, 48, 64) and len(set(levels)) == 5
    assert capture.status().reconnects == 0


def test_file_without_loop_ends_as_down(tmp_path: Path) -> None:
    video = write_test_video(tmp_path / "once.mp4", seconds=2.0, fps=10)
    cfg = SourceConfig(name="once", url=str(video), sample_fps=2, realtime=False, loop=False)
    capture = CaptureThread(cfg)
    capture.start()
    assert wait_until(lambda: not capture.is_alive(), timeout=10)
    status = capture.status()
    assert status.status == "down" and status.error == "end of file"
    assert [f.seq for f in capture.ring.latest(10)] == [0, 1, 2, 3]
    assert [f.pts for f in capture.ring.latest(10)] == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_corrupt_file_is_reported_not_raised(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    capture = CaptureThread(SourceConfig(name="bad", url=str(bad), loop=False))
    capture.start()
    try:
        assert wait_until(lambda: capture.status().status == "down", timeout=10)
        status = capture.status()
    finally:
        capture.stop()
    assert not capture.is_alive()
    assert status.error and "corrupt.mp4" in status.error
    assert len(capture.ring) == 0
