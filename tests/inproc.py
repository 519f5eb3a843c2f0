"""A real streamer server (uvicorn, loopback sockets) run inside the test process.

For tests that must reach inside: inject a fault into the engine, or read the inference
loop's counters. Clients still talk to it over real WebSocket connections.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from streamer.config import Settings, parse_settings
from streamer.inference.engine import Engine
from streamer.server.app import make_server
from streamer.server.runtime import Runtime


class InProcessServer:
    def __init__(self, config: dict[str, Any], engine: Engine | None = None) -> None:
        config = {**config, "server": {**config.get("server", {}), "port": 0}}
        self.settings: Settings = parse_settings(config)
        self.runtime = Runtime(self.settings, engine=engine)
        self.port: int | None = None
        self._ready = threading.Event()
        self._server = make_server(self.runtime, self._listening)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)

    def _listening(self, host: str, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, min_frames: int = 8) -> InProcessServer:
        self.runtime.start_capture()
        self.runtime.load_engine()
        self.runtime.start_inference()
        self._thread.start()
        assert self._ready.wait(30), "server did not start"
        deadline = time.monotonic() + 30
        while any(len(c.ring) < min_frames for c in self.runtime.captures.values()):
            assert time.monotonic() < deadline, "streams have no frames"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.runtime.stop()

    @property
    def runtime_state(self):
        """The app's shared state (connections, previews, metrics)."""
        return self._server.state

    @property
    def loop(self):
        assert self.runtime.loop is not None
        return self.runtime.loop
