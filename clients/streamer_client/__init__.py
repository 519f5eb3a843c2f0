"""A terminal client for streamer's WebSocket protocol (PROTOCOL.md, version 1).

Self-contained: it needs Python 3.10+ and the ``websockets`` package, nothing from the
``streamer`` package, so this folder can be copied next to any program. ``streamer ask``
runs it; ``python -m streamer_client --help`` does too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any, TextIO

import websockets

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
EXIT_OK, EXIT_ERROR, EXIT_CONNECT, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _clock(ts: float | None) -> str:
    if ts is None:
        return "?"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 10) % 10}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def describe_answer(answer: dict[str, Any]) -> str:
    """One line: which frames the answer was based on, and how long it took."""
    f = answer.get("frames") or {}
    t = answer.get("timings") or {}
    return (
        f"[stream {answer.get('stream')} · frames {f.get('first_seq')}-{f.get('last_seq')} "
        f"({f.get('count')} frames, {_clock(f.get('first_ts'))}-{_clock(f.get('last_ts'))}) · "
        f"queued {_ms(t.get('queued_ms'))} · first token {_ms(t.get('first_token_ms'))} · "
        f"total {_ms(t.get('total_ms'))}]"
    )


async def ask(
    url: str,
    stream: str,
    question: str,
    *,
    token: str | None = None,
    frames: int | None = None,
    max_new_tokens: int | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    open_timeout: float = 10.0,
) -> int:
    """Ask one question, print the answer as it streams, then its frames and timings.

    Returns a process exit code: 0 answered, 1 the server answered with an error,
    2 could not connect, 3 refused (authentication), 130 interrupted.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        connection = await websockets.connect(url, additional_headers=headers, open_timeout=open_timeout, max_size=None)
    except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        print(f"error: cannot connect to {url}: {exc}", file=err)
        print("Is `streamer demo` or `streamer serve` running there?", file=err)
        return EXIT_CONNECT
    async with connection as ws:
        welcome = json.loads(await ws.recv())
        if welcome.get("type") == "error":
            print(f"error: {welcome.get('code')}: {welcome.get('message')}", file=err)
            return EXIT_AUTH if welcome.get("code") == "unauthorized" else EXIT_ERROR
        note = (welcome.get("model") or {}).get("note")
        if note:
            print(f"note: {note}", file=err)
        qid = uuid.uuid4().hex[:12]
        msg: dict[str, Any] = {"type": "ask", "id": qid, "stream": stream, "question": question}
        if frames is not None:
            msg["frames"] = frames
        if max_new_tokens is not None:
            msg["max_new_tokens"] = max_new_tokens
        await ws.send(json.dumps(msg, ensure_ascii=False))
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue  # preview images: not for us
                m = json.loads(raw)
                if m.get("id") != qid:
                    continue
                kind = m.get("type")
                if kind == "accepted" and m.get("position"):
                    print(f"(queued, position {m['position']})", file=err)
                elif kind == "token":
                    out.write(m["text"])
                    out.flush()
                elif kind == "answer":
                    out.write("\n" + describe_answer(m) + "\n")
                    out.flush()
                    return EXIT_OK
                elif kind == "error":
                    print(f"\nerror: {m.get('code')}: {m.get('message')}", file=err)
                    return EXIT_ERROR
        except asyncio.CancelledError:
            await ws.send(json.dumps({"type": "cancel", "id": qid}))
            raise
        except websockets.ConnectionClosed as exc:
            print(f"\nerror: the server closed the connection ({exc})", file=err)
            return EXIT_ERROR
    print("\nerror: the connection ended without an answer", file=err)
    return EXIT_ERROR


def build_parser(prog: str = "streamer ask") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Ask a question about a live stream and print the answer.")
    p.add_argument("question", help="the question, e.g. 'What is moving?'")
    p.add_argument("--stream", "-s", required=True, help="stream id, e.g. demo")
    p.add_argument("--url", default=os.environ.get("STREAMER_URL", DEFAULT_URL), help=f"server (default {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"), help="access token (or STREAMER_TOKEN)")
    p.add_argument("--frames", type=int, help="how many of the newest frames to use (2-64)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (1-1024)")
    return p


def main(argv: list[str] | None = None, prog: str = "streamer ask") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return asyncio.run(
            ask(
                args.url,
                args.stream,
                args.question,
                token=args.token,
                frames=args.frames,
                max_new_tokens=args.max_new_tokens,
            )
        )
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
