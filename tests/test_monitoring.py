"""Monitoring: rules owned by the server, stored events, webhooks and MQTT.

Unit tests for the parts (alert conditions, hours, motion, the store, config checks), then
real `streamer serve` processes with a real Mosquitto broker and a real HTTP receiver that
checks signatures.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from streamer.capture.ring import RingBuffer, motion_between
from streamer.config import ConfigError, parse_settings
from streamer.inference.policy import Policy
from streamer.inference.questions import AlertIf, Answer, FrameSpan, StreamFeed, Watch
from streamer.service import Alerted, Answered, AskRequest, AskService, EventHub
from streamer.service.rules import RuleRunner, RuleState, in_hours
from streamer.service.storage import EventRecord, EventStore, new_event_id
from tests.conftest import ROOT, ServerProcess, start_server, stop_server
from tests.system import MOSQUITTO, require
from tests.wsclient import ProtocolClient

TOKEN = "monitor-token"
SECRET = "hook-secret"


# -- the parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "matched"),
    [
        ("Yes.", "yes"),
        ("**Yes**, a truck is at the bay", "yes"),
        ('"yeah" there is', "yes"),
        ("  YES", "yes"),
        ("No, nothing", None),
        ("Yesterday a truck came", None),
        ("I think yes", None),
        ("", None),
    ],
)
def test_yes_reads_the_first_word(text: str, matched: str | None) -> None:
    """alert_if yes matches an answer whose first word is a yes, after punctuation or markdown, and nothing else."""
    assert AlertIf(yes=True).matches(text) == matched


def test_contains_and_regex_conditions() -> None:
    """contains matches without regard to case; regex is searched anywhere and reports what it matched."""
    assert AlertIf(contains="Truck").matches("a TRUCK at the door") == "Truck"
    assert AlertIf(contains="truck").matches("a van") is None
    assert AlertIf(regex=r"\b(truck|van)s?\b").matches("two vans and a car") == "vans"
    assert AlertIf(regex=r"^\d+$").matches("there are 3") is None
    with pytest.raises(ValueError):
        AlertIf(contains="a", yes=True)


def test_active_hours_wrap_midnight() -> None:
    """active hours include the start, exclude the end, and may wrap midnight."""
    assert in_hours("08:00-18:00", dt.time(8, 0))
    assert not in_hours("08:00-18:00", dt.time(18, 0))
    assert in_hours("22:00-06:00", dt.time(23, 30)) and in_hours("22:00-06:00", dt.time(5, 59))
    assert not in_hours("22:00-06:00", dt.time(12, 0))


def test_motion_score_in_the_ring() -> None:
    """Each pushed frame carries its change from the previous one: 0 for a still picture, more for a changed one."""
    ring = RingBuffer(4)
    still = np.full((48, 64, 3), 100, np.uint8)
    assert ring.push(still.copy()).motion is None
    assert ring.push(still.copy()).motion == 0.0
    moved = still.copy()
    moved[:, :32] = 250
    assert ring.push(moved).motion > 0.2
    assert motion_between(still, np.zeros((10, 10, 3), np.uint8)) is None


def _record(kind: str = "alert", stream: str = "cam", rule: str | None = "r") -> EventRecord:
    return EventRecord(new_event_id(), kind, time.time(), stream, rule, "text", thumbnail=b"jpeg")  # type: ignore[arg-type]


def test_store_pages_newest_first_with_a_cursor(tmp_path: Path) -> None:
    """Events page newest first by cursor, filter by kind, keep ids unique, and survive reopening."""
    store = EventStore(tmp_path, max_age_days=1, max_count=1000)
    records = [_record("alert" if i % 2 else "round") for i in range(7)]
    for r in records:
        store.add(r, ["webhook:x"])
    page, cursor = store.page(limit=3)
    assert [e["id"] for e in page] == [r.id for r in records[::-1][:3]]
    page2, _ = store.page(limit=3, before=cursor)
    assert [e["id"] for e in page2] == [r.id for r in records[::-1][3:6]]
    alerts, _ = store.page(kind="alert", limit=10)
    assert [e["id"] for e in alerts] == [r.id for r in records[::-1] if r.kind == "alert"]
    import sqlite3

    with pytest.raises(sqlite3.IntegrityError):
        store.add(records[0])
    store.close()
    reopened = EventStore(tmp_path, max_age_days=1, max_count=1000)
    assert reopened.count() == 7 and len(reopened.due("webhook:x", time.time())) == 7
    assert reopened.thumbnail(records[0].id) == b"jpeg"


def test_store_retention_by_count_and_age(tmp_path: Path) -> None:
    """Retention keeps only the newest max_count events and drops those older than max_age_days."""
    store = EventStore(tmp_path, max_age_days=1, max_count=100)
    old = EventRecord(new_event_id(), "round", time.time() - 3 * 86400, "cam", "r", "old")
    store.add(old)
    fresh = [_record() for _ in range(105)]
    for r in fresh:
        store.add(r)
    store.prune()
    page, _ = store.page(limit=500)
    assert [e["id"] for e in page] == [r.id for r in fresh[::-1][:100]]


def _settings(rule: dict[str, Any]) -> None:
    parse_settings({"sources": [{"name": "cam", "url": "demo"}], "rules": [rule]})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stream": "nope"}, "nope"),
        ({"alert_if": {"regex": "(unclosed"}}, "regex"),
        ({"every_s": 0.5}, "every_s"),
        ({"alert_if": {"contains": "a", "yes": True}}, "exactly one"),
        ({"active": "8-18"}, "active"),
    ],
)
def test_bad_rules_in_the_config_name_the_field(change: dict[str, Any], field: str) -> None:
    """A rule with an unknown stream, bad regex, every_s < 1, two conditions or bad hours fails naming the field."""
    rule = {"name": "r", "stream": "cam", "question": "?", "every_s": 5, **change}
    with pytest.raises(ConfigError, match=field):
        _settings(rule)


def test_yaml_yes_key_and_duplicate_rule_names() -> None:
    """A bare YAML `yes: true` is read as the yes condition; two rules with one name are refused."""
    data = yaml.safe_load("alert_if: {yes: true}")
    _settings({"name": "r", "stream": "cam", "question": "?", "every_s": 5, **data})
    rule = {"name": "r", "stream": "cam", "question": "?", "every_s": 5}
    with pytest.raises(ConfigError, match="repeated: r"):
        parse_settings({"sources": [{"name": "cam", "url": "demo"}], "rules": [rule, rule]})


def _runner(tmp_path: Path, rule: dict[str, Any], **options: Any) -> tuple[RuleRunner, RuleState, RingBuffer]:
    settings = parse_settings(
        {"sources": [{"name": "cam", "url": "push", "context": "A loading bay seen from above."}], "rules": [rule]}
    )
    ring = RingBuffer(16)
    service = AskService(settings, EventHub())
    store = EventStore(tmp_path, max_age_days=1, max_count=1000)
    runner = RuleRunner(service, store, rings=lambda name: ring, encode=lambda f: b"jpeg", **options)
    runner.session = service.session("rules", max_open=10)
    state = RuleState(settings.rules[0], "config")
    runner.rules[state.cfg.name] = state
    return runner, state, ring


RULE = {"name": "r", "stream": "cam", "question": "Truck?", "every_s": 1}


def test_motion_gate_skips_rounds_of_a_still_camera(tmp_path: Path) -> None:
    """when: motion runs the first round, skips rounds while the picture is still, runs again once it changes."""
    runner, state, ring = _runner(tmp_path, {**RULE, "when": "motion", "motion_threshold": 0.05})
    still = np.full((32, 32, 3), 80, np.uint8)
    ring.push(still.copy())
    assert runner._gate(state) is None  # the first round has nothing to compare with
    ring.push(still.copy())
    assert runner._gate(state) == "no_motion"
    assert runner._gate(state) == "no_motion"  # no new frame at all
    ring.push(np.full((32, 32, 3), 200, np.uint8))
    ring.push(np.full((32, 32, 3), 200, np.uint8))  # still again, but a change came since the last round
    assert runner._gate(state) is None
    assert state.gated == {"no_motion": 2}


def test_active_hours_gate(tmp_path: Path) -> None:
    """Outside its active hours a rule's rounds are skipped and counted as inactive."""
    now = [dt.datetime(2026, 1, 1, 3, 0)]
    runner, state, _ = _runner(tmp_path, {**RULE, "active": "08:00-18:00"}, clock=lambda: now[0])
    assert runner._gate(state) == "inactive"
    now[0] = dt.datetime(2026, 1, 1, 9, 0)
    assert runner._gate(state) is None
    assert state.gated == {"inactive": 1}


