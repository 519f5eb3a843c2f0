"""A client for streamer's WebSocket protocol (PROTOCOL.md, version 1): a library and a
terminal program.

:class:`Client` is the one Python client of the protocol: ``streamer ask``, the tests and
the benchmarks use it. :func:`main` is the terminal program (``streamer ask``, or
``python -m streamer_client --help``). Self-contained: it needs Python 3.10+ and the
``websockets`` package, nothing from the ``streamer`` package, so this folder can be copied
next to any program.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
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


FINAL = ("answer", "error")


class ServerError(Exception):
    """The server answered with an ``error`` message."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(f"{message.get('code')}: {message.get('message')}")
        self.code = message.get("code")
        self.message = message


class Client:
    """One connection to a streamer server, speaking PROTOCOL.md.

    Reads return messages in the order the server sent them. The reads that look for one
    kind of message or one question's (:meth:`recv_type`, :meth:`messages_of`) keep the
    messages they pass over and hand them to later reads, so nothing is lost. JSON reads
    skip binary frames (preview images); :meth:`receive` returns them.
    """

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, *, token: str | None = None, **options: Any) -> Client:
        """Open a connection; ``token`` goes in ``Authorization: Bearer``; ``options`` go to
        ``websockets.connect`` (``origin``, ``additional_headers``, ``open_timeout``...)."""
        if token:
            options["additional_headers"] = {
                **(options.get("additional_headers") or {}),
                "Authorization": f"Bearer {token}",
            }
        return cls(await websockets.connect(url, max_size=None, **options))

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))

    async def receive(self, timeout: float | None = 30.0) -> dict[str, Any] | bytes:
        """The next frame: a message, or the bytes of a preview image."""
        if self.pending:
            return self.pending.pop(0)
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return raw if isinstance(raw, bytes) else json.loads(raw)

    async def recv(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """The next message (preview images are skipped)."""
        while True:
            frame = await self.receive(timeout)
            if not isinstance(frame, bytes):
                return frame

    async def recv_type(self, kind: str, timeout: float | None = 30.0) -> dict[str, Any]:
        """The next message of ``kind``; messages of other kinds are kept for later."""
        skipped = []
        try:
            while True:
                m = await self.recv(timeout)
                if m["type"] == kind:
                    return m
                skipped.append(m)
        finally:
            self.pending = skipped + self.pending

    async def welcome(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """The server's first message, a ``welcome``; raises :class:`ServerError` when it is an
        ``error`` instead (``unauthorized``, ``busy``)."""
        first = await self.recv(timeout)
        if first.get("type") == "error":
            raise ServerError(first)
        return first

    async def publish(self, stream: str, fps: float | None = None) -> dict[str, Any]:
        """Publish a stream from this connection (extension): returns the ``publishing`` reply
        (its limits: ``max_side``, ``max_frame_bytes``); raises :class:`ServerError` on an
        ``error``. Then send JPEG frames with :meth:`send_frame`."""
        await self.send({"type": "publish", "stream": stream, **({"fps": fps} if fps else {})})
        skipped = []
        try:
            while True:
                m = await self.recv()
                if m["type"] == "publishing" and m.get("stream") == stream:
                    return m
                if m["type"] == "error" and m.get("id") is None:
                    raise ServerError(m)
                skipped.append(m)
        finally:
            self.pending = skipped + self.pending

    async def send_frame(self, jpeg: bytes) -> None:
        """One JPEG frame of the stream this connection publishes."""
        await self.ws.send(jpeg)

    async def send_ask(self, stream: str, question: str, *, id: str | None = None, **options: Any) -> str:
        """Send an ``ask`` (``options``: ``frames``, ``max_new_tokens``, ``mode``); returns its id."""
        qid = id or uuid.uuid4().hex[:12]
        await self.send({"type": "ask", "id": qid, "stream": stream, "question": question, **options})
        return qid

    async def messages_of(self, qid: str, timeout: float | None = 60.0) -> AsyncIterator[dict[str, Any]]:
        """The messages about question ``qid`` as they come, up to and including its
        ``answer`` or ``error``; within ``timeout`` seconds in all (None: no limit)."""
        others: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                m = await self.recv(None if deadline is None else max(0.1, deadline - loop.time()))
                if m.get("id") != qid:
                    others.append(m)
                    continue
                yield m
                if m["type"] in FINAL:
                    return
        finally:
            self.pending = others + self.pending

    async def until_final(self, qid: str, timeout: float | None = 60.0) -> list[dict[str, Any]]:
        """All the messages about question ``qid`` up to and including its answer or error."""
        return [m async for m in self.messages_of(qid, timeout)]

    async def ask(
        self, stream: str, question: str, *, id: str | None = None, timeout: float | None = 60.0, **options: Any
    ) -> list[dict[str, Any]]:
        """Ask and wait: the question's messages (``accepted``, ``token``s, then its answer or error)."""
        qid = await self.send_ask(stream, question, id=id, **options)
        return await self.until_final(qid, timeout)


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
    try:
        client = await Client.connect(url, token=token, open_timeout=open_timeout)
    except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        print(f"error: cannot connect to {url}: {exc}", file=err)
        print("Is `streamer demo` or `streamer serve` running there?", file=err)
        return EXIT_CONNECT
    async with client:
        try:
            welcome = await client.welcome(timeout=None)
        except ServerError as refused:
            print(f"error: {refused}", file=err)
            return EXIT_AUTH if refused.code == "unauthorized" else EXIT_ERROR
        except websockets.ConnectionClosed as exc:
            print(f"error: the server closed the connection ({exc})", file=err)
            return EXIT_ERROR
        note = (welcome.get("model") or {}).get("note")
        if note:
            print(f"note: {note}", file=err)
        options = {k: v for k, v in (("frames", frames), ("max_new_tokens", max_new_tokens)) if v is not None}
        qid = await client.send_ask(stream, question, **options)
        try:
            async for m in client.messages_of(qid, timeout=None):
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
            await client.send({"type": "cancel", "id": qid})
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
