"""Capture against a real RTSP server (GStreamer), a silent camera, and resolution changes."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamer.benchmark.clips import write_video
from streamer.capture import CaptureThread, StreamStatus
from streamer.capture.sources import OpenCVSource
from streamer.config import SourceConfig
from tests.rtsp import RtspServer, require_gstreamer
from tests.test_capture import wait_until, write_test_video

pytestmark = pytest.mark.slow


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def rtsp_server() -> Iterator[RtspServer]:
    require_gstreamer()
    server = RtspServer().start()
    yield server
    server.kill()


def _rtsp_config(url: str, **extra) -> SourceConfig:
    values = dict(sample_fps=4, stall_timeout_s=2, open_timeout_s=2, backoff_initial_s=0.2, backoff_max_s=1)
    values.update(extra)
    return SourceConfig(name="cam", url=url, **values)


def test_rtsp_frames_arrive_and_survive_five_server_restarts(rtsp_server: RtspServer) -> None:
    changes: list[StreamStatus] = []
    capture = CaptureThread(_rtsp_config(rtsp_server.url), on_status=changes.append)
    capture.start()
    try:
        assert wait_until(lambda: len(capture.ring) >= 3, timeout=20), capture.status()
        first = capture.status()
        assert first.status == "live" and (first.width, first.height) == (320, 240)
        baseline_threads = threading.active_count(), _os_threads()
        last_seq = capture.ring.newest_seq
        for cycle in range(5):
            rtsp_server.kill()
            killed_at = time.monotonic()
            assert wait_until(lambda: capture.status().status in ("down", "connecting"), timeout=10)
            # Noticed within the stall watchdog time (2 s), plus generous slack for a loaded
            # machine; without the watchdog a silent socket would go unnoticed far longer.
            assert time.monotonic() - killed_at <= 2 + 6, f"cycle {cycle}"
            buffered = capture.ring.newest_seq
            assert buffered is not None and len(capture.ring) > 0  # frames kept while reconnecting
            rtsp_server.start()
            assert wait_until(lambda b=buffered: (capture.ring.newest_seq or 0) > b + 2, timeout=20), capture.status()
            assert capture.status().status == "live"
            assert capture.ring.newest_seq > last_seq  # seq continues across reconnects
            last_seq = capture.ring.newest_seq
        status = capture.status()
        assert status.reconnects >= 5
        # No thread leak: the same Python threads, and FFmpeg's native threads come and go
        # (they may take a moment to exit after the last reconnect).
        assert wait_until(lambda: threading.active_count() == baseline_threads[0], timeout=10), threading.enumerate()
        assert wait_until(lambda: _os_threads() <= baseline_threads[1] + 2, timeout=10), _os_threads()
    finally:
        capture.stop()
    assert not capture.is_alive()
    states = [c.status for c in changes]
    assert states.count("live") >= 6 and "down" in states


def test_silent_camera_times_out_with_growing_backoff_without_blocking_others() -> None:
    """A loopback port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                pass

    acceptor = threading.Thread(target=accept_forever, daemon=True)
    acceptor.start()
    port = listener.getsockname()[1]
    silent = CaptureThread(
        _rtsp_config(f"rtsp://127.0.0.1:{port}/live", open_timeout_s=1, backoff_initial_s=0.3, backoff_max_s=2)
    )
    demo = CaptureThread(SourceConfig(name="demo", url="demo", sample_fps=4, max_side=160))
    silent.start()
    demo.start()
    backoffs: list[float] = []
    try:
        # Until three attempts have backed off and the demo has sampled for about 9 s (at its
        # 4 fps), however long that takes on a loaded machine.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            b = silent.status().backoff_s
            if b and (not backoffs or b != backoffs[-1]):
                backoffs.append(b)
            if len(backoffs) >= 4 and silent.status().reconnects >= 3 and demo.status().frames_sampled >= 35:
                break
            time.sleep(0.05)
        silent_status, demo_status = silent.status(), demo.status()
    finally:
        stop.set()
        silent.stop()
        demo.stop()
        acceptor.join(5)  # before the listener closes under it
        for conn in accepted:
            conn.close()
        listener.close()
    assert silent_status.status in ("down", "connecting")
    assert silent_status.error and "cannot open" in silent_status.error
    assert silent_status.reconnects >= 3
    assert len(accepted) >= 3  # each attempt really connected and then gave up
    # Backoff grows (x2 with +-20 % jitter) and stays under its bound (plus jitter).
    assert len(backoffs) >= 3 and backoffs[2] > backoffs[0] * 1.5
    assert max(backoffs) <= 2 * 1.2
    # Meanwhile the other source kept sampling at its rate.
    assert demo_status.status == "live" and demo_status.frames_sampled >= 35


def test_credentials_never_reach_status_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    capture = CaptureThread(_rtsp_config("rtsp://admin:hunter2@127.0.0.1:9/x", open_timeout_s=1))
    with caplog.at_level(logging.INFO):
        capture.start()
        assert wait_until(lambda: capture.status().error is not None, timeout=10)
        capture.stop()
    assert "hunter2" not in (capture.status().error or "")
    assert "hunter2" not in caplog.text
    assert "***@127.0.0.1" in caplog.text


def _h264_ts(path: Path, size: tuple[int, int], frames: int, first_pts: int) -> bytes:
    grey = np.full((size[1], size[0], 3), 100, np.uint8)
    return write_video(path, [grey] * frames, container_format="mpegts", first_pts=first_pts).read_bytes()


def test_resolution_change_mid_stream_is_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clip = tmp_path / "changes.ts"
    clip.write_bytes(_h264_ts(tmp_path / "a.ts", (320, 240), 20, 0) + _h264_ts(tmp_path / "b.ts", (640, 360), 20, 20))
    capture = CaptureThread(SourceConfig(name="ts", url=str(clip), sample_fps=5, realtime=False, loop=False))
    with caplog.at_level(logging.WARNING):
        capture.start()
        assert wait_until(lambda: not capture.is_alive(), timeout=20)
    sizes = [f.rgb.shape[:2] for f in capture.ring.latest(64)]
    assert (240, 320) in sizes and (360, 640) in sizes
    assert "resolution changed from 320x240 to 640x360" in caplog.text
    assert capture.status().error == "end of file"


def test_opencv_capture_path_grabs_all_and_converts_only_kept_frames(tmp_path: Path) -> None:
    """The webcam code path (OpenCV grab/retrieve), fed from a file instead of a device."""
    video = write_test_video(tmp_path / "cam.mp4", seconds=2.0, fps=10, size=(320, 240))
    source = OpenCVSource(str(video), width=None, height=None, fps=None)
    source.open()
    kept = []
    try:
        for i, frame in enumerate(source.frames()):
            if i % 5 == 0:
                kept.append(frame.to_rgb(160))
            if i == 19:
                break
    finally:
        source.close()
    assert source.frames_in == 20
    assert [k.shape for k in kept] == [(120, 160, 3)] * 4
    assert [int(k[60, 80, 0]) for k in kept] == pytest.approx([0, 40, 80, 120], abs=3)
