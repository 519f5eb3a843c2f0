"""The protocol client the tests use: the client library's, with the tests' defaults."""

from __future__ import annotations

from typing import Any

from streamer_client import Client


class ProtocolClient(Client):
    """:class:`streamer_client.Client` asking about the demo stream by default."""

    async def ask(  # type: ignore[override]
        self, qid: str, stream: str = "demo", question: str = "What is moving?", **options: Any
    ) -> list[dict[str, Any]]:
        return await super().ask(stream, question, id=qid, **options)
