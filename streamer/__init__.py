"""streamer: answer questions about live video with Qwen2-VL, streamed over WebSocket.

Layers, lowest first, each importing only those below it: :mod:`streamer.config`,
:mod:`streamer.capture` (frames into ring buffers), :mod:`streamer.inference` (the loop,
its policy and the engines), :mod:`streamer.service` (asks, watches and their events),
:mod:`streamer.server` (the WebSocket and HTTP adapters), then :mod:`streamer.benchmark`
and :mod:`streamer.cli` at the top. ``streamer.web`` is the dashboard, as package data.
"""

__version__ = "0.1.0"
