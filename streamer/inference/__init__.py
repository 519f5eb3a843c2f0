"""Inference: from a question and a window of frames to a streamed answer.

The vocabulary of asking (:mod:`~streamer.inference.questions`: questions, watches,
answers, error codes) and the loop's decisions (:mod:`~streamer.inference.policy`: fair
order, supersede, watch cadence, batches) are plain code, importable without torch. The
loop's thread (:mod:`~streamer.inference.loop`) drives them and an engine; engines are
chosen by name (:mod:`~streamer.inference.registry`, ``model.backend``). The rest is the
transformers engine: model loading, video inputs, the fast path, the tiny test models.

May import :mod:`streamer.config` and :mod:`streamer.capture`; knows nothing of the
service or the server.
"""
