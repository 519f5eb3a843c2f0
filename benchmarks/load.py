"""Load: many WebSocket clients on loopback against a real `streamer serve` process.

Starts the server (demo config: synthetic source, tiny random model) in a subprocess, then
opens ``--watchers`` clients subscribed to previews and ``--askers`` clients asking one
question after another for ``--seconds``. Prints messages/s received, preview images/s,
answers/s, time-to-first-token percentiles (seen by the client, and as the server timed
it), the server's CPU use, and every error by code. Errors other than ``busy`` and
``rate_limited`` (both by design under overload) make it exit 1.

    python benchmarks/load.py --watchers 200 --askers 50 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import websockets

from streamer.benchmark.servers import start_server, stop_server
from streamer_client import Client

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_ERRORS = {"busy", "rate_limited"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stats:
    def __init__(self) -> None:
        self.messages = 0
        self.previews = 0
        self.answers = 0
        self.errors: Counter[str] = Counter()
        self.ttft_client: list[float] = []
        self.ttft_server: list[float] = []
        self.connect_failures = 0


async def watcher(url: str, stats: Stats, stop: asyncio.Event, preview_fps: float) -> None:
    try:
        async with await Client.connect(url, open_timeout=30) as client:
            await client.send({"type": "subscribe", "stream": "demo", "preview_fps": preview_fps, "max_width": 320})
            while not stop.is_set():
                try:
                    frame = await client.receive(0.5)
                except TimeoutError:
                    continue
                stats.messages += 1
                if isinstance(frame, bytes):
                    stats.previews += 1
                elif frame["type"] == "error":
                    stats.errors[frame["code"]] += 1
    except (OSError, websockets.WebSocketException):
        stats.connect_failures += 1


async def asker(url: str, n: int, stats: Stats, stop: asyncio.Event, max_new_tokens: int) -> None:
    try:
        async with await Client.connect(url, open_timeout=30) as client:
            k = 0
            while not stop.is_set():
                k += 1
                sent = time.monotonic()
                first: float | None = None
                qid = await client.send_ask("demo", "What is moving?", id=f"a{n}-{k}", max_new_tokens=max_new_tokens)
                async for m in client.messages_of(qid, timeout=None):
                    stats.messages += 1
                    if m["type"] == "token" and first is None:
                        first = time.monotonic() - sent
                    elif m["type"] == "answer":
                        stats.answers += 1
                        if first is not None:
                            stats.ttft_client.append(first)
                        if m["timings"]["first_token_ms"] is not None:
                            stats.ttft_server.append(m["timings"]["first_token_ms"] / 1000)
                    elif m["type"] == "error":
                        stats.errors[m["code"]] += 1
                        await asyncio.sleep(0.5)  # busy or rate limited: back off a little
                stats.messages += len(client.pending)  # the others it passed over (the welcome)
                client.pending.clear()
    except (OSError, websockets.WebSocketException):
        stats.connect_failures += 1


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f} ms" if values else "-"


async def run(url: str, args: argparse.Namespace, pid: int) -> Stats:
    stats = Stats()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(watcher(url, stats, stop, args.preview_fps)) for _ in range(args.watchers)]
    tasks += [asyncio.create_task(asker(url, i, stats, stop, args.max_new_tokens)) for i in range(args.askers)]
    await asyncio.sleep(2)  # connections settle
    stats.messages = stats.previews = stats.answers = 0
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats.elapsed, stats.cpu = elapsed, cpu  # type: ignore[attr-defined]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=200, help="clients subscribed to previews")
    parser.add_argument("--askers", type=int, default=50, help="clients asking questions back to back")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--preview-fps", type=float, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "server.log"
    # Generous per-connection limits: the benchmark measures the server, not its rate limiter.
    server = start_server(["--config", str(ROOT / "configs" / "demo.yaml")], log, timeout=600)
    try:
        stats = asyncio.run(run(server.url, args, server.proc.pid))
    finally:
        stop_server(server)
    el = stats.elapsed  # type: ignore[attr-defined]
    print(f"clients: {args.watchers} watching previews at {args.preview_fps:g} fps, {args.askers} asking; {el:.0f} s")
    print(f"messages/s received   {stats.messages / el:10.1f}")
    print(f"preview images/s      {stats.previews / el:10.1f}")
    print(f"answers/s             {stats.answers / el:10.2f}")
    print(f"ttft client p50/p99   {pct(stats.ttft_client, 50)} / {pct(stats.ttft_client, 99)}")
    print(f"ttft server p50/p99   {pct(stats.ttft_server, 50)} / {pct(stats.ttft_server, 99)}")
    print(f"server cpu            {stats.cpu / el:10.2f} cores")  # type: ignore[attr-defined]
    print(f"errors                {dict(stats.errors) or 'none'}; failed connections {stats.connect_failures}")
    unexpected = {k: v for k, v in stats.errors.items() if k not in EXPECTED_ERRORS}
    if unexpected or stats.connect_failures:
        print(f"UNEXPECTED: {unexpected}, connection failures {stats.connect_failures}\n{log.read_text()[-3000:]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
