"""Soak: capture a live RTSP stream for minutes and watch the process's memory (RSS).

Starts a real GStreamer RTSP server (tests/rtsp_server.py, needs Debian's GStreamer RTSP
packages), captures it with streamer's ``CaptureThread``, restarts the server every
``--restart-every`` seconds to exercise reconnects, samples RSS every ``--every`` seconds,
and prints the samples and the growth between the first and the last minute.

    python benchmarks/capture_soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.capture import CaptureThread  # noqa: E402
from streamer.config import SourceConfig  # noqa: E402
from tests.rtsp import RtspServer  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--restart-every", type=float, default=60.0, help="seconds between server restarts (0: never)")
    parser.add_argument("--size", default="1280x720")
    args = parser.parse_args()

    server = RtspServer(size=args.size, fps=15).start()
    cfg = SourceConfig(name="soak", url=server.url, sample_fps=2, buffer_frames=64, stall_timeout_s=3, backoff_max_s=2)
    capture = CaptureThread(cfg)
    capture.start()
    start = time.monotonic()
    end = start + args.minutes * 60
    samples: list[tuple[float, float, int, int]] = []
    next_restart = start + args.restart_every if args.restart_every else float("inf")
    print(f"{'t_s':>6} {'rss_mib':>8} {'last_seq':>8} {'reconnects':>10} {'threads':>7} status")
    try:
        while time.monotonic() < end:
            time.sleep(args.every)
            now = time.monotonic()
            if now >= next_restart:
                server.kill()
                time.sleep(1)
                server.start()
                next_restart = now + args.restart_every
            st = capture.status()
            samples.append((now - start, rss_mib(), st.last_seq or 0, st.reconnects))
            print(
                f"{now - start:6.0f} {samples[-1][1]:8.1f} {st.last_seq or 0:8d} {st.reconnects:10d} "
                f"{threading.active_count():7d} {st.status}",
                flush=True,
            )
    finally:
        capture.stop()
        server.kill()
    # The first minute fills the ring buffer (64 frames): compare the second minute, when
    # memory should have settled, with the last one.
    second = [s[1] for s in samples if 60 <= s[0] < 120] or [samples[0][1]]
    last = [s[1] for s in samples if s[0] >= samples[-1][0] - 60]
    a, b = sum(second) / len(second), sum(last) / len(last)
    print(
        f"rss_second_minute_mib={a:.1f} rss_last_minute_mib={b:.1f} growth_mib={b - a:+.1f} "
        f"max_mib={max(s[1] for s in samples):.1f} frames={samples[-1][2] + 1} reconnects={samples[-1][3]}"
    )


if __name__ == "__main__":
    main()
