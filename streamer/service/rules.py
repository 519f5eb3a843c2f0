"""Rules: standing questions owned by the server, and the recorder that turns their rounds,
their alerts and every stream's status changes into stored, delivered events.

A :class:`RuleRunner` is one more caller of the service: it opens a session of its own (no
connection owns it) and runs each rule as a watch of that session, so rules keep their
``every_s`` grid and yield to people's asks exactly as watches do, whether or not anyone is
connected. A rule's gate (its ``active`` hours; ``when: motion``) is asked when a round falls
due, and a round it refuses costs no model time and is counted.

The recorder is a subscriber of the events hub with a queue of :data:`RECORDER_QUEUE`
events: rounds come at most one a second per rule, so it would have to stall for hours
before the hub cut it off. It makes one :class:`~streamer.service.storage.EventRecord` per
round, alert (after the rule's cooldown) and status change, encodes the thumbnail on its own
thread, stores it with its webhook deliveries in one transaction, then hands it to the
outlets. Nothing here runs on the event loop or the inference thread but the gates.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from streamer.capture import RingBuffer
from streamer.capture.ring import Frame
from streamer.config import RuleConfig
from streamer.inference.questions import AlertIf
from streamer.service.asks import AskService, Session, WatchRequest
from streamer.service.events import Alerted, Answered, CutOff, Failed, StreamChanged
from streamer.service.storage import EventRecord, EventStore, new_event_id

log = logging.getLogger(__name__)

RECORDER_QUEUE = 100_000
MAX_RULES = 1000


class Outlet(Protocol):
    """Where stored events go next (webhooks, MQTT). ``offer`` must return at once."""

    def targets(self, record: EventRecord) -> list[str]: ...
    def offer(self, record: EventRecord) -> None: ...


class RuleError(ValueError):
    """A rule was refused: ``status`` (HTTP), the ``field`` at fault, and why."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


def in_hours(active: str, now: dt.time) -> bool:
    """Whether ``now`` is within ``HH:MM-HH:MM`` (the end excluded; a range may wrap midnight)."""
    start_s, end_s = active.split("-")
    start, end = dt.time.fromisoformat(start_s), dt.time.fromisoformat("23:59:59.999999" if end_s == "24:00" else end_s)
    return start <= now < end if start <= end else (now >= start or now < end)


def alert_condition(rule: RuleConfig) -> AlertIf | None:
    a = rule.alert_if
    return AlertIf(contains=a.contains, regex=a.regex, yes=a.yes) if a is not None else None


@dataclass
class RuleState:
    """A running rule and what it has done."""

    cfg: RuleConfig
    origin: str  # "config" or "api"
    rounds: int = 0
    alerts: int = 0
    suppressed: int = 0  # alerts within the cooldown
    failed: int = 0
    gated: Counter[str] = field(default_factory=Counter)
    last_alert: float | None = None
    seen_seq: int | None = None  # motion: the newest frame the gate has looked at
    last_round: Answered | None = None

    def public(self) -> dict[str, Any]:
        return {
            **self.cfg.model_dump(mode="json", exclude_none=True),
            "origin": self.origin,
            "read_only": self.origin == "config",
            "rounds": self.rounds,
            "alerts": self.alerts,
            "skipped": dict(self.gated),
        }


# -- what the runner stores: API rules checked, and the records of rounds and alerts ------
# (module-level functions, so that RuleRunner keeps running the rules and the recorder)


def _validate(service: AskService, body: Any) -> RuleConfig:
    """A rule from the API (or stored from it) checked: its fields and its stream."""
    if not isinstance(body, dict):
        raise RuleError(400, "(body)", "a rule is a JSON object")
    try:
        rule = RuleConfig.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise RuleError(422, where, first["msg"]) from None
    if service._source(rule.stream) is None:
        raise RuleError(422, "stream", f"no stream named {rule.stream!r}")
    return rule


