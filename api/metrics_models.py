"""GET /metrics of a server of several models (issue 30): what the registry and each resident model keep, read at
scrape time (``api.metrics`` registers this collector only when the server has several models).

- From the registry (``ModelSet.status()``): ``sd_model_state{model,state}`` (1 for the model's state: ``unloaded``,
  ``loading``, ``resident`` or ``cpu``, 0 for the others, as Prometheus encodes an enum), ``sd_model_bytes{model,
  held}`` (``alone``: what no other resident model uses; ``shared``: components it shares), ``sd_model_loads_total``
  and ``sd_model_evictions_total``, ``sd_model_requests_in_flight`` (requests holding the model or waiting for its
  load), and ``sd_models_memory_budget_bytes`` / ``sd_models_memory_used_bytes`` (the weights on the device).
- From each resident model's bundle (``api.several.Bundle``): its prompt cache's hits and misses and, on the step
  engine, its pass sizes; these start again from zero when an evicted model is loaded again (a counter reset).

Every ``model`` label is a configured model's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from api.metrics import batch_buckets

__all__ = ["STATES", "ModelsCollector"]

STATES = ("unloaded", "loading", "resident", "cpu")


class ModelsCollector:
    """The per-model families above, read from ``state.modelset`` and ``state.bundles`` when scraped."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # nothing before the models load; the names are unique to this collector

    def collect(self) -> Iterator[Metric]:
        models = self.state.modelset
        if models is None:
            return
        yield from _registry_families(models.status())
        yield from _bundle_families(dict(self.state.bundles))


def _registry_families(status: dict[str, Any]) -> Iterator[Metric]:
    labels = ["model"]
    state = GaugeMetricFamily("sd_model_state", "The model's state now (1: this state)", labels=["model", "state"])
    held = GaugeMetricFamily("sd_model_bytes", "Weight bytes the model holds (alone, shared)", labels=["model", "held"])
    loads = CounterMetricFamily("sd_model_loads", "Times the model was loaded (or brought back)", labels=labels)
    evictions = CounterMetricFamily("sd_model_evictions", "Times the model was unloaded for room", labels=labels)
    in_flight = GaugeMetricFamily(
        "sd_model_requests_in_flight", "Requests holding the model or waiting for its load", labels=labels
    )
    for name, model in status["models"].items():
        for value in STATES:
            state.add_metric([name, value], 1 if model["state"] == value else 0)
        held.add_metric([name, "alone"], model["bytes_alone"])
        held.add_metric([name, "shared"], model["bytes_shared"])
        loads.add_metric([name], model["loads"])
        evictions.add_metric([name], model["evictions"])
        in_flight.add_metric([name], model["in_flight"])
    yield from (state, held, loads, evictions, in_flight)
    yield GaugeMetricFamily("sd_models_memory_budget_bytes", "The memory budget (--memory-budget)", status["budget"])
    yield GaugeMetricFamily("sd_models_memory_used_bytes", "Weight bytes of the resident models", status["used"])


def _bundle_families(bundles: dict[str, Any]) -> Iterator[Metric]:
    hits = CounterMetricFamily("sd_prompt_cache_hits", "Prompt embeddings found in the cache", labels=["model"])
    misses = CounterMetricFamily("sd_prompt_cache_misses", "Prompt embeddings encoded", labels=["model"])
    passes = HistogramMetricFamily("sd_batch_size", "Images in each transformer pass (step engine)", labels=["model"])
    any_cache = any_passes = False
    for name, bundle in sorted(bundles.items()):
        cache = bundle.prompt_cache
        if cache is not None and cache.capacity > 0:
            counts = cache.stats()
            hits.add_metric([name], counts["hits"])
            misses.add_metric([name], counts["misses"])
            any_cache = True
        stats = getattr(bundle.served.runner, "stats", None)  # the step engine's DenoiseLoop.stats()
        if stats is not None and "pass_sizes" in stats:
            buckets, total = batch_buckets(stats["pass_sizes"])
            passes.add_metric([name], buckets, total)
            any_passes = True
    if any_cache:
        yield hits
        yield misses
    if any_passes:
        yield passes
