"""The ASGI app (Starlette) and the uvicorn server that runs it.

HTTP and the WebSocket share one port and one stack: ``/ws`` (PROTOCOL.md), ``/healthz``,
``/metrics``; the dashboard and an OpenAI-compatible endpoint join as routes here. Every
route sits behind the Host and Origin checks of :mod:`streamer.server.security`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from streamer.capture import StreamStatus
from streamer.server.connection import CLOSE_GOING_AWAY, Connection
from streamer.server.metrics import Metrics
from streamer.server.previews import PreviewHub
from streamer.server.runtime import Runtime
from streamer.server.security import access_middleware, startup_warnings
from streamer.server.subscriptions import Subscriptions

log = logging.getLogger(__name__)

#: The browser dashboard in a source checkout (``pip install -e .``).
DEFAULT_DASHBOARD = Path(__file__).resolve().parents[2] / "clients" / "web"


@dataclass
class ServerState:
    """What the handlers share: the runtime, metrics, subscriptions and open connections."""

    runtime: Runtime
    metrics: Metrics
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    previews: PreviewHub = field(init=False)
    connections: set[Connection] = field(default_factory=set)
    shutting_down: bool = False

    def __post_init__(self) -> None:
        self.previews = PreviewHub(self.runtime)

    async def drain(self, deadline_s: float) -> None:
        """Graceful stop: no new questions; the running answer may finish within the
        deadline, everything else ends with ``shutting_down``; then every connection is
        closed with 1001 once its last messages are sent."""
        started = time.monotonic()
        self.shutting_down = True
        loop = self.runtime.loop
        if loop is not None:
            await asyncio.to_thread(loop.stop, finish_running_within=deadline_s * 0.8)
        await asyncio.sleep(0)  # let the answers posted from the inference thread be queued
        self.previews.close()
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        left = max(0.5, deadline_s - (time.monotonic() - started))
        await asyncio.gather(*(conn.drained(left) for conn in list(self.connections)))
        for conn in list(self.connections):
            conn.abort()  # still stuck behind a peer that does not read


def create_app(runtime: Runtime) -> Starlette:
    state = ServerState(runtime, Metrics(runtime))

    async def healthz(request: Request) -> JSONResponse:
        streams = runtime.stream_objects()
        serving = runtime.loop is not None and not state.shutting_down
        model = runtime.model_info()
        if (backends := runtime.backend_statuses()) is not None:
            model["backends"] = backends
        body = {
            "status": "ok" if serving else ("shutting_down" if state.shutting_down else "starting"),
            "server": runtime.version,
            "model": model,
            "streams": streams,
            "live": [s["id"] for s in streams if s["status"] == "live"],
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        await Connection(websocket, state).serve()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def status_changed(status: StreamStatus) -> None:  # on a capture thread
            try:
                loop.call_soon_threadsafe(state.subscriptions.broadcast_status, status)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        runtime.add_status_listener(status_changed)
        yield
        runtime.stop()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        WebSocketRoute("/ws", websocket_endpoint),
    ]
    dashboard = runtime.settings.server.dashboard_dir or DEFAULT_DASHBOARD
    if dashboard.is_dir():
        routes.append(Mount("/", StaticFiles(directory=dashboard, html=True), name="dashboard"))
    else:
        log.warning("no dashboard at %s: GET / will answer 404", dashboard)
    on_refused = state.metrics.refused.labels
    middleware = access_middleware(runtime.settings.server, lambda reason: on_refused(reason).inc())
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.streamer = state
    return app


class StreamerServer(uvicorn.Server):
    """uvicorn's server with streamer's start and stop: ``on_listening(host, port)`` once
    the socket is bound, and a graceful drain of open questions before connections close."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: ServerState,
        on_listening: Callable[[str, int], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.state = state
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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("shutting down: finishing open answers")
        for server in self.servers:
            server.close()  # take no new connections while draining
        deadline = self.state.runtime.settings.server.shutdown_deadline_s
        try:
            await asyncio.wait_for(self.state.drain(deadline), timeout=deadline + 2)
        except TimeoutError:
            log.warning("shutdown deadline passed; closing what is left")
        await super().shutdown(sockets)


def make_server(runtime: Runtime, on_listening: Callable[[str, int], None] | None = None) -> StreamerServer:
    server_cfg = runtime.settings.server
    for warning in startup_warnings(server_cfg):
        log.warning("%s", warning)
    app = create_app(runtime)
    config = uvicorn.Config(
        app,
        host=server_cfg.host,
        port=server_cfg.port,
        ws="websockets-sansio",
        ws_max_size=server_cfg.max_message_bytes,
        ws_ping_interval=server_cfg.ping_interval_s,
        ws_ping_timeout=server_cfg.ping_timeout_s,
        ssl_certfile=str(server_cfg.tls_cert) if server_cfg.tls_cert else None,
        ssl_keyfile=str(server_cfg.tls_key) if server_cfg.tls_key else None,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=server_cfg.shutdown_deadline_s,
    )
    return StreamerServer(config, app.state.streamer, on_listening)
