from __future__ import annotations

import json

import pytest

from streamer.server.protocol import Ask, Hello, ProtocolError, Subscribe, Watch, encode, parse_client_message


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
