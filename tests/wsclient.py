"""A small WebSocket test client speaking PROTOCOL.md over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

FINAL = {"answer", "error"}


class ProtocolClient:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> ProtocolClient:
        return cls(await websockets.connect(url, max_size=None, **kwargs))

    async def close(self) -> None:
        await self.ws.close()

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))

    async def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop(0)
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(raw, str):
                return json.loads(raw)

    async def recv_type(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
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

    async def until_final(self, qid: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Messages for question ``qid`` up to and including its answer or error."""
        got, others = [], []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                m = await self.recv(max(0.1, deadline - loop.time()))
                if m.get("id") == qid:
                    got.append(m)
                    if m["type"] in FINAL:
                        return got
                else:
                    others.append(m)
        finally:
            self.pending = others + self.pending

    async def ask(
        self, qid: str, stream: str = "demo", question: str = "What is moving?", **extra: Any
    ) -> list[dict[str, Any]]:
        await self.send({"type": "ask", "id": qid, "stream": stream, "question": question, **extra})
        return await self.until_final(qid)
