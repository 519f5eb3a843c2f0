"""Prometheus metrics (``GET /metrics``) through prometheus-client.

Each app has its own registry, so several servers can live in one process (tests). Stream
and queue figures are read when scraped, not pushed; counters of questions and latencies
are recorded as answers go out.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from streamer.server.runtime import Runtime
from streamer.service.events import Answered, Failed

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class _RuntimeCollector(Collector):
    """Figures read from the capture threads, the inference loop and the model at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        statuses = [c.status() for c in self.runtime.captures.values()]
        frames_in = CounterMetricFamily("streamer_frames_in", "Input frames read per stream", labels=["stream"])
        sampled = CounterMetricFamily("streamer_frames_sampled", "Frames kept in the ring buffer", labels=["stream"])
        dropped = CounterMetricFamily("streamer_frames_dropped", "Input frames not kept (sampling)", labels=["stream"])
        reconnects = CounterMetricFamily("streamer_reconnects", "Times a source was reopened", labels=["stream"])
        up = GaugeMetricFamily("streamer_stream_up", "1 when the stream is live", labels=["stream"])
        buffered = GaugeMetricFamily("streamer_frames_buffered", "Frames held in the ring buffer", labels=["stream"])
        fps = GaugeMetricFamily("streamer_fps", "Frame rates", labels=["stream", "kind"])
        for st in statuses:
            frames_in.add_metric([st.name], st.frames_in)
            sampled.add_metric([st.name], st.frames_sampled)
            dropped.add_metric([st.name], st.frames_dropped)
            reconnects.add_metric([st.name], st.reconnects)
            up.add_metric([st.name], 1.0 if st.status == "live" else 0.0)
            buffered.add_metric([st.name], st.frames_buffered)
            fps.add_metric([st.name, "in"], st.fps_in)
            fps.add_metric([st.name, "sampled"], st.fps_sampled)
        yield from (frames_in, sampled, dropped, reconnects, up, buffered, fps)

        loop = self.runtime.loop
        depth = GaugeMetricFamily("streamer_queue_depth", "Questions waiting for the model")
        depth.add_metric([], loop.depth() if loop else 0)
        yield depth
        skipped = CounterMetricFamily("streamer_watch_rounds_skipped", "Watch rounds skipped: the last was still open")
        skipped.add_metric([], loop.skipped_rounds() if loop else 0)
        yield skipped

        engine = self.runtime.engine
        # engine.py imports torch, which the server's adapters must not: read the list of
        # figures once an engine exists (until the Engine interface moves to a torch-free module).
        from streamer.inference.engine import ENGINE_STATS

        stats = engine.stats() if engine is not None else {}
        for name, (kind, doc) in ENGINE_STATS.items():
            if name in stats:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                metric = family(f"streamer_{name}", doc)
                metric.add_metric([], stats[name])
                yield metric

        yield from _backend_metrics(self.runtime.backend_statuses() or [])

        memory = GaugeMetricFamily("streamer_model_memory_bytes", "Memory held by the model", labels=["kind"])
        for kind, value in self.runtime.model_memory().items():
            memory.add_metric([kind], value)
        yield memory


def _backend_metrics(statuses: list[dict]) -> Iterator[Metric]:
    """A remote engine's servers, labelled by URL (credentials masked)."""
    if not statuses:
        return
    labels = ["backend"]
    up = GaugeMetricFamily("streamer_backend_up", "1 while the remote server takes requests, 0 ejected", labels=labels)
    in_flight = GaugeMetricFamily("streamer_backend_in_flight", "Requests open on the remote server", labels=labels)
    requests = CounterMetricFamily(
        "streamer_backend_requests", "Requests by outcome: answered, stopped, failed", labels=["backend", "outcome"]
    )
    ejections = CounterMetricFamily("streamer_backend_ejections", "Times the server was ejected", labels=labels)
    first_token = SummaryMetricFamily(
        "streamer_backend_first_token_seconds", "From sending a request to its first token", labels=labels
    )
    prompt = CounterMetricFamily("streamer_backend_prompt_tokens", "Prompt tokens the server reported", labels=labels)
    cached = CounterMetricFamily(
        "streamer_backend_cached_prompt_tokens", "Prompt tokens served from the server's prefix cache", labels=labels
    )
    sent = CounterMetricFamily("streamer_backend_request_bytes", "Bytes of request bodies sent", labels=labels)
    for st in statuses:
        url = [st["url"]]
        up.add_metric(url, 1.0 if st["state"] == "up" else 0.0)
        in_flight.add_metric(url, st["in_flight"])
        for outcome in ("answered", "stopped", "failed"):
            requests.add_metric([st["url"], outcome], st["requests"].get(outcome, 0))
        ejections.add_metric(url, st["ejections"])
        first_token.add_metric(url, count_value=st["first_token_count"], sum_value=st["first_token_s_sum"])
        prompt.add_metric(url, st["prompt_tokens"])
        cached.add_metric(url, st["cached_prompt_tokens"])
        sent.add_metric(url, st["request_bytes"])
    yield from (up, in_flight, requests, ejections, first_token, prompt, cached, sent)


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("streamer_open_connections", "Open WebSocket connections", registry=r)
        self.connections_total = Counter("streamer_connections_accepted", "WebSocket connections accepted", registry=r)
        self.refused = Counter(
            "streamer_connections_refused",
            "Connections and requests refused (reason: host, origin, unauthorized, max_connections)",
            ["reason"],
            registry=r,
        )
        self.questions = Counter("streamer_questions", "Questions ended, by outcome", ["kind", "outcome"], registry=r)
        self.ttft = Histogram(
            "streamer_time_to_first_token_seconds", "From receipt to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.total = Histogram(
            "streamer_answer_seconds", "From receipt to the final answer", buckets=LATENCY_BUCKETS, registry=r
        )
        self.dropped = Counter("streamer_messages_dropped", "Messages dropped for slow clients", ["type"], registry=r)
        self.slow_disconnects = Counter(
            "streamer_slow_client_disconnects", "Clients cut off for not reading", registry=r
        )
        r.register(_RuntimeCollector(runtime))

    def record(self, event: Answered | Failed) -> None:
        """Count how a question ended, and how long an answer took (on the event loop)."""
        kind = "watch" if event.watch else "ask"
        if isinstance(event, Answered):
            self.questions.labels(kind, "answer").inc()
            if event.answer.first_token_ms is not None:
                self.ttft.observe(event.answer.first_token_ms / 1000)
            self.total.observe(event.answer.total_ms / 1000)
        elif not (event.watch and event.final):  # a watch's end is not one of its questions' ends
            self.questions.labels(kind, event.code).inc()