def _round_record(
    rings: Callable[[str], RingBuffer | None],
    encode: Callable[[Frame], bytes],
    state: RuleState,
    event: Answered,
    kind: str,
    matched: str | None,
) -> EventRecord:
    """The stored record of a rule's round or alert, with the thumbnail of its last frame."""
    answer = event.answer
    return EventRecord(
        id=new_event_id(),
        kind=kind,  # type: ignore[arg-type]
        time=time.time(),
        stream=event.stream,
        rule=state.cfg.name,
        text=answer.text,
        frames=answer.frames.as_dict(),  # as the protocol's answer message has them
        timings={
            "queued_ms": answer.queued_ms,
            "first_token_ms": answer.first_token_ms,
            "total_ms": answer.total_ms,
        },
        matched=matched,
        thumbnail=_thumbnail(rings, encode, event.stream, answer.frames.last_seq),
    )


def _thumbnail(
    rings: Callable[[str], RingBuffer | None], encode: Callable[[Frame], bytes], stream: str, seq: int
) -> bytes | None:
    """The JPEG of frame ``seq`` when the ring still holds it (encoded here, once per event)."""
    ring = rings(stream)
    frame = next((f for f in reversed(ring.latest(ring.capacity)) if f.seq == seq), None) if ring else None
    if frame is None:
        return None
    try:
        return encode(frame)
    except Exception:
        log.exception("thumbnail of %s #%d failed", stream, seq)
        return None