def test_a_gated_round_costs_no_model_time_and_keeps_the_grid() -> None:
    """A round the watch's gate refuses is not queued; the next one still falls on the every_s grid."""
    ring = RingBuffer(4)
    ring.push(np.zeros((4, 4, 3), np.uint8))
    policy = Policy({"a": StreamFeed(ring, 2.0)}, queue_size=4)
    answers = iter(["no_motion", None])
    watch = Watch(id="w", stream="a", text="?", owner="o", sink=None, every_s=2.0, frames=2, max_new_tokens=1,  # type: ignore[arg-type]
                  gate=lambda: next(answers))  # fmt: skip
    policy.admit_watch(watch, now=0.0)
    assert policy.enqueue_due_rounds(now=0.0) == 2.0 and not policy.queue
    assert policy.enqueue_due_rounds(now=2.5) == 1.5 and len(policy.queue) == 1
    assert (policy.watches[0].gated, policy.watches[0].rounds) == (1, 1)


def test_cooldown_keeps_one_alert_per_window_and_every_round_is_stored(tmp_path: Path) -> None:
    """Every round is stored; a second alert within cooldown_s is not."""
    runner, state, ring = _runner(tmp_path, {**RULE, "cooldown_s": 3600, "alert_if": {"yes": True}})
    frame = ring.push(np.zeros((8, 8, 3), np.uint8))
    answer = Answer("Yes.", FrameSpan.of([frame]), 1.0, 2.0, 3.0, matched="yes")
    for _ in range(3):
        runner._handle(Answered(runner.session, "r", "cam", answer, watch=True))
        runner._handle(Alerted(runner.session, "r", "cam", "Yes.", answer.frames, "yes"))
    rounds, _ = runner.store.page(kind="round")
    alerts, _ = runner.store.page(kind="alert")
    assert (len(rounds), len(alerts), state.suppressed) == (3, 1, 2)
    assert alerts[0]["matched"] == "yes" and alerts[0]["frames"]["last_seq"] == frame.seq
    assert runner.store.thumbnail(alerts[0]["id"]) == b"jpeg"


