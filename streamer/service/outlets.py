"""Where stored events go: webhooks (HTTP POST with an HMAC signature) and an MQTT broker.

Neither ever blocks the recorder, the inference thread or the event loop: each webhook has a
thread of its own that works through the deliveries stored for it, and MQTT publishes into
paho-mqtt's client, whose own network thread connects, reconnects and sends.

Webhooks (at least once): each event's delivery is stored with the event
(:class:`~streamer.service.storage.EventStore`), so a restart resumes what was not
delivered. A non-2xx answer or a timeout is retried with exponential backoff
(``backoff_initial_s`` doubling up to ``backoff_max_s``) until ``retry_for_s`` after the
event; then the delivery is dead (counted in ``/metrics``). Receivers drop repeats by
``X-Streamer-Event-Id``. The body's bytes are fixed when the event is stored, so every
attempt carries the same ``X-Streamer-Signature: sha256=<hex HMAC-SHA256 of the body>``.
Sent with the standard library's ``urllib`` on the outlet's thread: one POST at a time per
webhook needs no async client, and no dependency.

MQTT (paho-mqtt, the maintained reference client; its threaded loop suits a server whose
recorder is a thread, and aiomqtt would only wrap it in asyncio): alerts to
``<prefix>/<stream>/alert`` (QoS 1), rounds to ``<prefix>/<stream>/round`` (QoS 0), stream
status to ``<prefix>/<stream>/status`` (QoS 1, retained); ``<prefix>/availability`` is
``online`` (retained) while connected, and the broker publishes the last will ``offline``
when the server goes away. A broker that is down is retried with backoff by paho's thread;
QoS 1 messages wait in a bounded queue meanwhile (QoS 0 ones are dropped).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from streamer.config import MqttConfig, WebhookConfig
from streamer.service.storage import Delivery, EventRecord, EventStore

log = logging.getLogger(__name__)


def signature(secret: bytes, body: bytes) -> str:
    """``X-Streamer-Signature``'s value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookOutlet:
    """One webhook: its stored deliveries worked through on a thread of its own."""

    def __init__(self, cfg: WebhookConfig, store: EventStore) -> None:
        self.cfg = cfg
        self.store = store
        self.target = f"webhook:{cfg.url}"
        self._secret: bytes | None = None
        if cfg.secret_env is not None:
            value = os.environ.get(cfg.secret_env)
            if not value:
                raise ValueError(f"events.webhooks: environment variable {cfg.secret_env} (secret_env) is not set")
            self._secret = value.encode()
        counts = store.delivery_counts(self.target)
        self.delivered = counts.get("done", 0)
        self.dead = counts.get("dead", 0)
        self.failures = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"webhook-{urlsplit(cfg.url).netloc}", daemon=True)

    def __repr__(self) -> str:
        return f"WebhookOutlet({urlsplit(self.cfg.url).netloc})"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the attempt in flight, waiting a second at most: an attempt cut short
        stays pending in the store and is made again after a restart (at least once)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(1.0)

    def targets(self, record: EventRecord) -> list[str]:
        return [self.target] if record.kind in self.cfg.kinds else []

    def offer(self, record: EventRecord) -> None:
        if record.kind in self.cfg.kinds:
            self._wake.set()

    def pending(self) -> int:
        return self.store.delivery_counts(self.target).get("pending", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            for delivery in self.store.due(self.target, time.time()):
                if self._stop.is_set():
                    return
                self._attempt(delivery)
            next_due = self.store.next_due(self.target)
            wait = 5.0 if next_due is None else min(5.0, max(0.05, next_due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def _attempt(self, delivery: Delivery) -> None:
        error = self._post(delivery)
        if error is None:
            self.store.delivered(delivery)
            self.delivered += 1
            return
        self.failures += 1
        delay = min(self.cfg.backoff_initial_s * 2**delivery.attempts, self.cfg.backoff_max_s)
        next_at = time.time() + delay
        if next_at - delivery.time > self.cfg.retry_for_s:
            log.warning("webhook %s: event %s is dead after %d attempts: %s", self.cfg.url, delivery.event_id,
                        delivery.attempts + 1, error)  # fmt: skip
            self.store.failed(delivery, next_at=None, error=error)
            self.dead += 1
        else:
            log.info("webhook %s: event %s failed (%s); again in %.1f s", self.cfg.url, delivery.event_id, error, delay)
            self.store.failed(delivery, next_at=next_at, error=error)

    def _post(self, delivery: Delivery) -> str | None:
        """POST the event; None when the receiver answered 2xx, else what went wrong."""
        body = delivery.body.encode()
        headers = {"Content-Type": "application/json", "X-Streamer-Event-Id": delivery.event_id}
        if self._secret is not None:
            headers["X-Streamer-Signature"] = signature(self._secret, body)
        request = urllib.request.Request(self.cfg.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            return f"HTTP {err.code}"
        except (OSError, ValueError) as err:  # refused, timed out, reset, bad answer
            return f"{type(err).__name__}: {err}"
        return None if 200 <= status < 300 else f"HTTP {status}"


class MqttOutlet:
    """Events to an MQTT broker through paho-mqtt (see the module's docstring)."""

    QUEUE = 10_000  # QoS 1 messages held while the broker is away

    def __init__(self, cfg: MqttConfig) -> None:
        import paho.mqtt.client as mqtt

        self.cfg = cfg
        parts = urlsplit(cfg.url)
        self.host = parts.hostname or "localhost"
        tls = cfg.tls or parts.scheme == "mqtts"
        self.port = parts.port or (8883 if tls else 1883)
        self.prefix = cfg.topic_prefix.rstrip("/")
        self.availability = f"{self.prefix}/availability"
        self.published = 0
        self.dropped = 0
        self.connected = False
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"streamer-{self.prefix.replace('/', '-')}",
            protocol=mqtt.MQTTv311,
        )
        if cfg.username is not None:
            password = os.environ.get(cfg.password_env) if cfg.password_env else None
            self._client.username_pw_set(cfg.username, password)
        if tls:
            self._client.tls_set()
        self._client.will_set(self.availability, "offline", qos=1, retain=True)
        self._client.reconnect_delay_set(1, int(cfg.backoff_max_s))
        self._client.max_queued_messages_set(self.QUEUE)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    def __repr__(self) -> str:
        return f"MqttOutlet({self.host}:{self.port})"

    def start(self) -> None:
        """Connect in the background: a broker that is down is retried by paho's thread."""
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        if self.connected:
            try:
                self._client.publish(self.availability, "offline", qos=1, retain=True).wait_for_publish(2)
            except (RuntimeError, ValueError) as err:
                # The broker went away after we last heard from it: the last will says "offline".
                log.info("mqtt: could not say offline on stopping (%s)", err)
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.warning("mqtt %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        self.connected = True
        log.info("mqtt: connected to %s:%d", self.host, self.port)
        client.publish(self.availability, "online", qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if self.connected:
            log.warning("mqtt: lost %s:%d (%s); reconnecting", self.host, self.port, reason_code)
        self.connected = False

    def targets(self, record: EventRecord) -> list[str]:
        return []  # at most once: not stored for redelivery

    def offer(self, record: EventRecord) -> None:
        topic = f"{self.prefix}/{record.stream}/{record.kind}"
        qos, retain = {"alert": (1, False), "round": (0, False), "status": (1, True)}[record.kind]
        info = self._client.publish(topic, record.body(), qos=qos, retain=retain)
        if info.rc == 0 or (qos > 0 and info.rc == 4):  # MQTT_ERR_NO_CONN: QoS 1 waits in paho's queue
            self.published += 1
        else:
            self.dropped += 1
