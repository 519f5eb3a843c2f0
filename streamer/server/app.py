"""The ASGI app (Starlette) and the uvicorn server that runs it.

HTTP and the WebSocket share one port and one stack: ``/ws`` (PROTOCOL.md), ``/healthz``,
``/metrics``; the dashboard and an OpenAI-compatible endpoint join as routes here. Every
route sits behind the Host and Origin checks of :mod:`streamer.server.security`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path, PurePosixPath

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from streamer.server import protocol, v1
from streamer.server.api import MonitorCollector, api_routes
from streamer.server.connection import Connection
from streamer.server.metrics import Metrics
from streamer.server.previews import PreviewHub
from streamer.server.publishing import Publishers
from streamer.server.runtime import Runtime
from streamer.server.security import access_middleware, bearer_token_ok, startup_warnings
from streamer.server.state import ServerState
from streamer.server.whip import Whip
from streamer.service import Answered, Failed, Subscription

log = logging.getLogger(__name__)


def packaged_dashboard() -> Path:
    """The browser dashboard shipped as package data (``streamer.web``: ``clients/web`` in a
    source checkout, ``streamer/web`` in an installed wheel)."""
    return Path(str(importlib.resources.files("streamer.web")))


class DashboardFiles(StaticFiles):
    """The dashboard's static files; the package's own module files are not served."""

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        if any(part.startswith("__") for part in PurePosixPath(path).parts):  # __init__.py, __pycache__
            return "", None
        return super().lookup_path(path)


def create_app(runtime: Runtime) -> Starlette:
    state = ServerState(runtime, Metrics(runtime), PreviewHub(runtime.ring_of), Publishers(runtime))
    state.metrics.registry.register(MonitorCollector(runtime))
    service = runtime.service
    state.publishers.on_open = state.announce
    whip = Whip(state.publishers, partial(bearer_token_ok, runtime.settings.server))

    async def healthz(request: Request) -> JSONResponse:
        status = "ok" if service.serving else ("shutting_down" if service.shutting_down else "starting")
        model = protocol.model_object(runtime.settings.model.id, runtime.model_note)
        if (backends := runtime.backend_statuses()) is not None:
            model["backends"] = backends  # remote servers: in /healthz, never in welcome
        body = protocol.health(status, runtime.version, model, runtime.statuses())
        return JSONResponse(body, status_code=200 if service.serving else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        await Connection(websocket, state).serve()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        counting = _count_outcomes(state, asyncio.get_running_loop())
        state.publishers.start()
        yield
        await whip.stop()
        await state.publishers.stop()
        counting.close()
        runtime.stop()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        WebSocketRoute("/ws", websocket_endpoint),
        *v1.routes(state),  # the OpenAI-compatible endpoint
        *whip.routes(),  # WebRTC ingest (WHIP)
        *api_routes(runtime),  # rules and stored events
    ]
    dashboard = runtime.settings.server.dashboard_dir or packaged_dashboard()
    if (dashboard / "call.html").is_file():  # the customer's side of a video call: /call?stream=NAME

        async def call_page(request: Request) -> Response:
            return FileResponse(dashboard / "call.html")

        routes.append(Route("/call", call_page))
    if dashboard.is_dir():
        routes.append(Mount("/", DashboardFiles(directory=dashboard, html=True), name="dashboard"))
    else:
        log.warning("no dashboard at %s: GET / will answer 404", dashboard)
    on_refused = state.metrics.refused.labels
    middleware = access_middleware(runtime.settings.server, lambda reason: on_refused(reason).inc())
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.streamer = state
    return app


def _count_outcomes(state: ServerState, loop: asyncio.AbstractEventLoop) -> Subscription:
    """Subscribe the metrics to every question's end; they are counted on the event loop."""

    def count() -> None:
        for event in subscription.drain():
            state.metrics.record(event)  # type: ignore[arg-type]

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(count)
        except RuntimeError:  # the event loop has closed: nobody is counting any more
            pass

    subscription = state.runtime.events.subscribe(kinds=(Answered, Failed), maxsize=100_000, wake=wake, name="metrics")
    return subscription


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
        # Published JPEG frames are larger than messages (Connection holds text to max_message_bytes).
        # Up to twice max_frame_bytes a frame is refused with an error and the publisher goes on;
        # beyond, the WebSocket closes with 1009 (message too big).
        ws_max_size=max(server_cfg.max_message_bytes, 2 * server_cfg.publish.max_frame_bytes),
        ws_ping_interval=server_cfg.ping_interval_s,
        ws_ping_timeout=server_cfg.ping_timeout_s,
        ssl_certfile=str(server_cfg.tls_cert) if server_cfg.tls_cert else None,
        ssl_keyfile=str(server_cfg.tls_key) if server_cfg.tls_key else None,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=server_cfg.shutdown_deadline_s,
    )
    return StreamerServer(config, app.state.streamer, on_listening)