def test_a_source_context_goes_before_every_question() -> None:
    """A source's context is put before the question in every prompt about that stream."""
    settings = parse_settings({"sources": [{"name": "cam", "url": "push", "context": "A shop floor."}]})
    service = AskService(settings, EventHub())
    assert service.prompt(AskRequest("q", "cam", "Anyone there?")) == "A shop floor.\nAnyone there?"


# -- real servers, a real broker, a real receiver ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Receiver:
    """A real HTTP endpoint that checks each POST's HMAC and answers ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                receiver.received.append(
                    {
                        "id": self.headers["X-Streamer-Event-Id"],
                        "valid": hmac.compare_digest(expected, self.headers.get("X-Streamer-Signature", "")),
                        "body": json.loads(body),
                        "status": receiver.status,
                    }
                )
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.received if r["status"] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    """A real Mosquitto on a free loopback port."""
    require("mqtt")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _connects(port), 20, "mosquitto to listen")
    yield port
    proc.terminate()
    proc.wait(10)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Subscriber:
    """A real MQTT client following ``streamer/#``."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, int, bool]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber")
        self.client.on_connect = lambda c, *_: c.subscribe("streamer/#", qos=1)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, m.qos, m.retain))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, *_ in list(self.messages) if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


#: Matches every answer (an empty match at its start), so every round is an alert.
ALWAYS = {"alert_if": {"regex": "^"}, "cooldown_s": 0}


