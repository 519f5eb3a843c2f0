"""The fast path on a GPU: token ids against the seed pipeline, and warm time to first token.

CI has no GPU, so the CUDA paths (device placement, bfloat16, SDPA on CUDA) are checked here,
by hand, on a machine that has one:

    python benchmarks/gpu_check.py                # exactness on the tiny models, fp32 and bf16
    python benchmarks/gpu_check.py --speed        # and warm TTFT on the bench's 2B-shaped model

Exactness: for each tiny model (Qwen2-VL, its Instruct-settings twin, Qwen2.5-VL), dtype and
window length, three questions answered together on the fast path, each compared token id for
token id with ``model.generate`` on the seed pipeline's inputs, on the same loaded model.
Speed (``--speed``): one question at a time on a window the engine has prepared (the warm
case), against the reference pipeline, on the same frames; medians of several questions.
Prints one line per case and exits 1 if any case's token ids differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from streamer.config import ModelConfig
from streamer.inference.engine import GenerationRequest
from streamer.inference.loader import load_model
from streamer.inference.reference import reference_generate, reference_inputs
from streamer.inference.transformers_engine import TransformersEngine

QUESTIONS = ["What is moving?", "视频里有什么在动？", "Describe the scene in front of the camera in detail, please."]
MODELS = ["tiny-random", "tiny-random-instruct", "tiny-random-qwen2.5-vl"]


def frames_of(n: int, side: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def requests_of(frames: list[np.ndarray], questions: list[str], tokens: int, stream: str) -> list[GenerationRequest]:
    ids = tuple((stream, i) for i in range(len(frames)))
    return [
        GenerationRequest(
            frames=frames, question=q, max_new_tokens=tokens, sample_fps=2.0, stream=stream, frame_ids=ids
        )
        for q in questions
    ]


def reference_ids(engine: TransformersEngine, frames: list[np.ndarray], question: str, tokens: int) -> list[int]:
    loaded, cfg = engine.loaded, engine.cfg
    inputs = reference_inputs(loaded.processor, frames, question, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return reference_generate(loaded.model, inputs, max_new_tokens=tokens)


def check_exactness(device: str, dtypes: list[str], windows: list[int], tokens: int) -> bool:
    ok = True
    for model_id in MODELS:
        for dtype in dtypes:
            cfg = ModelConfig(id=model_id, device=device, dtype=dtype, frames=max(windows))
            engine = TransformersEngine(load_model(cfg), cfg)
            for n in windows:
                frames = frames_of(n, 224, seed=n)
                requests = requests_of(frames, QUESTIONS, tokens, f"{model_id}-{dtype}-{n}")
                fast = engine.generate_batch(requests, [lambda s: None] * 3, [lambda: False] * 3)
                refs = [reference_ids(engine, frames, q, tokens) for q in QUESTIONS]
                equal = [r.token_ids == ref for r, ref in zip(fast, refs, strict=True)]
                took = "fast path" if engine.stats()["prefix_cache_entries"] else "PLAIN PATH"
                print(f"{model_id:24} {dtype:9} {n:3} frames  {took}  token ids equal: {equal}", flush=True)
                for r, ref, same in zip(fast, refs, equal, strict=True):
                    if not same:
                        print(f"    fast      {r.token_ids}\n    reference {ref}", flush=True)
                ok = ok and all(equal)
            del engine
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return ok


def check_speed(device: str, dtype: str, factor: int, n: int, side: int, tokens: int, rounds: int) -> bool:
    from streamer.benchmark.bench import QUESTIONS as BENCH_QUESTIONS
    from streamer.benchmark.bench import bench_frames, bench_model

    folder = bench_model(factor)
    cfg = ModelConfig(id=str(folder), device=device, dtype=dtype, frames=n, max_new_tokens=tokens)
    engine = TransformersEngine(load_model(cfg), cfg)
    frames = bench_frames(n, side)
    ids = tuple(("bench", i) for i in range(n))
    while engine.warm("bench", frames, ids, 2.0):
        pass
    sync = torch.cuda.synchronize if engine.loaded.device.type == "cuda" else (lambda: None)

    def ours(q: str) -> tuple[float, list[int]]:
        request = GenerationRequest(
            frames=frames, question=q, max_new_tokens=tokens, sample_fps=2.0, stream="bench", frame_ids=ids
        )
        sync()
        started = time.monotonic()
        result = engine.generate(request, lambda s: None, lambda: False)
        return (result.first_token_at or time.monotonic()) - started, result.token_ids

    def theirs(q: str) -> tuple[float, list[int]]:
        sync()
        started = time.monotonic()
        ids_ = reference_ids(engine, frames, q, 1)
        sync()
        return time.monotonic() - started, ids_

    ours(BENCH_QUESTIONS[0]), theirs(BENCH_QUESTIONS[0])  # warm-up (kernels, allocator)
    questions = BENCH_QUESTIONS[:rounds]
    fast = [ours(q) for q in questions]
    ref = [theirs(q) for q in questions]
    first_equal = all(f[1][:1] == r[1][:1] for f, r in zip(fast, ref, strict=True))
    f_ttft, r_ttft = statistics.median(f[0] for f in fast), statistics.median(r[0] for r in ref)
    gpu = torch.cuda.get_device_name() if engine.loaded.device.type == "cuda" else "CPU"
    print(
        f"warm TTFT, bench model depth/{factor}, {n} frames at {side}x{side}, {dtype}, {gpu}: "
        f"reference {r_ttft * 1000:.1f} ms, streamer {f_ttft * 1000:.1f} ms, ratio {f_ttft / r_ttft:.3f} "
        f"(median of {rounds}); first tokens equal: {first_equal}",
        flush=True,
    )
    return first_equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--windows", default="8,48", help="frame counts to check")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--speed", action="store_true", help="also time the warm case on the bench's model")
    parser.add_argument("--depth-factor", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a machine with a GPU (or pass --device cpu)", file=sys.stderr)
        return 2
    windows = [int(w) for w in args.windows.split(",")]
    ok = check_exactness(args.device, args.dtypes.split(","), windows, args.tokens)
    if args.speed:
        for dtype in args.dtypes.split(","):
            ok = check_speed(args.device, dtype, args.depth_factor, 8, 448, 16, args.rounds) and ok
    print("all token ids equal" if ok else "SOME TOKEN IDS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