class RuleRunner:
    """Runs the rules and records events (see the module's docstring)."""

    def __init__(
        self,
        service: AskService,
        store: EventStore,
        *,
        rings: Callable[[str], RingBuffer | None],
        encode: Callable[[Frame], bytes],
        outlets: list[Outlet] = (),  # type: ignore[assignment]
        clock: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        self.service = service
        self.store = store
        self._rings = rings
        self._encode = encode
        self.outlets = list(outlets)
        self._clock = clock
        self.rules: dict[str, RuleState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.recorded: Counter[str] = Counter()
        self.session: Session | None = None
        self._subscription = service.events.subscribe(
            kinds=(Answered, Alerted, Failed, StreamChanged), maxsize=RECORDER_QUEUE, name="recorder"
        )
        self._thread = threading.Thread(target=self._record, name="recorder", daemon=True)

    # -- running -------------------------------------------------------------------------

    def start(self, config_rules: list[RuleConfig]) -> None:
        """Start the recorder, then the configured rules and those stored from the API
        (the service must be serving)."""
        self.session = self.service.session("rules", max_open=MAX_RULES, maxsize=1)
        self.session.events.close()  # the recorder reads every owner's events through its own subscription
        self._thread.start()
        for rule in config_rules:
            self._start_rule(RuleState(rule, "config"))
        for body in self.store.api_rules():
            try:
                self._start_rule(RuleState(_validate(self.service, body), "api"))
            except RuleError as err:  # e.g. its stream is gone from the config
                log.warning("stored rule %r not started: %s: %s", body.get("name"), err.field, err.message)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._subscription.close()

    def _start_rule(self, state: RuleState) -> None:
        rule = state.cfg
        assert self.session is not None
        with self._lock:
            self.rules[rule.name] = state
        self.session.watch(
            WatchRequest(
                id=rule.name,
                stream=rule.stream,
                question=rule.question,
                frames=rule.frames,
                max_new_tokens=rule.max_new_tokens,
                mode=rule.mode,
                every_s=rule.every_s,
                alert_if=alert_condition(rule),
                gate=lambda: self._gate(state),
            )
        )

    def _gate(self, state: RuleState) -> str | None:
        """On the inference thread when a round falls due: why to skip it, or None."""
        rule = state.cfg
        reason = None
        if rule.active is not None and not in_hours(rule.active, self._clock().time()):
            reason = "inactive"
        elif rule.when == "motion":
            ring = self._rings(rule.stream)
            frames = ring.latest(ring.capacity) if ring is not None else []
            new = [f for f in frames if state.seen_seq is None or f.seq > state.seen_seq]
            first = state.seen_seq is None
            if frames:
                state.seen_seq = frames[-1].seq
            score = max((f.motion or 0.0 for f in new), default=0.0)
            if not first and score < rule.motion_threshold:
                reason = "no_motion"
        if reason is not None:
            state.gated[reason] += 1
        return reason

    # -- the rules API -------------------------------------------------------------------

    def add(self, body: Any) -> dict[str, Any]:
        """A rule from the API: validated, stored (it comes back after a restart), started.
        Blocks on disk: call it off the event loop."""
        rule = _validate(self.service, body)
        with self._lock:
            if rule.name in self.rules:
                raise RuleError(409, "name", f"there is a rule named {rule.name!r} already")
            if len(self.rules) >= MAX_RULES:
                raise RuleError(409, "name", f"there are {MAX_RULES} rules already")
        try:
            self.store.save_rule(rule.name, rule.model_dump(mode="json", exclude_none=True))
        except sqlite3.IntegrityError:  # the same name posted twice at once
            raise RuleError(409, "name", f"there is a rule named {rule.name!r} already") from None
        state = RuleState(rule, "api")
        self._start_rule(state)
        return state.public()

    def remove(self, name: str) -> None:
        """Delete a rule made over the API (config rules are read-only). Blocks on disk."""
        with self._lock:
            state = self.rules.get(name)
            if state is None:
                raise RuleError(404, "name", f"no rule named {name!r}")
            if state.origin == "config":
                raise RuleError(403, "name", f"rule {name!r} comes from the config file and is read-only here")
            del self.rules[name]
        self.store.delete_rule(name)
        if self.session is not None:
            self.session.cancel(name)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.public() for s in self.rules.values()]

    # -- recording -----------------------------------------------------------------------

    def _record(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._subscription.wait(0.5)
            except CutOff:
                log.error("recorder fell %d events behind: events were lost; resubscribing", RECORDER_QUEUE)
                self.recorded["lost"] += 1
                self._subscription = self.service.events.subscribe(
                    kinds=(Answered, Alerted, Failed, StreamChanged), maxsize=RECORDER_QUEUE, name="recorder"
                )
                continue
            for event in events:
                try:
                    self._handle(event)
                except Exception:
                    log.exception("recording %s failed", type(event).__name__)

    def _handle(self, event: object) -> None:
        if isinstance(event, StreamChanged):
            st = event.status
            text = st.status if not st.error else f"{st.status}: {st.error}"
            self._save(EventRecord(new_event_id(), "status", time.time(), st.name, None, text))
            return
        if getattr(event, "owner", None) is not self.session or self.session is None:
            return
        state = self.rules.get(event.id)  # type: ignore[attr-defined]
        if state is None:
            return
        if isinstance(event, Answered):
            state.rounds += 1
            state.last_round = event
            self._save(_round_record(self._rings, self._encode, state, event, "round", None))
        elif isinstance(event, Alerted):
            now = time.monotonic()
            if state.last_alert is not None and now - state.last_alert < state.cfg.cooldown_s:
                state.suppressed += 1
                return
            state.last_alert = now
            state.alerts += 1
            if state.last_round is not None:
                self._save(_round_record(self._rings, self._encode, state, state.last_round, "alert", event.matched))
        elif isinstance(event, Failed):
            if event.final:
                log.warning("rule %s ended: %s: %s", event.id, event.code, event.message)
            else:
                state.failed += 1

    def _save(self, record: EventRecord) -> None:
        targets = [t for outlet in self.outlets for t in outlet.targets(record)]
        self.store.add(record, targets)
        self.recorded[record.kind] += 1
        for outlet in self.outlets:
            try:
                outlet.offer(record)
            except Exception:
                log.exception("outlet %r failed on event %s", outlet, record.id)