def write_config(tmp_path: Path, *, webhook: str | None, mqtt_port: int | None, **extra: Any) -> Path:
    events: dict[str, Any] = {"data_dir": str(tmp_path / "data")}
    if webhook:
        hook = {"url": webhook, "secret_env": "HOOK_SECRET", "kinds": ["alert"], "backoff_initial_s": 0.2}
        events["webhooks"] = [{**hook, "backoff_max_s": 1.0, "timeout_s": extra.pop("hook_timeout_s", 5.0)}]
    if mqtt_port:
        events["mqtt"] = {"url": f"mqtt://127.0.0.1:{mqtt_port}", "topic_prefix": "streamer", "backoff_max_s": 2}
    config = {
        "sources": [{"name": "bay", "url": "demo", "sample_fps": 4, "max_side": 224}],
        "model": {"id": "tiny-random", "frames": 2, "max_new_tokens": 4},
        "server": {"host": "127.0.0.1", "tokens": [TOKEN]},
        "rules": [{"name": "always", "stream": "bay", "question": "Is a truck at the bay?", "every_s": 1, **ALWAYS}],
        "events": events,
        **extra,
    }
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path, log: Path) -> ServerProcess:
    return start_server(["--config", str(config)], log, env={"HOOK_SECRET": SECRET})


def api(server: ServerProcess, path: str, method: str = "GET", body: Any = None, token: str | None = TOKEN) -> Any:
    """(status, JSON body) of an /api call."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.http + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def stored_alert_ids(server: ServerProcess) -> list[str]:
    status, page = api(server, "/api/events?kind=alert&limit=500")
    assert status == 200
    return [e["id"] for e in page["events"]]


@pytest.mark.slow
def test_alerts_reach_webhook_and_mqtt_with_no_client(
    tiny_model: Path, tmp_path: Path, receiver: Receiver, broker: int
) -> None:
    """With no client connected, a rule's alerts arrive signed at the webhook and on MQTT, with the stored ids."""
    subscriber = Subscriber(broker)
    server = serve(write_config(tmp_path, webhook=receiver.url, mqtt_port=broker), tmp_path / "server.log")
    try:
        wait_for(lambda: len(receiver.accepted()) >= 3, 90, "3 webhook alerts")
        wait_for(lambda: len(subscriber.on("streamer/bay/alert")) >= 3, 30, "3 MQTT alerts")
        wait_for(lambda: subscriber.on("streamer/availability") == [b"online"], 30, "availability online")
        wait_for(lambda: subscriber.on("streamer/bay/status"), 30, "a retained status")
        assert all(r["valid"] for r in receiver.received), "every webhook POST carries a valid signature"
        stored = stored_alert_ids(server)
        hook_ids = [r["id"] for r in receiver.accepted()]
        mqtt_ids = [json.loads(p)["id"] for p in subscriber.on("streamer/bay/alert")]
        assert set(hook_ids) <= set(stored) and set(mqtt_ids) <= set(stored)
        assert all(r["body"]["id"] == r["id"] and r["body"]["rule"] == "always" for r in receiver.received)
        status, page = api(server, "/api/events?kind=alert&limit=1")
        assert status == 200 and page["next"] is not None
        thumb = api(server, page["events"][0]["thumbnail"])
        assert thumb[0] == 200 and thumb[1][:2] == b"\xff\xd8", "the thumbnail is a JPEG"
        metrics = urllib.request.urlopen(server.http + "/metrics", timeout=10).read().decode()
        assert 'streamer_rule_rounds_total{rule="always"}' in metrics
    finally:
        stop_server(server)
        subscriber.close()
    assert subscriber.on("streamer/availability")[-1] == b"offline"


