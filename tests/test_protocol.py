"""The wire protocol: client messages parsed strictly, service events encoded as server messages."""

from __future__ import annotations

import json

import pytest

from streamer.capture import StreamStatus
from streamer.inference.questions import Answer, FrameSpan
from streamer.server.protocol import (
    Ask,
    Hello,
    ProtocolError,
    Subscribe,
    Watch,
    encode,
    event_message,
    parse_client_message,
)
from streamer.service import Accepted, Alerted, Answered, AskRequest, Failed, StreamChanged, Token, WatchRequest


def test_valid_messages_parse() -> None:
    ask = parse_client_message(json.dumps({"type": "ask", "id": "1", "stream": "s", "question": "q", "frames": 2}))
    assert isinstance(ask, Ask) and ask.frames == 2 and ask.max_new_tokens is None
    hello = parse_client_message('{"type": "hello", "token": "t", "client": "me", "future_field": 1}')
    assert isinstance(hello, Hello) and hello.token == "t"  # unknown extra fields are ignored
    watch = parse_client_message(
        json.dumps(
            {"type": "watch", "id": "w", "stream": "s", "question": "q", "every_s": 2, "alert_if": {"contains": "x"}}
        )
    )
    assert isinstance(watch, Watch) and watch.alert_if is not None and watch.alert_if.contains == "x"
    assert isinstance(parse_client_message('{"type": "subscribe", "stream": "s"}'), Subscribe)


@pytest.mark.parametrize(
    ("raw", "fragment", "has_id"),
    [
        ("nope", "not valid JSON", False),
        (b"\xff\xfe", "not valid JSON", False),
        ("[]", "JSON object", False),
        ('{"id": "a"}', "no string field 'type'", True),
        ('{"type": 5}', "no string field 'type'", False),
        ('{"type": "dance", "id": "a"}', "unknown message type 'dance'", True),
        ('{"type": "ask", "id": "a", "stream": "s"}', "missing field 'question'", True),
        ('{"type": "ask", "id": "a", "stream": "s", "question": "q", "frames": 65}', "field 'frames'", True),
        ('{"type": "ask", "id": "a", "stream": "s", "question": "q", "frames": 8.5}', "field 'frames'", True),
        ('{"type": "ask", "id": "a", "stream": "s", "question": "q", "frames": true}', "field 'frames'", True),
        ('{"type": "ask", "id": "", "stream": "s", "question": "q"}', "field 'id'", False),
        ('{"type": "watch", "id": "w", "stream": "s", "question": "q", "every_s": 0.5}', "field 'every_s'", True),
        ('{"type": "subscribe", "stream": "s", "preview_fps": 11}', "field 'preview_fps'", False),
    ],
)
def test_invalid_messages_are_bad_requests(raw: str | bytes, fragment: str, has_id: bool) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(raw)
    assert info.value.code == "bad_request"
    assert fragment in info.value.message
    assert (info.value.id is not None) == has_id


def test_encode_drops_unset_fields_and_keeps_utf8() -> None:
    text = encode({"type": "error", "id": None, "code": "bad_request", "message": "视频"})
    assert json.loads(text) == {"type": "error", "code": "bad_request", "message": "视频"}
    assert "视频" in text


def test_asks_and_watches_become_service_requests() -> None:
    """Parsed ask and watch messages map onto the service's requests, unset options left unset."""
    ask = parse_client_message('{"type": "ask", "id": "1", "stream": "s", "question": "q", "mode": "image"}')
    assert ask.request() == AskRequest("1", "s", "q", mode="image")  # type: ignore[union-attr]
    watch = parse_client_message(
        '{"type": "watch", "id": "w", "stream": "s", "question": "q", "every_s": 2, "alert_if": {"contains": "x"}}'
    )
    assert watch.request() == WatchRequest("w", "s", "q", every_s=2, alert_contains="x")  # type: ignore[union-attr]


def test_a_strided_answer_says_its_stride_and_a_plain_one_does_not() -> None:
    """frames.stride (an extension) appears when the window's frames are more than one sampled frame apart."""
    strided = Answer("hi", FrameSpan(30, 39, 4, 10.0, 14.5, stride=3), queued_ms=1.0, first_token_ms=2.0, total_ms=3.0)
    plain = Answer("hi", FrameSpan(3, 6, 4, 10.0, 11.5), queued_ms=1.0, first_token_ms=2.0, total_ms=3.0)
    assert json.loads(encode(event_message(Answered("o", "q", "cam", strided))))["frames"]["stride"] == 3
    assert "stride" not in json.loads(encode(event_message(Answered("o", "q", "cam", plain))))["frames"]
    assert list(strided.frames.seqs()) == [30, 33, 36, 39]


def test_every_event_has_its_wire_shape() -> None:
    """Service events encode as PROTOCOL.md's server messages (and their documented extensions)."""
    span = FrameSpan(3, 6, 4, 10.0, 11.5)
    answer = Answer("hi", span, queued_ms=1.0, first_token_ms=2.0, total_ms=3.0, token_ids=(5, 7))
    shown = {
        "accepted": Accepted("o", "q", 2),
        "token": Token("o", "q", "h"),
        "answer": Answered("o", "q", "cam", answer),
        "round": Answered("o", "w", "cam", answer, watch=True),
        "alert": Alerted("o", "w", "cam", "hi", span, "HI"),
        "error": Failed("o", "q", "cancelled", "cancelled by the client"),
        "round error": Failed("o", "w", "internal", "boom", watch=True, final=False),
        "watch end": Failed("o", "w", "cancelled", "cancelled by the client", watch=True),
        "status": StreamChanged(StreamStatus(name="cam", status="down", error="stalled", reconnects=2)),
    }
    wire = {name: json.loads(encode(event_message(event))) for name, event in shown.items()}
    frames = {"first_seq": 3, "last_seq": 6, "count": 4, "first_ts": 10.0, "last_ts": 11.5}
    timings = {"queued_ms": 1.0, "first_token_ms": 2.0, "total_ms": 3.0}
    assert wire["accepted"] == {"type": "accepted", "id": "q", "position": 2}
    assert wire["token"] == {"type": "token", "id": "q", "text": "h"}
    assert wire["answer"] == {"type": "answer", "id": "q", "text": "hi", "stream": "cam", "frames": frames,
                              "timings": timings, "token_ids": [5, 7]}  # fmt: skip
    assert wire["round"] == {**wire["answer"], "id": "w", "watch": True}
    assert wire["alert"] == {
        "type": "alert",
        "id": "w",
        "text": "hi",
        "stream": "cam",
        "frames": frames,
        "matched": "HI",
    }
    assert wire["error"] == {"type": "error", "id": "q", "code": "cancelled", "message": "cancelled by the client"}
    assert wire["round error"] == {"type": "error", "id": "w", "code": "internal", "message": "boom", "watch": True}
    assert "watch" not in wire["watch end"]
    assert wire["status"] == {"type": "stream_status", "stream": "cam", "status": "down", "fps_in": 0.0,
                              "fps_sampled": 0.0, "error": "stalled", "frames_dropped": 0, "reconnects": 2}  # fmt: skip
