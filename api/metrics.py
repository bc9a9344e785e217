"""Prometheus metrics for GET /metrics, with ``prometheus-client`` (one registry per app, never the global one).

Where each figure comes from, so that every way into the server is counted without extra work:
- ``MetricsMiddleware`` (outermost but for the request id): every HTTP request, by API surface and status code, and
  its latency up to the last byte sent (so a streamed answer counts whole). Refusals by the other middleware (401,
  413, 503 draining) are counted too.
- ``Metrics.observe_generation``, one of ``Engine.listeners``: every generation the engine ran, whichever route
  submitted it (synchronous, streamed or a job), with the timings of its ``GenerationResult``.
- ``_StateCollector``, read at scrape time: the engine's running and waiting requests, the step engine's pass sizes
  and the prompt cache's counters (kept by those objects; nothing here keeps a second copy).

Labels are bounded: ``api`` is one of ``API_LABELS``, ``status`` an HTTP status code, ``adapter`` a configured LoRA
adapter's name, ``model`` a configured model's name. Never a prompt, path or id.

Several models (issue 30): the request counter, the generation counters and histograms and the running / waiting
gauges get a ``model`` label (the model the request was routed to; ``""`` for a request of none, such as a status
probe), and ``api.metrics_models`` adds each model's state, bytes, loads and evictions from the registry, the budget,
and the resident models' pass sizes and prompt cache counters (they start again when a model is loaded again). A
server of one model exports exactly the series it always did, without the label.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["API_LABELS", "LATENCY_BUCKETS", "Metrics", "MetricsMiddleware", "api_of", "batch_buckets", "histogram"]

API_LABELS = ("native", "openai", "jobs", "other")
# Seconds. Diffusion latencies run from ~50 ms (a tiny model, a health probe) through 2-40 s (a 1024x1024 image on a
# GPU or a CPU) to minutes (a queue behind a burst; --request-timeout is 300 s by default), so the buckets go roughly
# x2-x2.5 apart over that whole range; above 600 s only +Inf.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
# Images in one transformer pass (both guidance halves): powers of two up to --max-batch-size's bound.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CLIENT_CLOSED = "499"  # the answer never started: the client left first (nginx's convention, as in api.generation)


def api_of(path: str) -> str:
    """The API surface a path belongs to: a bounded label value."""
    if path == "/api/diffusers/inference":
        return "native"
    if path.startswith("/v1/"):
        return "openai"
    if path == "/api/jobs" or path.startswith("/api/jobs/"):
        return "jobs"
    if path.startswith("/sdapi/"):
        return "a1111"
    return "other"


class Metrics:
    """An app's metrics: its own registry, the library's process, platform and GC collectors, and the sd_* family."""

    def __init__(self, state: Any) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.several = bool(getattr(getattr(state, "models", None), "several", False))
        by_model = ["model"] if self.several else []  # the label is there only with several models
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.requests = Counter(
            "sd_requests",
            "HTTP requests answered, by API and status code",
            ["api", "status", *by_model],
            registry=registry,
        )
        self.latency = Histogram(
            "sd_request_latency_seconds",
            "HTTP request latency, arrival to the last byte sent, by API",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        def seconds(name: str, text: str) -> Histogram:
            return Histogram(name, text, by_model, buckets=LATENCY_BUCKETS, registry=registry)

        self.queue_time = seconds("sd_queue_time_seconds", "Generations' wait for a slot (arrival to admission)")
        self.first_step = seconds("sd_first_step_seconds", "Arrival to the first denoising step done")
        self.generation = seconds("sd_generation_seconds", "Admission to the images decoded (the engine's work)")
        self.images = Counter("sd_images", "Images generated", by_model, registry=registry)
        self.steps = Counter(
            "sd_steps",
            "Denoising steps of finished generations (one per step of a request)",
            by_model,
            registry=registry,
        )
        # By adapter name: the names the operator configured (--lora, --lora-dir's file names), never a path.
        self.adapter_requests = Counter(
            "sd_lora_requests",
            "Finished generations that used a LoRA adapter, by adapter",
            ["adapter", *by_model],
            registry=registry,
        )
        registry.register(_StateCollector(state))
        if self.several:
            from api.metrics_models import ModelsCollector

            registry.register(ModelsCollector(state))

    def observe_generation(self, request: Any, outcome: Any) -> None:
        """An ``Engine`` listener: a finished generation's timings and counts (failures are in sd_requests_total)."""
        if isinstance(outcome, BaseException):
            return
        model = (request.model,) if self.several else ()
        self._of(self.queue_time, model).observe(outcome.queued_s)
        if outcome.first_step_s is not None:
            self._of(self.first_step, model).observe(outcome.first_step_s)
        self._of(self.generation, model).observe(outcome.generate_s)
        self._of(self.images, model).inc(len(outcome.images))
        self._of(self.steps, model).inc(request.num_inference_steps)
        for name, _ in request.loras:
            self.adapter_requests.labels(name, *model).inc()

    @staticmethod
    def _of(metric: Any, model: tuple[str, ...]) -> Any:
        return metric.labels(*model) if model else metric

    def observe_request(self, api: str, status: str, seconds: float, model: str = "") -> None:
        self.requests.labels(api, status, *((model,) if self.several else ())).inc()
        self.latency.labels(api).observe(seconds)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (Prometheus text, or OpenMetrics), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _StateCollector:
    """Figures other objects keep, read when scraped: the engine's load, pass sizes, the prompt cache's counters."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        # Registered before the model loads: only the names that always exist (the others come with the engine).
        return list(self._load(None))

    def collect(self) -> Iterator[Metric]:
        engine = self.state.engine
        yield from self._load(engine, self.state.models if self.state.modelset is not None else None)
        stats = getattr(getattr(engine, "runner", None), "stats", None)  # the step engine's DenoiseLoop.stats()
        if stats is not None and "pass_sizes" in stats:
            yield histogram("sd_batch_size", "Images in each transformer pass (step engine)", stats["pass_sizes"])
        cache = self.state.prompt_cache if self.state.modelset is None else None  # several: per model (below)
        if cache is not None and cache.capacity > 0:
            counts = cache.stats()
            yield CounterMetricFamily("sd_prompt_cache_hits", "Prompt embeddings found in the cache", counts["hits"])
            yield CounterMetricFamily("sd_prompt_cache_misses", "Prompt embeddings encoded", counts["misses"])

    @staticmethod
    def _load(engine: Any, models: Any = None) -> Iterator[Metric]:
        running_text, waiting_text = "Generations holding a slot now", "Generations waiting for a slot now"
        if models is None:  # one model (or none yet): no label
            running, waiting = (engine.active, engine.queued) if engine is not None else (0, 0)
            yield GaugeMetricFamily("sd_requests_running", running_text, running)
            yield GaugeMetricFamily("sd_requests_waiting", waiting_text, waiting)
            return
        counts = engine.by_model() if engine is not None else {}
        running = GaugeMetricFamily("sd_requests_running", running_text, labels=["model"])
        waiting = GaugeMetricFamily("sd_requests_waiting", waiting_text, labels=["model"])
        for name in models.names:  # every configured model, 0 when idle; never another name
            held, queued = counts.get(name, (0, 0))
            running.add_metric([name], held)
            waiting.add_metric([name], queued)
        yield running
        yield waiting


def histogram(name: str, text: str, counts: dict[int, int]) -> HistogramMetricFamily:
    """A histogram family from exact counts per value."""
    buckets, total = batch_buckets(counts)
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=total)


def batch_buckets(counts: dict[int, int]) -> tuple[list[tuple[str, int]], int]:
    """The cumulative ``BATCH_BUCKETS`` of exact counts per value, and their sum."""
    buckets = [
        (floatToGoString(bound), sum(n for value, n in counts.items() if value <= bound)) for bound in BATCH_BUCKETS
    ]
    buckets.append(("+Inf", sum(counts.values())))
    return buckets, sum(v * n for v, n in counts.items())


class MetricsMiddleware:
    """Counts every HTTP request by API and status code and times it to its last byte (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = CLIENT_CLOSED

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            if status == CLIENT_CLOSED:
                status = "500"  # answered by Starlette's outermost error handler, outside this middleware
            raise
        finally:
            # The model the route sent it to (api.models.use_model keeps its view in the request's state).
            view = (scope.get("state") or {}).get("model_view")
            model = getattr(view, "name", "")
            self.metrics.observe_request(api_of(scope["path"]), status, time.monotonic() - started, model)