@pytest.mark.slow
def test_kill_9_keeps_history_and_resumes_delivery(tiny_model: Path, tmp_path: Path, receiver: Receiver) -> None:
    """After kill -9 and a restart: history intact, ids unique, rules resume, API rules come back, and an
    alert whose webhook was failing at the kill is delivered once the receiver answers 200."""
    receiver.status = 500
    config = write_config(tmp_path, webhook=receiver.url, mqtt_port=None)
    server = serve(config, tmp_path / "first.log")
    rule = {"name": "api-rule", "stream": "bay", "question": "Anyone?", "every_s": 30}
    assert api(server, "/api/rules", "POST", rule)[0] == 201
    wait_for(lambda: len(receiver.received) >= 2, 90, "failing webhook attempts")
    before = stored_alert_ids(server)
    server.proc.kill()  # SIGKILL: no shutdown at all
    server.proc.wait()
    failed_ids = {r["id"] for r in receiver.received}
    assert failed_ids <= set(before)

    receiver.status = 200
    server = serve(config, tmp_path / "second.log")
    try:
        wait_for(lambda: failed_ids <= {r["id"] for r in receiver.accepted()}, 60, "the failed alerts delivered")
        after = wait_for(lambda: (ids := stored_alert_ids(server)) and len(ids) > len(before) + 1 and ids, 60,
                         "new alerts after the restart")  # fmt: skip
        assert set(before) <= set(after), "the stored history is intact"
        assert len(after) == len(set(after)), "no event id is stored twice"
        _, rules = api(server, "/api/rules")
        assert {r["name"]: r["origin"] for r in rules["rules"]} == {"always": "config", "api-rule": "api"}
    finally:
        stop_server(server)


@pytest.mark.slow
def test_bad_api_input_changes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """Bad rules and missing tokens get a 4xx naming the field; a config rule cannot be deleted; a good rule can."""
    server = serve(write_config(tmp_path, webhook=None, mqtt_port=None), tmp_path / "server.log")
    good = {"name": "door", "stream": "bay", "question": "Is the door open?", "every_s": 5,
            "alert_if": {"yes": True}, "cooldown_s": 60}  # fmt: skip
    try:
        cases = [
            ({**good, "stream": "nope"}, 422, "stream"),
            ({**good, "alert_if": {"regex": "(x"}}, 422, "alert_if.regex"),
            ({**good, "every_s": 0.5}, 422, "every_s"),
            ({**good, "name": "always"}, 409, "name"),
            ({**good, "colour": "red"}, 422, "colour"),
        ]
        for body, code, field in cases:
            status, answer = api(server, "/api/rules", "POST", body)
            assert (status, answer["error"]["field"]) == (code, field), body
        assert api(server, "/api/rules", token=None)[0] == 401
        assert api(server, "/api/events", token="wrong")[0] == 401
        assert api(server, "/api/rules", "POST", good, token=None)[0] == 401
        assert api(server, "/api/rules/always", "DELETE")[0] == 403
        assert api(server, "/api/events?kind=nope")[1]["error"]["field"] == "kind"
        assert [r["name"] for r in api(server, "/api/rules")[1]["rules"]] == ["always"]
        assert api(server, "/api/rules", "POST", good)[0] == 201
        assert api(server, "/api/rules/door", "DELETE")[0] == 204
        assert [r["name"] for r in api(server, "/api/rules")[1]["rules"]] == ["always"]
    finally:
        stop_server(server)


class BlackHole:
    """A TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.mark.slow
async def test_unreachable_outlets_never_delay_asks(tiny_model: Path, tmp_path: Path) -> None:
    """While the webhook hangs and the broker is down, people's asks are answered as fast as usual."""
    hole = BlackHole()
    closed_port = free_port()  # nothing listens: the broker is down
    config = write_config(tmp_path, webhook=f"http://127.0.0.1:{hole.port}/hook", mqtt_port=closed_port,
                          hook_timeout_s=60.0)  # fmt: skip
    server = serve(config, tmp_path / "server.log")
    try:
        wait_for(lambda: hole.accepted, 60, "a webhook attempt hanging")
        client = await ProtocolClient.connect(server.url, token=TOKEN)
        assert (await client.recv())["type"] == "welcome"
        totals = []
        for i in range(5):
            msgs = await client.ask(f"q{i}", stream="bay", max_new_tokens=4)
            assert msgs[-1]["type"] == "answer", msgs[-1]
            totals.append(msgs[-1]["timings"]["total_ms"])
        await client.close()
        print(f"ask total_ms with a hanging webhook and a dead broker: {totals}")
        # The webhook attempt in flight waits 60 s; answers never wait for it.
        assert max(totals) < 20_000
        metrics = urllib.request.urlopen(server.http + "/metrics", timeout=10).read().decode()
        assert "streamer_mqtt_connected 0.0" in metrics
        assert stored_alert_ids(server), "alerts are still stored"
    finally:
        stop_server(server)
        hole.close()
    assert os.path.exists(tmp_path / "data" / "events.db")


