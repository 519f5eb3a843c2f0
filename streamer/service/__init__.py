"""The service layer: asks and watches for every adapter, and the events they produce.

:mod:`~streamer.service.asks` admits questions (defaults, limits that are not per socket),
builds them for the inference loop and turns the loop's reports into events;
:mod:`~streamer.service.events` fans events (answers, tokens, alerts, stream status) out to
any number of subscribers, each with its own bounded queue. Adapters (the WebSocket server
today; an HTTP API, rule runners, webhooks next) live above and talk only to this layer.

May import config, capture and the inference vocabulary (:mod:`streamer.inference.questions`);
never the server, never torch.
"""

from streamer.service.asks import AskRequest, AskService, Session, WatchRequest
from streamer.service.events import (
    Accepted,
    Alerted,
    Answered,
    CutOff,
    Event,
    EventHub,
    Failed,
    StreamChanged,
    Subscription,
    Token,
)

__all__ = [
    "Accepted",
    "Alerted",
    "Answered",
    "AskRequest",
    "AskService",
    "CutOff",
    "Event",
    "EventHub",
    "Failed",
    "Session",
    "StreamChanged",
    "Subscription",
    "Token",
    "WatchRequest",
]
