"""Inference: model loading, video inputs, engines and the inference loop.

Knows capture (frames, ring buffers); knows nothing of the server.
"""
