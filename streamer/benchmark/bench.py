"""``streamer bench``: streamer against the reference pipeline, on the same frames.

(a) The reference, in this process: ``qwen_vl_utils.process_vision_info`` + the processor +
``model.generate``, one question at a time, as the project's seed did.
(b) streamer end to end: a real ``streamer serve`` process on loopback, asked through the
WebSocket protocol, with its vision cache warmed by the frames it has already seen.

Both use the same model folder (a random-weight Qwen2-VL in Qwen2-VL-2B's shape, both
depths cut by one factor so the vision/LLM split of the work is kept, built once and
loaded with ``from_pretrained``), the same frames (written losslessly to the file the server
reads), the model's own generation settings (greedy) and the same number of new tokens.
Reported: time to first token and total time for one question, answers per second for N
simultaneous questions (streamer) against N sequential ones (reference), peak memory, and
whether every answer is the same, token id for token id (the server's ``answer`` carries
its ``token_ids``). A speed-up that changes an answer does not count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.benchmark.clips import write_video
from streamer.benchmark.servers import start_server, stop_server
from streamer.config import cache_dir
from streamer.inference.reference import reference_generate, reference_inputs, reference_text
from streamer_client import Client

# Qwen2-VL-2B-Instruct's shape (config.json on the Hub).
TEXT_2B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
VISION_2B = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16}
VOCAB_2B = 151936
BENCH_SEED = 20261125

QUESTIONS = [
    "What is moving in the video?",
    "Describe the scene.",
    "What colours do you see?",
    "Is there any text visible?",
    "How many objects are there?",
    "What changed between the first and the last frame?",
    "Is anyone in the picture?",
    "Where is the brightest part of the image?",
    "视频里有什么在动？",
    "ما الذي يتحرك في الفيديو؟",
    "What shape is in the middle?",
    "Is the camera moving?",
    "What is in the top left corner?",
    "Describe the background.",
    "What is the dominant colour?",
    "Summarise the video in one sentence.",
]


@dataclass(frozen=True)
class Scenario:
    depth_factor: int
    frames: int
    side: int
    clients: int
    new_tokens: int

    @property
    def name(self) -> str:
        return f"2b-depth-div{self.depth_factor}"


FULL = Scenario(depth_factor=4, frames=8, side=448, clients=8, new_tokens=16)
QUICK = Scenario(depth_factor=14, frames=4, side=336, clients=4, new_tokens=8)


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def bench_model(factor: int) -> Path:
    """The cached same-shape random model for ``factor`` (built on first use)."""
    from streamer.inference.tiny import build_model_folder

    folder = cache_dir() / f"bench-qwen2-vl-2b-div{factor}-v1"
    if (folder / "STREAMER_TINY_MODEL.json").is_file():
        return folder
    text = {**TEXT_2B, "num_hidden_layers": max(1, round(TEXT_2B["num_hidden_layers"] / factor))}
    vision = {**VISION_2B, "depth": max(1, round(VISION_2B["depth"] / factor))}
    say(
        f"building the benchmark model: Qwen2-VL-2B shape, depths /{factor} (text {text['num_hidden_layers']}, "
        f"vision {vision['depth']} layers), random weights; once, cached in {folder}"
    )
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-build-", dir=cache_dir()))
    build_model_folder(
        tmp,
        text=text,
        vision=vision,
        seed=BENCH_SEED,
        vocab_size=VOCAB_2B,
        tie_word_embeddings=True,
        marker={"note": "random weights in Qwen2-VL-2B's shape (benchmark): answers are gibberish"},
        progress=say,
    )
    tmp.rename(folder)
    return folder


def bench_frames(n: int, side: int) -> list[np.ndarray]:
    """Deterministic frames with structure and motion (and a little noise)."""
    rng = np.random.default_rng(BENCH_SEED)
    y, x = np.mgrid[0:side, 0:side]
    frames = []
    for i in range(n):
        cx, cy = side * (0.2 + 0.6 * i / max(1, n - 1)), side * 0.5
        disc = ((x - cx) ** 2 + (y - cy) ** 2) < (side * 0.12) ** 2
        img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y + 16 * i) % 256)], axis=-1).astype(np.uint8)
        img[disc] = (250, 250, 40)
        noise = rng.integers(-8, 9, img.shape)
        frames.append(np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8))
    return frames


# -- (a) the reference pipeline ------------------------------------------------------------


class _FirstToken:
    """A ``streamer=`` for generate that notes when the first new token comes."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first_at: float | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first_at is None:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def reference_answer(
    model: Any, processor: Any, frames: list[np.ndarray], question: str, sc: Scenario, cfg: Any
) -> tuple[list[int], str, float, float]:
    """One question through the seed's pipeline: (token ids, text, ttft_s, total_s)."""
    started = time.perf_counter()
    inputs = reference_inputs(processor, frames, question, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    first = _FirstToken()
    ids = reference_generate(model, inputs, max_new_tokens=sc.new_tokens, streamer=first)
    total = time.perf_counter() - started
    return ids, reference_text(processor, ids), (first.first_at or time.perf_counter()) - started, total


# -- (b) streamer over its WebSocket server ----------------------------------------------------


async def ask_streamer(url: str, question: str, qid: str, new_tokens: int) -> tuple[list[int], str, float, float]:
    """One question over the WebSocket: (token ids, text, ttft_s, total_s)."""
    async with await Client.connect(url, open_timeout=60) as client:
        await client.welcome()
        started = time.perf_counter()
        first: float | None = None
        await client.send_ask("bench", question, id=qid, max_new_tokens=new_tokens)
        async for m in client.messages_of(qid, timeout=None):
            if m["type"] == "token" and first is None:
                first = time.perf_counter()
            elif m["type"] == "answer":
                end = time.perf_counter()
                return m["token_ids"], m["text"], (first or end) - started, end - started
            elif m["type"] == "error":
                raise RuntimeError(f"streamer answered {m['code']}: {m['message']}")
    raise RuntimeError(f"the connection closed before question {qid} ended")


def peak_rss_gib_of(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run(
    sc: Scenario, prewarm: bool = True, *, folder: Path | None = None, fault_shift_position: int = 0
) -> dict[str, Any]:
    """Both pipelines on the same frames and questions; the figures :func:`report` prints.
    ``folder``: another model than the benchmark's (tests use the tiny one).
    ``fault_shift_position``: a test hook, the server shifts every question's positions by
    this much (its answers then differ: ``tokens_equal`` must say so)."""
    from streamer.config import ModelConfig
    from streamer.inference.loader import load_model

    workdir = Path(tempfile.mkdtemp(prefix="streamer-bench-"))
    folder = folder or bench_model(sc.depth_factor)
    frames = bench_frames(sc.frames, sc.side)
    questions = QUESTIONS[: sc.clients]
    cfg = ModelConfig(id=str(folder), frames=sc.frames, max_new_tokens=sc.new_tokens)

    say(f"reference: loading {folder.name} and answering {len(questions)} questions one after another")
    loaded = load_model(cfg)
    reference_answer(loaded.model, loaded.processor, frames[:2], "warm up", Scenario(1, 2, sc.side, 1, 1), cfg)
    ref = [reference_answer(loaded.model, loaded.processor, frames, q, sc, cfg) for q in questions]
    ref_seq_s = sum(r[3] for r in ref)
    ref_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del loaded
    import gc

    gc.collect()

    # FFV1 in RGB is lossless: the server decodes exactly the reference's pixels.
    video = write_video(workdir / "bench.mkv", frames, codec="ffv1", pix_fmt="bgr0", fps=2)
    config = workdir / "bench.yaml"
    config.write_text(
        json.dumps(
            {
                "sources": [
                    {
                        "name": "bench",
                        "url": str(video),
                        "sample_fps": 2,
                        "max_side": sc.side,
                        "loop": False,
                        "realtime": False,
                        "buffer_frames": sc.frames,
                    }
                ],
                "model": {
                    "id": str(folder),
                    "frames": sc.frames,
                    "max_new_tokens": sc.new_tokens,
                    "max_batch": sc.clients,
                    "prewarm": prewarm,
                },
                "server": {"queue_size": max(32, sc.clients * 2), "max_open_per_connection": 8},
            }
        )
    )
    say("streamer: starting `streamer serve` on the same frames and waiting for it to see them")
    env = {"STREAMER_FAULT_SHIFT_POSITION": str(fault_shift_position)} if fault_shift_position else None
    server = start_server(["--config", str(config)], workdir / "server.log", env, timeout=600)
    url = server.url
    try:
        deadline = time.monotonic() + 600
        while True:  # the stream is buffered, and (with prewarm) the window is prepared
            buffered = server.healthz()["streams"][0]["frames_buffered"] >= sc.frames
            if buffered and (not prewarm or server.metric("streamer_prefix_cache_entries") >= 1):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the server never prepared the frames")
            time.sleep(0.5)
        if prewarm:
            asyncio.run(ask_streamer(url, "warm up", "warm", 1))
        # One question at a time, as the reference answers them. With prewarm, every question
        # asked alone (the median is the figure: one sample swings by 10-20 %); without it, only
        # the first, which pays for the vision encoder and the prefill.
        alone = questions if prewarm else questions[:1]
        singles = [asyncio.run(ask_streamer(url, q, f"one{i}", sc.new_tokens)) for i, q in enumerate(alone)]

        async def together() -> tuple[list[tuple[str, float, float]], float]:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(ask_streamer(url, q, f"c{i}", sc.new_tokens) for i, q in enumerate(questions))
            )
            return answers, time.perf_counter() - started

        many, wall = asyncio.run(together())
        server_peak = peak_rss_gib_of(server.proc.pid)
    finally:
        stop_server(server)
    # Compared on token ids: two different answers can decode to the same text.
    pairs = [*zip(questions, ref, singles, strict=False), *zip(questions, ref, many, strict=True)]
    equal = all(m[0] == r[0] for _, r, m in pairs)
    return {
        "scenario": sc,
        "prewarm": prewarm,
        "singles": len(singles),
        "ref_ttft": statistics.median(r[2] for r in ref[: len(singles)]),
        "ref_total": statistics.median(r[3] for r in ref[: len(singles)]),
        "ref_rate": len(questions) / ref_seq_s,
        "ours_ttft": statistics.median(m[2] for m in singles),
        "ours_total": statistics.median(m[3] for m in singles),
        "ours_rate": len(questions) / wall,
        "ref_peak_gib": ref_peak,
        "ours_peak_gib": server_peak,
        "tokens_equal": equal,
        "mismatches": [(q, r[:2], m[:2]) for q, r, m in pairs if r[0] != m[0]],
    }


def report(r: dict[str, Any]) -> None:
    sc: Scenario = r["scenario"]
    import platform

    print(
        f"\nstreamer bench: {sc.name}, {sc.frames} frames at {sc.side}x{sc.side}, {sc.new_tokens} new tokens, "
        f"prewarm {'on' if r['prewarm'] else 'off'}, "
        f"greedy, {sc.clients} clients; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU"
    )
    rows = [
        (f"time to first token, s (1 question, median of {r['singles']})", r["ref_ttft"], r["ours_ttft"]),
        (f"total time, s (1 question, median of {r['singles']})", r["ref_total"], r["ours_total"]),
        (f"answers/s ({sc.clients} questions)", r["ref_rate"], r["ours_rate"]),
        ("peak memory, GiB", r["ref_peak_gib"], r["ours_peak_gib"]),
    ]
    print(f"{'':50} {'reference':>10} {'streamer':>10} {'ratio':>8}")
    for name, ref, ours in rows:
        print(f"{name:50} {ref:10.3f} {ours:10.3f} {ours / ref:8.3f}")
    print(f"{'identical answers':50} {'':>10} {str(r['tokens_equal']).lower():>10}")
    for q, (ref_ids, ref_text), (ours_ids, ours_text) in r["mismatches"]:
        print(f"  differs for {q!r}:\n    reference {ref_ids} {ref_text!r}\n    streamer  {ours_ids} {ours_text!r}")
    print(
        f"ttft_ratio={r['ours_ttft'] / r['ref_ttft']:.3f} throughput_ratio={r['ours_rate'] / r['ref_rate']:.2f} "
        f"tokens_equal={str(r['tokens_equal']).lower()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamer bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run that finishes in minutes on 2 CPU cores")
    parser.add_argument("--depth-factor", type=int, help="divide both depths of Qwen2-VL-2B by this")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--side", type=int, help="frame width and height")
    parser.add_argument("--clients", type=int, help="simultaneous questions")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument(
        "--no-prewarm", action="store_true", help="streamer does no vision work or prefill before questions arrive"
    )
    # A test hook, not a feature: the server answers with shifted positions, so the run must
    # report tokens_equal=false.
    parser.add_argument("--fault-shift-position", type=int, nargs="?", const=1, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    sc = Scenario(
        depth_factor=args.depth_factor or base.depth_factor,
        frames=args.frames or base.frames,
        side=args.side or base.side,
        clients=min(args.clients or base.clients, len(QUESTIONS)),
        new_tokens=args.new_tokens or base.new_tokens,
    )
    report(run(sc, prewarm=not args.no_prewarm, fault_shift_position=args.fault_shift_position))
    return 0
