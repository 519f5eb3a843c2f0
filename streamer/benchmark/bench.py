"""``streamer bench``: streamer against the reference pipeline, on the same frames, in three cases.

(a) The reference, in this process: ``qwen_vl_utils.process_vision_info`` + the processor +
``model.generate``, one question at a time, as the project's seed did.
(b) streamer end to end, asked through the WebSocket protocol:

- **warm**: a real ``streamer serve`` process plays the clip once, unpaced; the window never
  slides and its vision work and prefill are done before the first timed question (the best
  case);
- **live**: the clip looped and paced at real time, the window sliding, questions at random
  moments that do not depend on the answers (one every 10 s on average; ``--live-every 0``
  asks back to back instead), to a server in this process, so that the frames each answer
  used can be read back: time to first token, and capture-to-first-token (from the capture
  of the newest frame used to the first token; for the reference, which takes the newest
  frames when the question comes, its time to first token), with how many of the window's
  pairs were not yet encoded and whether its prefix was ready;
- **cold**: the same live stream with nothing prepared ahead, each question on a window never
  seen (its reference right after it), then ``clients`` questions at once on a fresh window:
  throughput with the window's one-time cost included, against the reference answering the
  same questions on the same frames one after another right after the burst (the host's
  speed drifts over minutes, so a rate measured at the start would tilt the ratio).

Both use the same model folder (a random-weight Qwen2-VL in Qwen2-VL-2B's shape, both
depths cut by one factor so the vision/LLM split of the work is kept, built once and
loaded with ``from_pretrained``: the reference as the seed loaded it, streamer with its
load-time fusions), the same frames (written losslessly to the file the server
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.benchmark.clips import write_video
from streamer.benchmark.servers import InProcessServer, start_server, stop_server
from streamer.config import cache_dir
from streamer.inference.reference import reference_generate, reference_inputs, reference_text, seed_model_config
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
#: Live and cold: questions asked (full, quick), and the clip's length in frames (its frames
#: all differ, so a window is never seen twice within a loop).
LIVE_QUESTIONS = {False: 8, True: 3}
COLD_QUESTIONS = {False: 5, True: 2}
LIVE_CLIP_FRAMES = 40
#: Live: one question every this many seconds on average, at random moments (full, quick).
LIVE_EVERY_S = {False: 10.0, True: 4.0}
#: Live: seconds the stream runs before the first question (full, quick). A live camera runs
#: before anyone asks: the stride has settled and the stream holds a window at that stride
#: (at stride 16, 8 frames take 160 sampled frames: 80 s at 2 fps).
LIVE_SETTLE_S = {False: 90.0, True: 40.0}
SAMPLE_FPS = 2.0


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
    model: Any,
    processor: Any,
    frames: list[np.ndarray],
    question: str,
    sc: Scenario,
    cfg: Any,
    fps: float = SAMPLE_FPS,
) -> tuple[list[int], str, float, float]:
    """One question through the seed's pipeline: (token ids, text, ttft_s, total_s)."""
    started = time.perf_counter()
    inputs = reference_inputs(
        processor, frames, question, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, fps=fps
    )
    first = _FirstToken()
    ids = reference_generate(model, inputs, max_new_tokens=sc.new_tokens, streamer=first)
    total = time.perf_counter() - started
    return ids, reference_text(processor, ids), (first.first_at or time.perf_counter()) - started, total


# -- (b) streamer over its WebSocket server ----------------------------------------------------


async def ask_streamer(url: str, question: str, qid: str, new_tokens: int) -> tuple[list[int], str, float, float]:
    """One question over the WebSocket: (token ids, text, ttft_s, total_s)."""
    asked = await _ask_one(url, question, qid, new_tokens)
    return asked.token_ids, asked.answer["text"], asked.ttft_s, asked.total_s


