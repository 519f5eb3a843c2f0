from __future__ import annotations

import threading

import numpy as np
import pytest

from streamer.capture.ring import RingBuffer


def _rgb(value: int = 0) -> np.ndarray:
    return np.full((4, 6, 3), value, dtype=np.uint8)


def test_latest_returns_newest_in_order_without_copying() -> None:
    ring = RingBuffer(5)
    arrays = [_rgb(i) for i in range(8)]
    for a in arrays:
        ring.push(a, ts=100.0 + len(ring))
    frames = ring.latest(3)
    assert [f.seq for f in frames] == [5, 6, 7]
    assert all(f.rgb is arrays[f.seq] for f in frames)  # same array objects: no pixel copy
    assert len(ring) == 5
    assert [f.seq for f in ring.latest(100)] == [3, 4, 5, 6, 7]
    assert ring.latest(0) == []


def test_seq_increases_and_frames_are_read_only() -> None:
    ring = RingBuffer(2)
    assert ring.newest_seq is None and ring.newest() is None
    a = ring.push(_rgb(), ts=1.0, pts=0.5)
    b = ring.push(_rgb(), ts=2.0)
    assert (a.seq, b.seq) == (0, 1) and ring.newest_seq == 1
    assert a.ts == 1.0 and a.pts == 0.5 and b.pts is None
    assert (a.width, a.height) == (6, 4)
    with pytest.raises(ValueError):
        a.rgb[0, 0, 0] = 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RingBuffer(0)


def test_concurrent_writer_and_readers_see_consistent_windows() -> None:
    ring = RingBuffer(16)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            seqs = [f.seq for f in ring.latest(8)]
            if seqs != sorted(seqs) or (seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs)))):
                problems.append(f"non-contiguous window {seqs}")

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(5000):
        ring.push(_rgb(i % 255))
    stop.set()
    for t in readers:
        t.join()
    assert problems == []
    assert ring.newest_seq == 4999 and len(ring) == 16


def test_wait_for_frame_after() -> None:
    ring = RingBuffer(4)
    assert ring.wait_for_frame_after(None, timeout=0.05) is None
    threading.Timer(0.05, lambda: ring.push(_rgb())).start()
    frame = ring.wait_for_frame_after(None, timeout=5)
    assert frame is not None and frame.seq == 0
    assert ring.wait_for_frame_after(0, timeout=0.05) is None