@pytest.mark.slow
def test_dashboard_rules_view_and_alert_timeline(tiny_model: Path, tmp_path: Path) -> None:
    """In real Chromium the dashboard lists the rules, adds and deletes one, and shows stored alerts with
    thumbnails, paging back through older ones."""
    require("browser")
    from playwright.sync_api import sync_playwright

    from tests.system import CHROMIUM

    config = write_config(tmp_path, webhook=None, mqtt_port=None)
    settings = yaml.safe_load(config.read_text())
    settings["server"]["dashboard_dir"] = str(ROOT / "clients" / "web")  # this checkout's, whatever is installed
    config.write_text(yaml.safe_dump(settings))
    server = serve(config, tmp_path / "server.log")
    try:
        wait_for(lambda: len(stored_alert_ids(server)) > 22, 120, "more than a page of alerts")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.on("pageerror", lambda e: console.append(str(e)))
            page.goto(server.http + "/")
            page.fill("#token-input", TOKEN)
            page.press("#token-input", "Enter")
            page.wait_for_selector("#rules li:has-text('always')", timeout=30_000)
            assert "(config file)" in page.inner_text("#rules li")
            page.wait_for_function("document.querySelectorAll('#timeline li').length >= 20", timeout=30_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#timeline img')].some(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            shown = page.locator("#timeline li").count()
            page.click("#timeline-older")
            page.wait_for_function(f"document.querySelectorAll('#timeline li').length > {shown}", timeout=30_000)
            ids = page.eval_on_selector_all("#timeline li", "els => els.map(e => e.dataset.id)")
            assert len(ids) == len(set(ids)), "no alert shown twice"
            page.fill("#rule-name", "door")
            page.fill("#rule-stream", "bay")
            page.fill("#rule-question", "Is the door open?")
            page.click("#rule-form button[type=submit]")
            page.wait_for_selector("#rules li:has-text('door')", timeout=30_000)
            page.click("#rules li:has-text('door') button")
            page.wait_for_function(
                "![...document.querySelectorAll('#rules li')].some(li => li.textContent.startsWith('door'))",
                timeout=30_000,
            )
            page.fill("#rule-name", "bad")
            page.fill("#rule-stream", "nope")
            page.fill("#rule-question", "?")
            page.click("#rule-form button[type=submit]")
            page.wait_for_selector("#rule-status.error", timeout=30_000)
            assert "stream" in page.inner_text("#rule-status")
            assert not [c for c in console if "rror" in c and "401" not in c], console
            browser.close()
    finally:
        stop_server(server)


def test_mqtt_outlet_reconnects_after_the_broker_goes_away(tmp_path: Path) -> None:
    """The MQTT outlet reconnects by itself when the broker restarts, says online again, and publishes."""
    require("mqtt")
    from streamer.config import MqttConfig
    from streamer.service.outlets import MqttOutlet

    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")

    def broker() -> subprocess.Popen:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _connects(port), 20, "mosquitto to listen")
        return proc

    first = broker()
    outlet = MqttOutlet(MqttConfig(url=f"mqtt://127.0.0.1:{port}", backoff_max_s=2))
    outlet.start()
    try:
        wait_for(lambda: outlet.connected, 20, "the outlet to connect")
        first.terminate()
        first.wait(10)
        wait_for(lambda: not outlet.connected, 20, "the outlet to notice the broker left")
        second = broker()
        try:
            subscriber = Subscriber(port)
            wait_for(lambda: outlet.connected, 30, "the outlet to reconnect")
            wait_for(lambda: subscriber.on("streamer/availability") == [b"online"], 20, "online again")
            outlet.offer(_record("alert", stream="bay"))
            wait_for(lambda: subscriber.on("streamer/bay/alert"), 20, "the alert after reconnecting")
            subscriber.close()
        finally:
            second.terminate()
            second.wait(10)
    finally:
        outlet.stop()
