"""The protocol over loopback against a real `streamer serve` process (demo config, tiny model)."""

from __future__ import annotations

import pytest

from tests.conftest import ServerProcess
from tests.wsclient import ProtocolClient

pytestmark = pytest.mark.slow


async def _client(server: ServerProcess) -> ProtocolClient:
    client = await ProtocolClient.connect(server.url)
    welcome = await client.recv()
    assert welcome["type"] == "welcome"
    return client


async def test_welcome_lists_streams_and_model(demo_server: ServerProcess) -> None:
    client = await ProtocolClient.connect(demo_server.url)
    welcome = await client.recv()
    await client.close()
    assert welcome["type"] == "welcome"
    assert welcome["protocol"] == 1
    assert isinstance(welcome["server"], str)
    (stream,) = welcome["streams"]
    assert stream["id"] == "demo" and stream["name"] == "demo"
    assert stream["status"] == "live"
    assert (stream["width"], stream["height"]) == (448, 336)
    assert stream["frames_buffered"] >= 1
    for key in ("fps_in", "fps_sampled"):
        assert isinstance(stream[key], float | int)
    assert "gibberish" in welcome["model"]["note"]


async def test_ask_streams_tokens_that_make_the_answer(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    newest_before = demo_server.healthz()["streams"][0]["last_seq"]
    msgs = await client.ask("q1", max_new_tokens=24)
    await client.close()

    assert msgs[0] == {"type": "accepted", "id": "q1", "position": 0}
    tokens = [m for m in msgs if m["type"] == "token"]
    answer = msgs[-1]
    assert answer["type"] == "answer", answer
    assert [m["type"] for m in msgs[1:-1]] == ["token"] * len(tokens)
    assert tokens, "the answer must stream in as tokens"
    assert "".join(t["text"] for t in tokens) == answer["text"]
    assert answer["stream"] == "demo"

    frames = answer["frames"]
    assert frames["last_seq"] >= newest_before
    assert frames["count"] == 8  # the demo config's frame count
    assert frames["last_seq"] - frames["first_seq"] == 7
    assert frames["first_ts"] <= frames["last_ts"]
    # 8 frames sampled at 2 fps span 3.5 s of media time; paced at real time, their capture
    # times cannot be closer together (a loaded machine may spread them further apart).
    assert frames["last_ts"] - frames["first_ts"] > 3.0

    t = answer["timings"]
    assert 0 <= t["queued_ms"] <= t["first_token_ms"] <= t["total_ms"]


async def test_frames_and_max_new_tokens_are_honoured(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    msgs = await client.ask("q-small", frames=3, max_new_tokens=1)
    await client.close()
    answer = msgs[-1]
    assert answer["type"] == "answer"
    assert answer["frames"]["count"] == 3
    assert len([m for m in msgs if m["type"] == "token"]) <= 1


async def test_bad_requests_then_normal_answer_on_same_connection(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    await client.send("this is not json")
    err = await client.recv()
    assert err["type"] == "error" and err["code"] == "bad_request"
    assert "JSON" in err["message"]

    await client.send({"type": "ask", "id": "missing-question", "stream": "demo"})
    err = await client.recv()
    assert err == {
        "type": "error",
        "id": "missing-question",
        "code": "bad_request",
        "message": err["message"],
    }
    assert "question" in err["message"]

    await client.send({"type": "no-such-type"})
    err = await client.recv()
    assert err["code"] == "bad_request" and "no-such-type" in err["message"]

    msgs = await client.ask("after-errors", max_new_tokens=4)
    await client.close()
    assert msgs[-1]["type"] == "answer"


async def test_invalid_field_values_are_bad_requests(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    cases = [
        {"type": "ask", "id": "a", "stream": "demo", "question": ""},
        {"type": "ask", "id": "a", "stream": "demo", "question": "x" * 2001},
        {"type": "ask", "id": "a", "stream": "demo", "question": "q", "frames": 1},
        {"type": "ask", "id": "a", "stream": "demo", "question": "q", "frames": "8"},
        {"type": "ask", "id": "a", "stream": "demo", "question": "q", "max_new_tokens": 0},
        {"type": "ask", "id": "x" * 65, "stream": "demo", "question": "q"},
        [1, 2, 3],
    ]
    for case in cases:
        await client.send(case)
        err = await client.recv()
        assert err["type"] == "error" and err["code"] == "bad_request", (case, err)
    await client.close()


async def test_unknown_stream(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    msgs = await client.ask("q-unknown", stream="no-such-stream")
    await client.close()
    assert msgs == [{"type": "error", "id": "q-unknown", "code": "unknown_stream", "message": msgs[0]["message"]}]


async def test_newer_ask_supersedes_queued_one(demo_server: ServerProcess) -> None:
    busy = await _client(demo_server)
    asker = await _client(demo_server)
    # Keep the model busy with a long answer so the next asks have to queue: they ask about 4
    # frames, so they cannot join the running 8-frame batch (continuous batching would let an
    # ask about the same window join between decode steps, and a running ask is not superseded).
    await busy.send({"type": "ask", "id": "long", "stream": "demo", "question": "Describe.", "max_new_tokens": 1024})
    first = await busy.recv_type("token")
    assert first["id"] == "long"
    await asker.send({"type": "ask", "id": "old", "stream": "demo", "question": "First?", "frames": 4})
    await asker.send(
        {"type": "ask", "id": "new", "stream": "demo", "question": "Second?", "max_new_tokens": 4, "frames": 4}
    )
    old = await asker.until_final("old")
    await busy.send({"type": "cancel", "id": "long"})
    new = await asker.until_final("new")
    long_end = await busy.until_final("long")
    await busy.close()
    await asker.close()
    assert old[0]["type"] == "accepted" and old[0]["position"] >= 1
    assert old[-1]["type"] == "error" and old[-1]["code"] == "superseded"
    assert new[-1]["type"] == "answer"
    assert long_end[-1]["code"] == "cancelled"


async def test_duplicate_open_id_is_refused(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    await client.send({"type": "ask", "id": "dup", "stream": "demo", "question": "One?", "max_new_tokens": 1024})
    await client.send({"type": "ask", "id": "dup", "stream": "demo", "question": "Two?"})
    msgs = []
    while True:
        m = await client.recv()
        msgs.append(m)
        if m["type"] == "error" and m["code"] == "duplicate_id":
            break
    await client.send({"type": "cancel", "id": "dup"})
    end = await client.until_final("dup")
    await client.close()
    assert end[-1]["type"] == "error" and end[-1]["code"] == "cancelled"


async def test_utf8_questions_pass_through(demo_server: ServerProcess) -> None:
    client = await _client(demo_server)
    for i, question in enumerate(["视频里有什么在动？", "ما الذي يتحرك في الفيديو؟"]):
        msgs = await client.ask(f"utf8-{i}", question=question, max_new_tokens=8)
        assert msgs[-1]["type"] == "answer"
        assert "".join(m["text"] for m in msgs if m["type"] == "token") == msgs[-1]["text"]
    await client.close()


async def test_clients_are_served_while_another_answer_streams(demo_server: ServerProcess) -> None:
    """While one client's long answer streams, others connect, are accepted and queued behind it,
    the first answer keeps streaming, and once it ends each of the others gets exactly one answer."""
    first = await _client(demo_server)
    await first.send({"type": "ask", "id": "long", "stream": "demo", "question": "Go on.", "max_new_tokens": 1024})
    await first.recv_type("token")
    others = [await _client(demo_server) for _ in range(2)]  # welcomed while "long" streams
    for i, c in enumerate(others):
        await c.send(
            # About 4 frames: they cannot join the running 8-frame batch, so they queue behind it.
            {
                "type": "ask",
                "id": f"c{i}",
                "stream": "demo",
                "question": "What is moving?",
                "max_new_tokens": 4,
                "frames": 4,
            }
        )
    accepted = [await c.recv_type("accepted") for c in others]
    # The first answer still streams after the others were accepted: nobody waited for it.
    still_streaming = await first.recv_type("token")
    await first.send({"type": "cancel", "id": "long"})
    long_end = await first.until_final("long")
    results = [await c.until_final(f"c{i}") for i, c in enumerate(others)]
    for c in [first, *others]:
        await c.close()
    assert still_streaming["id"] == "long" and long_end[-1]["code"] == "cancelled"
    assert sorted(a["position"] for a in accepted) == [1, 2]  # queued behind the running answer
    for i, r in enumerate(results):
        assert [m["type"] for m in r].count("answer") == 1 and r[-1]["type"] == "answer", r
        assert all(m["id"] == f"c{i}" for m in r)


def test_healthz_reports_live_streams(demo_server: ServerProcess) -> None:
    health = demo_server.healthz()
    assert health["status"] == "ok"
    assert health["live"] == ["demo"]
    assert health["streams"][0]["last_seq"] >= 0
