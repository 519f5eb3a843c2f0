"""The ASGI app (Starlette) and the uvicorn server that runs it.

HTTP and the WebSocket share one port and one stack: ``/ws`` (PROTOCOL.md), ``/healthz``;
``/metrics``, the dashboard and an OpenAI-compatible endpoint join as routes here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from streamer.capture import StreamStatus
from streamer.server.connection import Connection
from streamer.server.runtime import Runtime
from streamer.server.subscriptions import Subscriptions

log = logging.getLogger(__name__)


def create_app(runtime: Runtime) -> Starlette:
    subscriptions = Subscriptions()

    async def healthz(request: Request) -> JSONResponse:
        streams = runtime.stream_objects()
        serving = runtime.loop is not None
        body = {
            "status": "ok" if serving else "starting",
            "server": runtime.version,
            "model": runtime.model_info(),
            "streams": streams,
            "live": [s["id"] for s in streams if s["status"] == "live"],
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        await Connection(websocket, runtime, subscriptions).serve()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def status_changed(status: StreamStatus) -> None:  # on a capture thread
            try:
                loop.call_soon_threadsafe(subscriptions.broadcast_status, status)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        runtime.add_status_listener(status_changed)
        yield
        # uvicorn has stopped taking connections: end open questions, stop capture.
        runtime.stop()

    return Starlette(
        routes=[Route("/healthz", healthz), WebSocketRoute("/ws", websocket_endpoint)],
        lifespan=lifespan,
    )


class StreamerServer(uvicorn.Server):
    """uvicorn's server, calling ``on_listening(host, port)`` once the socket is bound."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[str, int], None] | None = None) -> None:
        super().__init__(config)
        self._on_listening = on_listening

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises a caught SIGINT/SIGTERM after shutting down, which kills the
            # process with that signal. The shutdown was graceful: let the caller exit 0.
            self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._on_listening and self.servers and not self.should_exit:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_listening(host, port)


def make_server(runtime: Runtime, on_listening: Callable[[str, int], None] | None = None) -> StreamerServer:
    server_cfg = runtime.settings.server
    config = uvicorn.Config(
        create_app(runtime),
        host=server_cfg.host,
        port=server_cfg.port,
        ws="websockets-sansio",
        log_level="warning",
        lifespan="on",
    )
    return StreamerServer(config, on_listening)
