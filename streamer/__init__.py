"""streamer: answer questions about live video with Qwen2-VL, streamed over WebSocket."""

__version__ = "0.1.0"
