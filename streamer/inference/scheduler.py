"""The names the inference loop's tests have always imported from here, now re-exported.

The loop lives in three modules: :mod:`streamer.inference.questions` (the vocabulary),
:mod:`streamer.inference.policy` (its decisions, without threads) and
:mod:`streamer.inference.loop` (the thread). New code imports from those; this module goes
once the tests that import it have moved (after issue 12's fast-path work lands).
"""

from streamer.inference.loop import InferenceLoop
from streamer.inference.policy import FairQueue
from streamer.inference.questions import (
    Answer,
    AnswerSink,
    ErrorCode,
    FrameSpan,
    Mode,
    Question,
    Rejected,
    StreamFeed,
    Watch,
    WatchSink,
    window_of,
)

__all__ = [
    "Answer",
    "AnswerSink",
    "ErrorCode",
    "FairQueue",
    "FrameSpan",
    "InferenceLoop",
    "Mode",
    "Question",
    "Rejected",
    "StreamFeed",
    "Watch",
    "WatchSink",
    "window_of",
]
