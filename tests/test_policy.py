"""The inference loop's policy with plain objects and a fake clock: no thread, no model."""

from __future__ import annotations

import numpy as np

from streamer.capture.ring import RingBuffer
from streamer.inference.policy import Job, Policy, answer_of
from streamer.inference.questions import Question, StreamFeed, Watch

NOBODY = object()  # the policy never calls a sink


def _feeds(*names: str, frames: int = 3) -> dict[str, StreamFeed]:
    feeds = {}
    for name in names:
        ring = RingBuffer(8)
        for i in range(frames):
            ring.push(np.full((4, 4, 3), i, np.uint8), ts=100.0 + i)
        feeds[name] = StreamFeed(ring, 2.0)
    return feeds


def _ask(qid: str, stream: str = "a", owner: str = "x", frames: int = 2, mode: str = "video", at: float = 0.0):
    return Question(
        id=qid, stream=stream, text="?", owner=owner, sink=NOBODY, frames=frames, max_new_tokens=1, mode=mode,  # type: ignore[arg-type]
        received_at=at,
    )  # fmt: skip


def _watch(wid: str, stream: str = "a", owner: str = "x", every_s: float = 1.0, contains: str | None = None) -> Watch:
    return Watch(
        id=wid, stream=stream, text="?", owner=owner, sink=NOBODY, every_s=every_s, frames=2, max_new_tokens=1,  # type: ignore[arg-type]
        alert_contains=contains,
    )  # fmt: skip


def _policy(*streams: str, queue_size: int = 8, max_batch: int = 1) -> Policy:
    return Policy(_feeds(*(streams or ("a",))), queue_size=queue_size, max_batch=max_batch)


def _served(policy: Policy) -> list[str]:
    order = []
    while policy.queue:
        order.extend(job.id for job in policy.take_batch())
        policy.batch_done()
    return order


def test_people_go_first_then_the_stream_and_owner_served_least_recently() -> None:
    """Asks run before watch rounds; among asks the least recently served stream, then owner, goes next."""
    policy = _policy("a", "b")
    policy.admit_watch(_watch("w1", owner="x"), now=0.0)
    policy.enqueue_due_rounds(now=0.0)
    for qid, stream, owner in [("a1", "a", "x"), ("a2", "a", "y"), ("a3", "a", "z"), ("b1", "b", "z")]:
        assert policy.admit(_ask(qid, stream, owner)).refusal is None
    positions = {job.id: policy.queue.position(job) for job in policy.queue.items}
    assert _served(policy) == ["a1", "b1", "a2", "a3", "w1"]
    assert [positions[q] for q in ("a1", "b1", "a2", "a3", "w1")] == [0, 1, 2, 3, 4]


def test_a_new_ask_supersedes_the_owners_waiting_ask_on_that_stream_only() -> None:
    """The same owner's waiting ask on the same stream is superseded; other owners' and streams' are not."""
    policy = _policy("a", "b")
    old = policy.admit(_ask("old", "a", "x")).item
    others = [policy.admit(_ask("other-owner", "a", "y")).item, policy.admit(_ask("other-stream", "b", "x")).item]
    new = policy.admit(_ask("new", "a", "x"))
    assert new.refusal is None and new.superseded == [old]
    assert [job.id for job in policy.queue.items] == [o.id for o in others] + ["new"]


def test_refusals_say_why_and_a_full_queue_counts_asks_only() -> None:
    """Unknown stream, no frames, a full queue (watch rounds not counted) and stopping are refused."""
    feeds = {**_feeds("a"), "empty": StreamFeed(RingBuffer(4), 2.0)}
    policy = Policy(feeds, queue_size=2)
    assert policy.admit(_ask("u", stream="nope")).refusal[0] == "unknown_stream"  # type: ignore[index]
    assert policy.admit(_ask("e", stream="empty")).refusal[0] == "stream_unavailable"  # type: ignore[index]
    assert policy.admit_watch(_watch("w", stream="nope"), now=0).refusal[0] == "unknown_stream"  # type: ignore[index]
    policy.admit_watch(_watch("w"), now=0)
    policy.enqueue_due_rounds(now=0)  # a round waits: it does not take an ask's place
    assert policy.admit(_ask("q1", owner="x")).refusal is None
    assert policy.admit(_ask("q2", owner="y")).refusal is None
    assert policy.admit(_ask("q3", owner="z")).refusal[0] == "busy"  # type: ignore[index]
    ended = policy.stop()
    assert [job.id for job in ended.queued] == ["w", "q1", "q2"] and [st.watch.id for st in ended.watches] == ["w"]
    assert policy.admit(_ask("late", owner="v")).refusal == ("shutting_down", "the server is shutting down")
    assert policy.submitted == 6  # every ask handed in counts, refused or not


