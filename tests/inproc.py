"""A real streamer server (uvicorn, loopback sockets) run inside the test process.

For tests that must reach inside: inject a fault into the engine, or read the inference
loop's counters. Clients still talk to it over real WebSocket connections.
"""

from __future__ import annotations

from streamer.benchmark.servers import InProcessServer

__all__ = ["InProcessServer"]
