"""streamer in front of vLLM against a naive client that sends the same asks straight to vLLM.

Starts a real vLLM (CPU, tiny model: ``.ci/install-vllm``, ``$STREAMER_VLLM_PYTHON``) and a
real ``streamer serve`` with ``model.backend: openai`` whose one stream is a video file read
once (its window then holds still). Each round sends ``--asks`` questions at once:

- through streamer: WebSocket clients ask about the stream; streamer sends the window's
  frames, JPEG-encoded once when they entered the window, to vLLM;
- naive: an OpenAI client sends the same number of frames of the same size (the same
  frames inverted, so that its window is new to vLLM too) straight to vLLM, JPEG-encoding
  every frame again for every request.

One request on other frames warms vLLM up first.

Prints, per path: throughput (generated tokens per second of the round), median time to
first token (from sending the ask, or from starting to build the request), bytes the asking
client sent, bytes sent to vLLM, and the ratios streamer / naive, for the first (cold:
vLLM has not seen the window) and the other rounds (warm: the window is in vLLM's prefix
cache on both paths), all measured in the same run.

    STREAMER_VLLM_PYTHON=... python benchmarks/remote_vllm.py --asks 8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import av
import cv2
import numpy as np
import websockets
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the vLLM launcher the tests use

from streamer.benchmark.clips import write_video  # noqa: E402
from streamer.benchmark.servers import start_server  # noqa: E402
from streamer.inference.jpeg_window import encode_jpeg  # noqa: E402
from streamer.inference.tiny import ensure_tiny_model  # noqa: E402
from tests.vllm_server import SERVED_NAME, VllmServer, free_port  # noqa: E402


def healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        return json.loads(r.read())


async def streamer_round(url: str, asks: int, tokens: int, round_no: int) -> dict:
    """``asks`` WebSocket clients ask at once; per ask: (ttft_s, tokens); and bytes sent."""
    sent = 0

    async def one(i: int) -> tuple[float, int]:
        nonlocal sent
        async with websockets.connect(url, max_size=None) as ws:
            await ws.recv()  # welcome
            message = json.dumps(
                {
                    "type": "ask",
                    "id": "q",
                    "stream": "still",
                    "question": f"Question {round_no}.{i}?",
                    "max_new_tokens": tokens,
                }
            )
            sent += len(message.encode())
            started = time.monotonic()
            await ws.send(message)
            first = None
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "token" and first is None:
                    first = time.monotonic() - started
                if m["type"] == "answer":
                    return (first if first is not None else time.monotonic() - started), len(m["token_ids"])
                if m["type"] == "error":
                    raise SystemExit(f"streamer answered an error: {m}")

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(asks)))
    return {
        "wall": time.monotonic() - started,
        "ttft": [r[0] for r in results],
        "tokens": sum(r[1] for r in results),
        "client_bytes": sent,
    }


async def naive_round(
    base_url: str, frames: list[np.ndarray], asks: int, tokens: int, round_no: int, quality: int
) -> dict:
    """``asks`` requests at once straight to vLLM, each encoding its frames itself."""
    import openai

    sent = 0

    async def count(request) -> None:
        nonlocal sent
        sent += len(request.content)

    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="none",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]}),
    )

    async def one(i: int) -> tuple[float, int]:
        started = time.monotonic()
        encoded = []
        for rgb in frames:  # what a client without a per-frame cache does for every request
            encoded.append(base64.b64encode(encode_jpeg(rgb, quality)).decode())
        video = {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(encoded)}}
        stream = await client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": [video, {"type": "text", "text": f"Question {round_no}.{i}?"}]}],
            max_tokens=tokens,
            temperature=0.0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        first, count_tokens = None, 0
        async for chunk in stream:
            for choice in chunk.choices:
                ids = getattr(choice, "token_ids", None) or []
                if ids and first is None:
                    first = time.monotonic() - started
                count_tokens += len(ids)
        return (first if first is not None else time.monotonic() - started), count_tokens

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(asks)))
    wall = time.monotonic() - started
    await client.close()
    return {"wall": wall, "ttft": [r[0] for r in results], "tokens": sum(r[1] for r in results), "client_bytes": sent}


def summary(rounds: list[dict]) -> dict:
    return {
        "throughput": statistics.median(r["tokens"] / r["wall"] for r in rounds),
        "ttft": statistics.median(t for r in rounds for t in r["ttft"]),
        "client_bytes": statistics.median(r["client_bytes"] / len(r["ttft"]) for r in rounds),
        "vllm_bytes": statistics.median(r["vllm_bytes"] / len(r["ttft"]) for r in rounds),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asks", type=int, default=8, help="questions sent at once per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per path (the first is cold)")
    p.add_argument("--frames", type=int, default=8, help="frames per question")
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--height", type=int, default=336)
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, both paths")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="streamer-remote-bench-"))
    model_dir = ensure_tiny_model()
    rng = np.random.default_rng(16)
    pictures = [
        cv2.resize(
            rng.integers(0, 256, (args.height // 16, args.width // 16, 3), dtype=np.uint8), (args.width, args.height)
        )
        for _ in range(args.frames + 4)
    ]
    video = write_video(work / "still.avi", pictures, codec="mjpeg", pix_fmt="yuvj420p", fps=4)
    with av.open(str(video)) as container:  # the naive client's frames: the file's last ones, decoded once
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # The same frames inverted: as costly to send, but a window vLLM has not seen, so each
    # path's first round is cold for its own window.
    naive_frames = [255 - f for f in decoded[-args.frames :]]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on a kill too
    vllm = VllmServer(model_dir, free_port(), work / "vllm.log")
    print(f"starting vLLM ({vllm.base_url}) ...", flush=True)
    try:
        vllm.start()
        runs, backend = run_rounds(args, vllm, video, naive_frames, work)
    finally:
        vllm.stop()
    print_results(args, runs, backend, work)
    return 0


def run_rounds(
    args: argparse.Namespace, vllm: VllmServer, video: Path, naive_frames: list[np.ndarray], work: Path
) -> tuple[dict[str, list[dict]], dict]:
    """Start streamer in front of ``vllm`` and run the rounds of both paths."""
    config = {
        "sources": [
            {
                "name": "still",
                "url": str(video),
                "sample_fps": 4,
                "max_side": max(args.width, args.height),
                "loop": False,
                "realtime": False,
            }
        ],
        "model": {
            "id": SERVED_NAME,
            "backend": "openai",
            "base_url": vllm.base_url,
            "frames": args.frames,
            "max_new_tokens": args.tokens,
            "max_batch": args.asks,
            "batch_window_ms": 20,
            "jpeg_quality": args.quality,
        },
        "server": {"queue_size": max(32, args.asks * 2), "asks_per_minute": 100_000},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    server = start_server(["--config", str(work / "config.yaml")], work / "streamer.log", timeout=600)
    proc, url, port = server.proc, server.url, server.port
    try:
        while (healthz(port)["streams"][0]["frames_buffered"] or 0) < args.frames:
            time.sleep(0.2)
        # vLLM's first multimodal request is slow whoever sends it: one on other frames first.
        warm_up = [np.ascontiguousarray(f[::-1]) for f in naive_frames]
        asyncio.run(naive_round(vllm.base_url, warm_up, 1, args.tokens, -1, args.quality))
        runs: dict[str, list[dict]] = {"streamer": [], "naive": []}
        for r in range(args.rounds):
            order = ["streamer", "naive"] if r % 2 == 0 else ["naive", "streamer"]
            for path in order:
                if path == "streamer":
                    before = healthz(port)["model"]["backends"][0]["request_bytes"]
                    result = asyncio.run(streamer_round(url, args.asks, args.tokens, r))
                    result["vllm_bytes"] = healthz(port)["model"]["backends"][0]["request_bytes"] - before
                else:
                    result = asyncio.run(
                        naive_round(vllm.base_url, naive_frames, args.asks, args.tokens, r, args.quality)
                    )
                    result["vllm_bytes"] = result["client_bytes"]
                runs[path].append(result)
        backend = healthz(port)["model"]["backends"][0]
    finally:
        proc.terminate()
        proc.wait(30)
    return runs, backend


def print_results(args: argparse.Namespace, runs: dict[str, list[dict]], backend: dict, work: Path) -> None:
    print(
        f"\n{args.asks} asks at once per round, {args.frames} frames of {args.width}x{args.height}, "
        f"{args.tokens} tokens per answer, JPEG quality {args.quality}; tiny model on vLLM CPU; "
        f"{args.rounds} rounds per path, alternating which goes first"
    )
    for case, pick in (
        ("cold (round 1: window new to vLLM)", slice(0, 1)),
        ("warm (rounds 2+: window in vLLM's prefix cache)", slice(1, None)),
    ):
        s, n = summary(runs["streamer"][pick]), summary(runs["naive"][pick])
        print(f"\n{case}")
        print(f"  {'':28}{'streamer':>14}{'naive':>14}{'ratio':>10}")
        rows = [
            ("throughput (tokens/s)", "throughput", "{:.1f}"),
            ("time to first token (s)", "ttft", "{:.3f}"),
            ("bytes sent by the client/ask", "client_bytes", "{:,.0f}"),
            ("bytes sent to vLLM/ask", "vllm_bytes", "{:,.0f}"),
        ]
        for label, key, fmt in rows:
            print(f"  {label:28}{fmt.format(s[key]):>14}{fmt.format(n[key]):>14}{s[key] / n[key]:>10.3f}")
    print(
        f"\nstreamer's server: {backend['prompt_tokens']} prompt tokens sent, {backend['cached_prompt_tokens']} "
        f"served from vLLM's prefix cache; logs in {work}"
    )


if __name__ == "__main__":
    sys.exit(main())