def test_watch_rounds_keep_to_the_grid_and_one_at_most_is_open() -> None:
    """With a fake clock: a round falls due every every_s; while one is open the due ones are skipped."""
    policy = _policy()
    standing = policy.admit_watch(_watch("w", every_s=2.0), now=10.0).item
    assert policy.enqueue_due_rounds(now=10.0) == 2.0  # the first round is due at once; the next in 2 s
    assert standing.rounds == 1 and len(policy.queue) == 1
    round_job = policy.take_batch()[0]
    assert round_job.question.received_at == 10.0 and round_job.received_seq == 2
    assert policy.enqueue_due_rounds(now=15.5) == 0.5  # 12 and 14 fell due while it ran: skipped
    assert (standing.rounds, standing.skipped, policy.skipped_rounds) == (1, 2, 2)
    assert policy.finish(round_job, "answer") and not policy.finish(round_job, "answer")
    policy.batch_done()
    assert policy.enqueue_due_rounds(now=15.75) == 0.25  # not due yet: nothing queued
    assert not policy.queue
    policy.enqueue_due_rounds(now=16.0)  # on the grid (10, 12, 14, 16), not 15.5 + 2
    assert standing.rounds == 2 and len(policy.queue) == 1


def test_a_batch_takes_questions_about_the_same_window_up_to_max_batch() -> None:
    """The next question plus waiting ones with the same stream, mode and frame count, at most max_batch."""
    policy = _policy("a", "b", max_batch=3)
    asks = [
        ("q1", "a", 2, "video"),
        ("other-stream", "b", 2, "video"),
        ("other-frames", "a", 4, "video"),
        ("image", "a", 2, "image"),
        *((qid, "a", 2, "video") for qid in ("q2", "q3", "q4")),
    ]
    for qid, stream, frames, mode in asks:
        policy.admit(_ask(qid, stream, owner=qid, frames=frames, mode=mode))
    assert policy.wants_more() is False  # more than max_batch wait already
    assert [job.id for job in policy.take_batch()] == ["q1", "q2", "q3"]
    assert [job.id for job in policy.running] == ["q1", "q2", "q3"]
    policy.batch_done()
    assert not policy.running
    fresh = _policy(max_batch=3)
    fresh.admit(_ask("alone"))
    assert fresh.wants_more()  # one waits: a starting batch may wait for more


def test_joiners_run_beside_a_batch_but_leave_the_batch_handed_out_as_it_was() -> None:
    """Questions that join a running batch count as running; the batch the loop was handed stays its own."""
    policy = _policy(max_batch=4)
    policy.admit(_ask("first", owner="a"))
    batch = policy.take_batch()
    policy.admit(_ask("late", owner="b"))
    joined = policy.take_joiners(batch[0], 4, lambda job: True)
    assert [job.id for job in joined] == ["late"]
    assert [job.id for job in policy.running] == ["first", "late"]
    assert [job.id for job in batch] == ["first"]  # the loop pairs it with the engine's results


def test_cancel_takes_out_waiting_asks_and_watches_and_stops_running_ones() -> None:
    """A cancel removes matching waiting asks and watches (with their waiting round), and marks running ones."""
    policy = _policy()
    running = policy.admit(_ask("run", owner="x")).item
    policy.take_batch()
    waiting = policy.admit(_ask("wait", owner="y")).item
    standing = policy.admit_watch(_watch("w", owner="y"), now=0).item
    policy.enqueue_due_rounds(now=0)
    ended = policy.cancel(lambda owner, qid: owner == "y")
    assert ended.queued == [waiting] and ended.watches == [standing] and not policy.queue and not policy.watches
    assert ended.running == [] and running.stop_code is None
    ended = policy.cancel(lambda owner, qid: (owner, qid) == ("x", "run"))
    assert ended.running == [running] and running.stop_code == "cancelled"
    policy.stop_running()
    assert running.stop_code == "cancelled"  # the first reason to stop stands


def test_a_removed_stream_hands_back_its_asks_and_watches() -> None:
    """Dropping a stream takes out its waiting asks and watches; other streams' stay."""
    policy = _policy("a", "b")
    gone = policy.admit(_ask("gone", "a")).item
    stays = policy.admit(_ask("stays", "b")).item
    standing = policy.admit_watch(_watch("w", "a"), now=0).item
    policy.enqueue_due_rounds(now=0)
    ended = policy.drop_stream("a")
    assert ended.queued == [gone] and ended.watches == [standing]
    assert policy.queue.items == [stays] and policy.watches == []


def test_an_answer_carries_its_frames_timings_and_alert_match() -> None:
    """answer_of measures from the question's arrival and matches alert_contains without regard to case."""
    feeds = _feeds("a", frames=4)
    round_job = Job(
        Question(id="w", stream="a", text="?", owner="x", sink=NOBODY, frames=2, max_new_tokens=1, received_at=1.0,  # type: ignore[arg-type]
                 watch=_watch("w", contains="Cat")),
        received_seq=3,
    )  # fmt: skip
    frames = feeds["a"].ring.latest(2)
    answer = answer_of(round_job, "a black CAT sits", frames, started=1.25, first_token_at=1.5, done=2.0)
    assert (answer.queued_ms, answer.first_token_ms, answer.total_ms) == (250.0, 500.0, 1000.0)
    assert (answer.frames.first_seq, answer.frames.last_seq, answer.frames.count) == (2, 3, 2)
    assert answer.matched == "Cat"
    ask = Job(_ask("q", at=1.0), received_seq=3)
    assert answer_of(ask, "cat", frames, 1.0, None, 1.0).matched is None