def peak_rss_gib_of(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# -- live and cold: a looped clip paced at real time ------------------------------------------


@dataclass
class Asked:
    """One question over the WebSocket and its answer."""

    question: str
    token_ids: list[int]
    ttft_s: float
    answer: dict[str, Any]
    total_s: float


async def _ask_one(
    url: str, question: str, qid: str, new_tokens: int, ready: Callable[[], Awaitable[object]] | None = None
) -> Asked:
    """Ask over a connection of its own (after awaiting ``ready``, when given) and time the answer."""
    async with await Client.connect(url, open_timeout=60) as client:
        await client.welcome()
        if ready is not None:
            await ready()
        started = time.perf_counter()
        first: float | None = None
        await client.send_ask("bench", question, id=qid, max_new_tokens=new_tokens)
        async for m in client.messages_of(qid, timeout=None):
            if m["type"] == "token" and first is None:
                first = time.perf_counter()
            elif m["type"] == "answer":
                end = time.perf_counter()
                return Asked(question, m["token_ids"], (first or end) - started, m, end - started)
            elif m["type"] == "error":
                raise RuntimeError(f"streamer answered {m['code']}: {m['message']}")
    raise RuntimeError(f"the connection closed before question {qid} ended")


def _live_server(
    sc: Scenario, folder: Path, video: Path, *, prewarm: bool, window_lag_s: float, frame_stride: int | str = 1
) -> InProcessServer:
    config = {
        "sources": [
            {
                "name": "bench",
                "url": str(video),
                "sample_fps": SAMPLE_FPS,
                "max_side": sc.side,
                "loop": True,
                "realtime": True,
                # Every frame an answer may use is still there when the bench reads them back.
                "buffer_frames": 1024,
            }
        ],
        "model": {
            "id": str(folder),
            "frames": sc.frames,
            "max_new_tokens": sc.new_tokens,
            "max_batch": sc.clients,
            "prewarm": prewarm,
            "window_lag_s": window_lag_s,
            "frame_stride": frame_stride,
        },
        "server": {"queue_size": max(32, sc.clients * 2), "max_open_per_connection": 8},
    }
    return InProcessServer(config).start(min_frames=sc.frames)


def _reference_on(
    loaded: Any, cfg: Any, sc: Scenario, server_frames: dict[int, np.ndarray], asked: Asked
) -> tuple[list[int], float, float]:
    """The reference's token ids, time to first token and total time on the frames ``asked``
    was answered from (every ``stride``-th sampled frame: a video at the sampling rate over
    the stride)."""
    span = asked.answer["frames"]
    stride = span.get("stride", 1)
    window = [server_frames[seq] for seq in range(span["first_seq"], span["last_seq"] + 1, stride)]
    fps = SAMPLE_FPS / stride
    ids, _, ttft, total = reference_answer(loaded.model, loaded.processor, window, asked.question, sc, cfg, fps)
    return ids, ttft, total


def run_live(
    sc: Scenario,
    folder: Path,
    video: Path,
    loaded: Any,
    cfg: Any,
    *,
    questions: int,
    window_lag_s: float,
    frame_stride: int | str = 1,
    settle_s: float = 0.0,
    every_s: float,
) -> dict[str, Any]:
    """Questions at random moments on the paced, looping clip, the first after the stream has
    run ``settle_s`` (a live camera runs before anyone asks: warm-up has measured the encoder
    and the stride has settled). The moments do not depend on the answers: question ``i`` is
    asked at a uniformly random time within the ``i``-th span of ``every_s`` seconds, on a
    connection of its own, whether or not the one before has been answered (people asking
    about a stream do not wait for each other). ``every_s`` 0: back to back instead, each
    question 1-3 s after the answer before (a CPU kept busy by one impatient client: the
    faster the answers, the more questions)."""
    import random

    rng = random.Random(BENCH_SEED)
    server = _live_server(sc, folder, video, prewarm=True, window_lag_s=window_lag_s, frame_stride=frame_stride)

    def ask(i: int) -> Awaitable[Asked]:
        return _ask_one(server.url, QUESTIONS[i % len(QUESTIONS)], f"live{i}", sc.new_tokens)

    async def ask_all() -> list[Asked]:
        if every_s <= 0:
            asked = []
            for i in range(questions):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                asked.append(await ask(i))
            return asked
        start, asks = time.perf_counter(), []
        for i in range(questions):
            at = i * every_s + rng.uniform(0.0, every_s)
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            asks.append(asyncio.ensure_future(ask(i)))
        return list(await asyncio.gather(*asks))

    try:
        time.sleep(settle_s)
        asked = asyncio.run(ask_all())
        frames = {f.seq: f.rgb for f in server.runtime.captures["bench"].ring.latest(1024)}
    finally:
        server.stop()
    rows = []
    for a in asked:
        ref_ids, ref_ttft, _ = _reference_on(loaded, cfg, sc, frames, a)
        prepared = a.answer.get("prepared") or {}
        rows.append(
            {
                "ttft": a.ttft_s,
                "capture": a.answer["timings"].get("capture_to_first_token_ms", float("nan")) / 1000,
                "ref_ttft": ref_ttft,
                "pairs_missing": prepared.get("pairs_missing"),
                "prefix_ready": prepared.get("prefix_ready"),
                "frames": (a.answer["frames"]["first_seq"], a.answer["frames"]["last_seq"]),
                "stride": a.answer["frames"].get("stride", 1),
                "equal": ref_ids == a.token_ids,
                "mismatch": None if ref_ids == a.token_ids else (a.question, ref_ids, a.token_ids),
            }
        )
    return {
        "rows": rows,
        "window_lag_s": window_lag_s,
        "frame_stride": frame_stride,
        "settle_s": settle_s,
        "every_s": every_s,
        "ttft": statistics.median(r["ttft"] for r in rows),
        "capture": statistics.median(r["capture"] for r in rows),
        "ref_ttft": statistics.median(r["ref_ttft"] for r in rows),
        "tokens_equal": all(r["equal"] for r in rows),
    }


def run_cold(sc: Scenario, folder: Path, video: Path, loaded: Any, cfg: Any, *, questions: int) -> dict[str, Any]:
    """Nothing prepared ahead: each question on a window never seen (one window's time apart),
    then ``clients`` questions at once on a fresh window (throughput with its one-time cost).
    Each single question's reference runs right after it (the server idles meanwhile: nothing
    is prepared ahead), so a host whose speed drifts over minutes does not tilt the ratio."""
    server = _live_server(sc, folder, video, prewarm=False, window_lag_s=0.0)
    apart = sc.frames / SAMPLE_FPS + 1.0  # the next window shares no frame with the last
    ring = server.runtime.captures["bench"].ring
    try:
        singles, refs = [], []
        for i in range(questions):
            time.sleep(apart)
            asked = asyncio.run(_ask_one(server.url, QUESTIONS[i % len(QUESTIONS)], f"cold{i}", sc.new_tokens))
            singles.append(asked)
            refs.append(_reference_on(loaded, cfg, sc, {f.seq: f.rgb for f in ring.latest(1024)}, asked))
        time.sleep(apart)

        async def together() -> tuple[list[Asked], float]:
            # All connected first, then sent just after a frame is sampled: the burst arrives
            # within one frame period, so each of its questions has the same newest frame.
            connected, go = asyncio.Barrier(sc.clients + 1), asyncio.Event()

            async def ready() -> None:
                await connected.wait()
                await go.wait()

            asks = asyncio.gather(
                *(
                    _ask_one(server.url, q, f"burst{i}", sc.new_tokens, ready)
                    for i, q in enumerate(QUESTIONS[: sc.clients])
                )
            )
            all_in = asyncio.ensure_future(connected.wait())
            await asyncio.wait({all_in, asks}, return_when=asyncio.FIRST_COMPLETED)
            if not all_in.done():  # a client failed before it was connected
                all_in.cancel()
                await asks
            await asyncio.to_thread(ring.wait_for_frame_after, ring.newest_seq, 30.0)
            started = time.perf_counter()
            go.set()
            answers = await asks
            return list(answers), time.perf_counter() - started

        burst, wall = asyncio.run(together())
        frames = {f.seq: f.rgb for f in server.runtime.captures["bench"].ring.latest(1024)}
    finally:
        server.stop()
    burst_refs = [_reference_on(loaded, cfg, sc, frames, a) for a in burst]
    everything = [*zip(singles, refs, strict=True), *zip(burst, burst_refs, strict=True)]
    windows = {tuple(a.answer["frames"][k] for k in ("first_seq", "last_seq")) for a in burst}
    return {
        "ttft": statistics.median(a.ttft_s for a in singles),
        "ref_ttft": statistics.median(r[1] for r in refs),
        "rows": [(a.ttft_s, r[1]) for a, r in zip(singles, refs, strict=True)],
        "rate": len(burst) / wall,
        # The reference answers the burst's questions one after another right after it, on
        # its frames: its rate is measured when the host runs as fast as it did for the burst.
        "ref_rate": len(burst_refs) / sum(r[2] for r in burst_refs),
        "burst_windows": len(windows),
        "tokens_equal": all(r[0] == a.token_ids for a, r in everything),
        "mismatches": [(a.question, r[0], a.token_ids) for a, r in everything if r[0] != a.token_ids],
    }


def run(
    sc: Scenario,
    prewarm: bool = True,
    *,
    folder: Path | None = None,
    fault_shift_position: int = 0,
    live_questions: int = 0,
    cold_questions: int = 0,
    window_lag_s: float = 4.0,
    frame_stride: int | str = 1,
    live_settle_s: float = 0.0,
    live_every_s: float = LIVE_EVERY_S[True],
) -> dict[str, Any]:
    """Both pipelines on the same frames and questions; the figures :func:`report` prints.
    ``folder``: another model than the benchmark's (tests use the tiny one).
    ``fault_shift_position``: a test hook, the server shifts every question's positions by
    this much (its answers then differ: ``tokens_equal`` must say so).
    ``live_questions``, ``cold_questions``: how many questions the live and cold cases ask
    (0: that case is left out); ``window_lag_s``, ``frame_stride``: the live server's
    ``model.window_lag_s`` and ``model.frame_stride``; ``live_settle_s``: how long its
    stream runs before the first question; ``live_every_s``: one live question every this
    many seconds on average, at random moments (0: back to back, see :func:`run_live`)."""
    # Long on purpose: one run's three scenarios read top to bottom, in the order they are measured.
    from streamer.config import ModelConfig
    from streamer.inference.loader import load_model

    workdir = Path(tempfile.mkdtemp(prefix="streamer-bench-"))
    folder = folder or bench_model(sc.depth_factor)
    frames = bench_frames(sc.frames, sc.side)
    questions = QUESTIONS[: sc.clients]
    cfg = ModelConfig(id=str(folder), frames=sc.frames, max_new_tokens=sc.new_tokens)

    say(f"reference: loading {folder.name} and answering {len(questions)} questions one after another")
    loaded = load_model(seed_model_config(cfg))
    reference_answer(loaded.model, loaded.processor, frames[:2], "warm up", Scenario(1, 2, sc.side, 1, 1), cfg)
    ref = [reference_answer(loaded.model, loaded.processor, frames, q, sc, cfg) for q in questions]
    ref_seq_s = sum(r[3] for r in ref)
    prompt = reference_inputs(
        loaded.processor, frames, questions[0], min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, fps=SAMPLE_FPS
    )
    merge = loaded.model.config.vision_config.spatial_merge_size
    vision_tokens = int(prompt["video_grid_thw"].prod()) // merge**2
    ref_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

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
    mismatches = [(q, r[:2], m[:2]) for q, r, m in pairs if r[0] != m[0]]
    live = cold = None
    if live_questions or cold_questions:
        clip = bench_frames(LIVE_CLIP_FRAMES, sc.side)
        looped = write_video(workdir / "live.mkv", clip, codec="ffv1", pix_fmt="bgr0", fps=int(SAMPLE_FPS))
        saved = os.environ.get("STREAMER_FAULT_SHIFT_POSITION")
        os.environ["STREAMER_FAULT_SHIFT_POSITION"] = str(fault_shift_position)
        try:
            if live_questions:
                say(f"live: the clip looped at real time, {live_questions} questions, {_arrivals(live_every_s)}")
                live = run_live(
                    sc,
                    folder,
                    looped,
                    loaded,
                    cfg,
                    questions=live_questions,
                    window_lag_s=window_lag_s,
                    frame_stride=frame_stride,
                    settle_s=live_settle_s,
                    every_s=live_every_s,
                )
                bad = [row["mismatch"] for row in live["rows"] if row["mismatch"]]
                mismatches += [(q, (r, ""), (m, "")) for q, r, m in bad]
            if cold_questions:
                say(f"cold: nothing prepared ahead, {cold_questions} questions on new windows, then a burst")
                cold = run_cold(sc, folder, looped, loaded, cfg, questions=cold_questions)
                mismatches += [(q, (r, ""), (m, "")) for q, r, m in cold["mismatches"]]
        finally:
            if saved is None:
                os.environ.pop("STREAMER_FAULT_SHIFT_POSITION", None)
            else:
                os.environ["STREAMER_FAULT_SHIFT_POSITION"] = saved
    return {
        "live": live,
        "cold": cold,
        "scenario": sc,
        "vision_tokens": vision_tokens,
        "prompt_tokens": int(prompt["input_ids"].shape[1]),
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
        "warm_tokens_equal": all(m[0] == r[0] for _, r, m in pairs),
        "tokens_equal": not mismatches,
        "mismatches": mismatches,
    }


def report(r: dict[str, Any]) -> None:
    sc: Scenario = r["scenario"]
    import platform

    print(
        f"\nstreamer bench: {sc.name}, {sc.frames} frames at {sc.side}x{sc.side} sampled at {SAMPLE_FPS:g} fps "
        f"({r['vision_tokens']} vision tokens, a {r['prompt_tokens']}-token prompt), {sc.new_tokens} new tokens, "
        f"greedy, {sc.clients} clients; {_cpu_name() or platform.machine()}, {os.cpu_count()} cores, "
        f"{_gpu_name() or 'no GPU'}"
    )
    print(f"{'':58} {'reference':>10} {'streamer':>10} {'ratio':>8}")

    def line(name: str, ref: float, ours: float) -> None:
        print(f"{name:58} {ref:10.3f} {ours:10.3f} {ours / ref:8.3f}")

    case = f"warm (window prepared before timing, prewarm {'on' if r['prewarm'] else 'off'})"
    print(case)
    line(f"  time to first token, s (1 question, median of {r['singles']})", r["ref_ttft"], r["ours_ttft"])
    line(f"  total time, s (1 question, median of {r['singles']})", r["ref_total"], r["ours_total"])
    line(f"  answers/s ({sc.clients} questions, window already prepared)", r["ref_rate"], r["ours_rate"])
    line("  peak memory, GiB", r["ref_peak_gib"], r["ours_peak_gib"])
    quick = [f"ttft_ratio={r['ours_ttft'] / r['ref_ttft']:.3f}"]
    live, cold = r.get("live"), r.get("cold")
    if live:
        print(
            f"live (clip looped at real time, window sliding, model.window_lag_s={live['window_lag_s']:g}, "
            f"model.frame_stride={live['frame_stride']}, first question after {live['settle_s']:g} s, "
            f"{_arrivals(live['every_s'])})"
        )
        n = len(live["rows"])
        line(f"  time to first token, s (median of {n})", live["ref_ttft"], live["ttft"])
        line(f"  capture to first token, s (median of {n})", live["ref_ttft"], live["capture"])
        for i, row in enumerate(live["rows"]):
            print(
                f"    q{i}: frames {row['frames'][0]}-{row['frames'][1]} stride {row['stride']}, pairs not yet encoded "
                f"{row['pairs_missing']}, prefix ready {row['prefix_ready']}, ttft {row['ttft']:.2f} s, "
                f"capture-to-first-token {row['capture']:.2f} s, reference ttft {row['ref_ttft']:.2f} s"
            )
        quick += [
            f"live_ttft_ratio={live['ttft'] / live['ref_ttft']:.3f}",
            f"live_capture_ratio={live['capture'] / live['ref_ttft']:.3f}",
        ]
    if cold:
        print("cold (nothing prepared ahead; each question on a window never seen)")
        line(f"  time to first token, s (median of {len(cold['rows'])})", cold["ref_ttft"], cold["ttft"])
        for i, (ours, ref) in enumerate(cold["rows"]):
            print(f"    q{i}: ttft {ours:.2f} s, reference ttft {ref:.2f} s (right after it), ratio {ours / ref:.3f}")
        line(
            f"  answers/s ({sc.clients} questions at once, the window's cost included; reference right after)",
            cold["ref_rate"],
            cold["rate"],
        )
        quick += [f"cold_ttft_ratio={cold['ttft'] / cold['ref_ttft']:.3f}"]
    ref_rate, rate = (cold["ref_rate"], cold["rate"]) if cold else (r["ref_rate"], r["ours_rate"])
    quick += [f"throughput_ratio={rate / ref_rate:.2f}", f"tokens_equal={str(r['tokens_equal']).lower()}"]
    print(f"{'identical answers (token ids, every case)':58} {'':>10} {str(r['tokens_equal']).lower():>10}")
    for q, (ref_ids, ref_text), (ours_ids, ours_text) in r["mismatches"]:
        print(f"  differs for {q!r}:\n    reference {ref_ids} {ref_text!r}\n    streamer  {ours_ids} {ours_text!r}")
    print(" ".join(quick))


def _cpu_name() -> str | None:
    """The CPU's model name (Linux), for the report's hardware line."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return None


def _gpu_name() -> str | None:
    """The first CUDA device's name, None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _arrivals(every_s: float) -> str:
    """How the live case's questions arrive, in words."""
    if every_s <= 0:
        return "back to back (each 1-3 s after the answer before)"
    return f"at random moments, one every {every_s:g} s on average"


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
    parser.add_argument(
        "--window-lag", type=float, default=4.0, help="the live case's model.window_lag_s (product default 0)"
    )
    parser.add_argument(
        "--frame-stride",
        default="auto",
        help="the live case's model.frame_stride: a number, or auto (product default 1)",
    )
    parser.add_argument(
        "--live-settle",
        type=float,
        help="seconds the live case's stream runs before the first question (default 90, 40 with --quick)",
    )
    parser.add_argument(
        "--live-every",
        type=float,
        help="the live case asks one question every this many seconds on average, at random moments "
        "(default 10, 4 with --quick); 0: back to back, each 1-3 s after the answer before",
    )
    parser.add_argument("--only-warm", action="store_true", help="leave out the live and cold cases")
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
    report(
        run(
            sc,
            prewarm=not args.no_prewarm,
            fault_shift_position=args.fault_shift_position,
            live_questions=0 if args.only_warm else LIVE_QUESTIONS[args.quick],
            cold_questions=0 if args.only_warm else COLD_QUESTIONS[args.quick],
            window_lag_s=args.window_lag,
            frame_stride=args.frame_stride if args.frame_stride == "auto" else int(args.frame_stride),
            live_settle_s=LIVE_SETTLE_S[args.quick] if args.live_settle is None else args.live_settle,
            live_every_s=LIVE_EVERY_S[args.quick] if args.live_every is None else args.live_every,
        )
    )
    return 0
