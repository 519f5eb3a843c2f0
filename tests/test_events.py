"""The events hub: one publish, many subscribers, each with its own bounded queue."""

from __future__ import annotations

import threading

import pytest

from streamer.capture import StreamStatus
from streamer.service.events import Accepted, CutOff, EventHub, Failed, StreamChanged, Token


def test_each_subscriber_gets_what_it_wants_in_order() -> None:
    """Owner subscribers get their own questions' events; everyone-subscribers get all, filtered by kind."""
    hub = EventHub()
    alice = hub.subscribe(owner="alice")
    bob = hub.subscribe(owner="bob")
    ends = hub.subscribe(kinds=(Failed,))
    hub.publish(Accepted("alice", "q1", 0))
    hub.publish(Token("alice", "q1", "hel"))
    hub.publish(Token("bob", "q2", "x"))
    hub.publish(Token("alice", "q1", "lo"))
    hub.publish(Failed("bob", "q2", "cancelled", "cancelled by the client"))
    assert [type(e).__name__ for e in alice.drain()] == ["Accepted", "Token", "Token"]
    assert [e.id for e in bob.drain()] == ["q2", "q2"]
    assert [e.owner for e in ends.drain()] == ["bob"]
    assert alice.drain() == []


def test_stream_status_goes_to_followers_and_to_everyone_subscribers() -> None:
    """StreamChanged reaches subscribers following that stream, and those without an owner."""
    hub = EventHub()
    follower, other, everyone = hub.subscribe(owner="a"), hub.subscribe(owner="b"), hub.subscribe()
    follower.follow("cam")
    other.follow("door")
    hub.publish(StreamChanged(StreamStatus(name="cam", status="down", error="stalled")))
    assert [e.status.name for e in follower.drain()] == ["cam"]
    assert other.drain() == []
    assert len(everyone.drain()) == 1


def test_a_subscriber_that_does_not_drain_is_cut_off_and_nobody_else_notices() -> None:
    """A full queue cuts its subscriber off; publish never blocks, and others get every event in order."""
    hub = EventHub()
    wakes = {"slow": 0, "fast": 0}
    slow = hub.subscribe(owner="o", maxsize=10, wake=lambda: wakes.__setitem__("slow", wakes["slow"] + 1))
    fast = hub.subscribe(owner="o", maxsize=10_000, wake=lambda: wakes.__setitem__("fast", wakes["fast"] + 1))
    got: list[str] = []

    def publisher() -> None:
        for i in range(1000):
            hub.publish(Token("o", "q", str(i)))

    thread = threading.Thread(target=publisher)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    got = [e.text for e in fast.drain()]  # type: ignore[union-attr]
    assert got == [str(i) for i in range(1000)]
    assert wakes["fast"] == 1  # woken when its queue stopped being empty, not per event
    assert wakes["slow"] == 2  # once for the first event, once when it was cut off
    assert slow.cut_off
    with pytest.raises(CutOff):
        slow.drain()
    hub.publish(Token("o", "q", "after"))
    assert [e.text for e in fast.drain()] == ["after"]  # type: ignore[union-attr]


def test_a_thread_can_wait_for_events_and_close_its_subscription() -> None:
    """wait() blocks until an event comes (or the timeout); a closed subscription gets nothing more."""
    hub = EventHub()
    sub = hub.subscribe(owner="o")
    assert sub.wait(0.05) == []
    timer = threading.Timer(0.1, hub.publish, [Accepted("o", "q", 3)])
    timer.start()
    assert [e.position for e in sub.wait(30)] == [3]  # type: ignore[union-attr]
    sub.close()
    hub.publish(Accepted("o", "q", 4))
    assert sub.drain() == []


def test_a_failing_wake_is_logged_and_does_not_reach_the_publisher(caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber whose wake raises still has its event queued; the publisher carries on."""
    hub = EventHub()

    def broken() -> None:
        raise RuntimeError("event loop is closed")

    sub = hub.subscribe(owner="o", wake=broken, name="broken")
    hub.publish(Accepted("o", "q", 0))
    assert len(sub.drain()) == 1
    assert "waking subscriber broken failed" in caplog.text
