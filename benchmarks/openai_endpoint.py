"""Time to first token through streamer's OpenAI-compatible endpoint (/v1) against the
WebSocket, for the same question on the same server, measured in the same run.

Starts a real ``streamer serve`` (tiny model, the demo stream) and asks ``--rounds`` times
on each path, alternating which goes first, one question at a time, each client's connection
kept open (warm: the WebSocket connected and welcomed; the ``openai`` client's HTTP
connection kept alive). Time to first token: from sending the ask to the first ``token``
message, or to the first ``chat.completion.chunk`` with content (not the role chunk, which
/v1 sends before the model runs). Prints the medians and the ratio /v1 / WebSocket.

    python benchmarks/openai_endpoint.py --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import openai
import websockets
import yaml

from streamer.benchmark.servers import start_server


async def websocket_ttft(ws: websockets.ClientConnection, qid: str, question: str, tokens: int) -> float:
    started = time.perf_counter()
    ask = {"type": "ask", "id": qid, "stream": "demo", "question": question, "max_new_tokens": tokens}
    await ws.send(json.dumps(ask))
    first: float | None = None
    while True:
        m = json.loads(await ws.recv())
        if m.get("id") != qid:
            continue
        if m["type"] == "token" and first is None:
            first = time.perf_counter()
        elif m["type"] == "answer":
            return (first or time.perf_counter()) - started
        elif m["type"] == "error":
            raise RuntimeError(f"streamer answered {m['code']}: {m['message']}")


async def v1_ttft(client: openai.AsyncOpenAI, question: str, tokens: int) -> float:
    started = time.perf_counter()
    first: float | None = None
    stream = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": question}], max_tokens=tokens, stream=True
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    return (first or time.perf_counter()) - started


async def measure(url: str, port: int, rounds: int, tokens: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"websocket": [], "v1": []}
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # welcome
        await websocket_ttft(ws, "warm-up", "What is moving?", tokens)
        await v1_ttft(client, "What is moving?", tokens)
        for i in range(rounds):
            question = f"What is moving? ({i})"
            order = ("websocket", "v1") if i % 2 == 0 else ("v1", "websocket")
            for path in order:
                if path == "websocket":
                    times[path].append(await websocket_ttft(ws, f"q{i}", question, tokens))
                else:
                    times[path].append(await v1_ttft(client, question, tokens))
    await client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens / max_tokens")
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "sources": [{"name": "demo", "url": "demo", "sample_fps": 2, "max_side": 224}],
                    "model": {"id": "tiny-random", "frames": args.frames, "max_new_tokens": args.tokens},
                }
            )
        )
        proc, url, port = start_server(config, Path(folder) / "server.log")
        try:
            time.sleep(args.frames / 2 + 1)  # let the window fill
            times = asyncio.run(measure(url, port, args.rounds, args.tokens))
        finally:
            proc.terminate()
            proc.wait(30)
    ws, v1 = statistics.median(times["websocket"]), statistics.median(times["v1"])
    print(
        f"tiny model, demo stream, {args.frames} frames, {args.tokens} tokens, {args.rounds} asks per path, "
        "one at a time, warm connections"
    )
    print(
        f"time to first token, median: WebSocket {ws * 1000:.1f} ms, /v1 {v1 * 1000:.1f} ms, "
        f"/v1 / WebSocket {v1 / ws:.2f}"
    )
    for path, values in times.items():
        q = statistics.quantiles(values, n=10)
        print(f"  {path}: p10 {q[0] * 1000:.1f} ms, p90 {q[-1] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
