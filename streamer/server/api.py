"""The monitoring HTTP API: rules and stored events (``/api/...``).

``GET /api/rules``, ``POST /api/rules`` (a rule as JSON, the shape of a ``rules:`` entry),
``DELETE /api/rules/{name}``; ``GET /api/events`` (newest first; filters ``stream``,
``rule``, ``kind``, ``since``; the cursor ``before``; ``limit``) and
``GET /api/events/{id}/thumbnail.jpg``. When the server has tokens, every route needs one
as ``Authorization: Bearer <token>``, the same as the WebSocket. Errors are
``{"error": {"field": ..., "message": ...}}`` with a 4xx status. Disk work runs off the
event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from streamer.server.runtime import Runtime
from streamer.server.security import bearer_token, token_ok
from streamer.service.rules import RuleError, RuleRunner
from streamer.service.storage import EVENT_KINDS

MAX_PAGE = 500
Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status)


def bearer_ok(runtime: Runtime, request: Request) -> bool:
    """No tokens configured, or ``Authorization: Bearer`` carries one of them (compared in
    constant time against every token)."""
    tokens = runtime.settings.server.tokens
    return not tokens or token_ok(tokens, bearer_token(request.headers.get("authorization")))


def api_routes(runtime: Runtime) -> list[BaseRoute]:
    # Long because it defines the route handlers as closures over the runtime.
    def guarded(handler: Callable[[Request, RuleRunner], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            if not bearer_ok(runtime, request):
                response = error(401, "authorization", "a valid token is needed: Authorization: Bearer <token>")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            if runtime.monitor is None:
                return error(503, "(server)", "monitoring is not running")
            return await handler(request, runtime.monitor)

        return endpoint

    async def list_rules(request: Request, monitor: RuleRunner) -> Response:
        return JSONResponse({"rules": monitor.list()})

    async def add_rule(request: Request, monitor: RuleRunner) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "(body)", "the body is not JSON")
        try:
            rule = await asyncio.to_thread(monitor.add, body)
        except RuleError as err:
            return error(err.status, err.field, err.message)
        return JSONResponse(rule, status_code=201)

    async def delete_rule(request: Request, monitor: RuleRunner) -> Response:
        try:
            await asyncio.to_thread(monitor.remove, request.path_params["name"])
        except RuleError as err:
            return error(err.status, err.field, err.message)
        return Response(status_code=204)

    async def events(request: Request, monitor: RuleRunner) -> Response:
        q = request.query_params
        kind = q.get("kind") or None
        if kind is not None and kind not in EVENT_KINDS:
            return error(400, "kind", f"kind is one of {', '.join(EVENT_KINDS)}")
        limit_s, since_s = q.get("limit") or "50", q.get("since") or None
        if not limit_s.isdigit():
            return error(400, "limit", "limit is a whole number")
        try:
            since = float(since_s) if since_s is not None else None
        except ValueError:
            return error(400, "since", "since is a time in Unix seconds")
        limit = int(limit_s)
        if not 1 <= limit <= MAX_PAGE:
            return error(400, "limit", f"limit is 1 to {MAX_PAGE}")
        filters: dict[str, Any] = {"stream": q.get("stream") or None, "rule": q.get("rule") or None, "kind": kind}
        try:
            page, cursor = await asyncio.to_thread(
                monitor.store.page, **filters, since=since, before=q.get("before") or None, limit=limit
            )
        except KeyError:
            return error(400, "before", "no event with that id (the cursor is the last id of the previous page)")
        return JSONResponse({"events": page, "next": cursor})

    async def thumbnail(request: Request, monitor: RuleRunner) -> Response:
        jpeg = await asyncio.to_thread(monitor.store.thumbnail, request.path_params["id"])
        if jpeg is None:
            return error(404, "id", "no thumbnail for that event")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    return [
        Route("/api/rules", guarded(list_rules), methods=["GET"]),
        Route("/api/rules", guarded(add_rule), methods=["POST"]),
        Route("/api/rules/{name}", guarded(delete_rule), methods=["DELETE"]),
        Route("/api/events", guarded(events), methods=["GET"]),
        Route("/api/events/{id}/thumbnail.jpg", guarded(thumbnail), methods=["GET"]),
    ]


class MonitorCollector(Collector):
    """Rules and deliveries in ``/metrics``, read at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        monitor = self.runtime.monitor
        if monitor is None:
            return
        rounds = CounterMetricFamily("streamer_rule_rounds", "Rule rounds answered", labels=["rule"])
        alerts = CounterMetricFamily("streamer_rule_alerts", "Rule alerts (after the cooldown)", labels=["rule"])
        skipped = CounterMetricFamily(
            "streamer_rule_rounds_skipped", "Rule rounds skipped by the rule's gate", labels=["rule", "reason"]
        )
        for rule in monitor.list():
            rounds.add_metric([rule["name"]], rule["rounds"])
            alerts.add_metric([rule["name"]], rule["alerts"])
            for reason in ("no_motion", "inactive"):
                skipped.add_metric([rule["name"], reason], rule["skipped"].get(reason, 0))
        recorded = CounterMetricFamily("streamer_events_recorded", "Events stored, by kind", labels=["kind"])
        for kind in EVENT_KINDS:
            recorded.add_metric([kind], monitor.recorded.get(kind, 0))
        yield from (rounds, alerts, skipped, recorded)
        delivered = CounterMetricFamily("streamer_webhook_delivered", "Webhook events delivered", labels=["url"])
        dead = CounterMetricFamily("streamer_webhook_dead", "Webhook events given up on", labels=["url"])
        failures = CounterMetricFamily("streamer_webhook_failures", "Webhook attempts that failed", labels=["url"])
        for hook in self.runtime.webhooks:
            delivered.add_metric([hook.cfg.url], hook.delivered)
            dead.add_metric([hook.cfg.url], hook.dead)
            failures.add_metric([hook.cfg.url], hook.failures)
        yield from (delivered, dead, failures)
        if self.runtime.mqtt is not None:
            up = GaugeMetricFamily("streamer_mqtt_connected", "1 while connected to the MQTT broker")
            up.add_metric([], 1.0 if self.runtime.mqtt.connected else 0.0)
            published = CounterMetricFamily("streamer_mqtt_published", "Events handed to the MQTT client")
            published.add_metric([], self.runtime.mqtt.published)
            yield from (up, published)
