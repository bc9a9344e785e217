"""GET /metrics (api/metrics.py) on a real server: scraped before and after real requests, parsed with the library's
own parser; counters and histograms must move by exactly what was done."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from http_helpers import NATIVE, OPENAI, assert_envelope
from prometheus_client.parser import text_string_to_metric_families
from test_hardening import FaultyTransformer, wait_until

from api.metrics import API_LABELS
from api.settings import SettingsError, parse_settings

PROMPT = "a lighthouse, metrics-marker-5b1e"  # must never appear in the exposition
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, **headers: str) -> tuple[Samples, str]:
    """Every sample of GET /metrics keyed by (name, sorted labels), and the text."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, response.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def server_timing(response: httpx.Response) -> dict[str, float]:
    """Server-Timing's durations in seconds (the header rounds to 0.1 ms)."""
    found = re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"])
    return {name: float(ms) / 1000 for name, ms in found}


def test_counters_and_histograms_move_by_exactly_the_requests_made(make_server: Callable[..., Any]) -> None:
    server = make_server()
    before, _ = scrape(server.url)
    ok = [
        httpx.post(server.url + NATIVE, json=body, timeout=120)
        for body in (
            {"prompt": PROMPT, "num_inference_steps": 2, "num_images_per_prompt": 2},
            {"prompt": PROMPT, "num_inference_steps": 3, "output_format": "jpeg"},
        )
    ]
    ok.append(
        httpx.post(
            server.url + OPENAI,
            json={"prompt": PROMPT, "num_inference_steps": 4, "response_format": "b64_json"},
            timeout=120,
        )
    )
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert_envelope(httpx.post(server.url + NATIVE, json={"prompt": PROMPT, "num_inference_steps": 0}), 400)
    assert_envelope(httpx.post(server.url + OPENAI, json={"prompt": PROMPT, "size": "big"}), 400)
    after, text = scrape(server.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sd_requests_total", api="native", status="200") == 2
    assert moved("sd_requests_total", api="openai", status="200") == 1
    assert moved("sd_requests_total", api="native", status="400") == 1
    assert moved("sd_requests_total", api="openai", status="400") == 1
    assert moved("sd_requests_total", api="other", status="200") == 1  # the first scrape (this one is counted after)
    assert moved("sd_request_latency_seconds_count", api="native") == 3
    assert moved("sd_request_latency_seconds_count", api="openai") == 2
    assert moved("sd_images_total") == 2 + 1 + 1
    assert not [key for key in after if "model" in dict(key[1])], "a server of one model got a model label"
    assert moved("sd_steps_total") == 2 + 3 + 4
    # The engine's histograms got one observation per generation, of exactly the timings each answer reported.
    timings = [server_timing(r) for r in ok]
    for histogram, key in (
        ("sd_queue_time_seconds", "queue"),
        ("sd_first_step_seconds", "first_step"),
        ("sd_generation_seconds", "generate"),
    ):
        assert moved(histogram + "_count") == 3, histogram
        assert moved(histogram + "_sum") == pytest.approx(sum(t[key] for t in timings), abs=3 * 5e-5), histogram
        assert value(after, histogram + "_bucket", le="+Inf") == value(after, histogram + "_count")
    assert value(after, "sd_requests_running") == 0 and value(after, "sd_requests_waiting") == 0
    # The library's process metrics are there, and the prompt cache's counters (on by default) moved.
    assert value(after, "process_resident_memory_bytes") > 0 and value(after, "process_cpu_seconds_total") > 0
    assert moved("sd_prompt_cache_hits_total") + moved("sd_prompt_cache_misses_total") > 0
    assert not any(name == "sd_batch_size_count" for name, _ in after)  # the threads engine has no shared passes

    # Bounded labels only: never the prompt, a path or an id.
    assert "metrics-marker" not in text and "lighthouse" not in text
    for name, labels in after:
        if name.startswith("sd_"):
            for key, label in labels:
                assert key in ("api", "status", "le"), (name, key)
                assert key != "api" or label in API_LABELS
                assert key != "status" or re.fullmatch(r"[1-5]\d\d", label)


def test_gauges_read_the_engine_and_an_overload_is_counted(make_server: Callable[..., Any], tiny_pipeline: Any) -> None:
    from diffusers import StableDiffusion3Pipeline

    fault = FaultyTransformer(tiny_pipeline)
    pipe = StableDiffusion3Pipeline(**{**tiny_pipeline.components, "transformer": fault.module})
    server = make_server(
        loader=lambda s: SimpleNamespace(pipeline=pipe, device=torch.device("cpu")), max_concurrency=1, max_queue=1
    )
    fault.armed = True  # the start-up memory measurement's pass is not a request's step
    body = {"prompt": PROMPT, "num_inference_steps": 1, "width": 32, "height": 32}
    before, _ = scrape(server.url)
    fault.gate.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(httpx.post, server.url + NATIVE, json=body, timeout=120)]
            wait_until(lambda: fault.started.is_set(), "the first request is denoising")
            held.append(pool.submit(httpx.post, server.url + NATIVE, json=body, timeout=120))

            def gauges() -> tuple[float, float]:
                samples = scrape(server.url)[0]
                return value(samples, "sd_requests_running"), value(samples, "sd_requests_waiting")

            wait_until(lambda: gauges() == (1, 1), "one running and one waiting, as the scrape reads them")
            assert_envelope(httpx.post(server.url + OPENAI, json={"prompt": PROMPT, "size": "32x32"}), 503)
            fault.gate.set()
            assert [f.result().status_code for f in held] == [200, 200]
    finally:
        fault.gate.set()
    after, _ = scrape(server.url)
    assert (
        value(after, "sd_requests_total", api="openai", status="503")
        - value(before, "sd_requests_total", api="openai", status="503")
        == 1
    )
    assert value(after, "sd_requests_total", api="native", status="200") == 2
    # The overloaded request never ran: only the two that did are in the engine's histograms.
    assert value(after, "sd_generation_seconds_count") == 2 and value(after, "sd_images_total") == 2
    assert value(after, "sd_queue_time_seconds_count") == 2
    assert (value(after, "sd_requests_running"), value(after, "sd_requests_waiting")) == (0, 0)


def test_step_engine_exports_pass_sizes_and_cache_counters_as_its_status_reports_them(
    make_server: Callable[..., Any],
) -> None:
    server = make_server(engine="step")
    for n in (1, 2):
        body = {"prompt": PROMPT, "num_inference_steps": 2, "num_images_per_prompt": n, "width": 32, "height": 32}
        assert httpx.post(server.url + NATIVE, json=body, timeout=120).status_code == 200
    samples, _ = scrape(server.url)
    info = httpx.get(server.url + "/api/status").json()["engine"]
    batching, cache = info["batching"], info["prompt_cache"]
    assert value(samples, "sd_batch_size_count") == batching["passes"] == 4
    assert value(samples, "sd_batch_size_sum") == batching["images"]  # both guidance halves: 2 x (1 + 2) x 2 steps
    sizes = {int(size): count for size, count in batching["pass_sizes"].items()}
    for bound in ("1.0", "2.0", "4.0", "8.0", "+Inf"):
        limit = float("inf") if bound == "+Inf" else float(bound)
        expected = sum(count for size, count in sizes.items() if size <= limit)
        assert value(samples, "sd_batch_size_bucket", le=bound) == expected, bound
    assert value(samples, "sd_prompt_cache_hits_total") == cache["hits"]
    assert value(samples, "sd_prompt_cache_misses_total") == cache["misses"] > 0


def test_each_app_has_its_own_registry(make_server: Callable[..., Any]) -> None:
    first, second = make_server(), make_server()
    body = {"prompt": PROMPT, "num_inference_steps": 1}
    assert httpx.post(first.url + NATIVE, json=body, timeout=120).status_code == 200
    assert value(scrape(first.url)[0], "sd_images_total") == 1
    assert value(scrape(second.url)[0], "sd_images_total") == 0


def test_metrics_are_open_by_default_and_behind_the_key_with_metrics_auth(make_server: Callable[..., Any]) -> None:
    open_server = make_server(api_key="sesame")
    scrape(open_server.url)  # no key needed
    assert_envelope(httpx.get(open_server.url + "/api/status"), 401)  # while the rest stays guarded

    guarded = make_server(api_key="sesame", metrics_auth=True)
    assert assert_envelope(httpx.get(guarded.url + "/metrics"), 401)["code"] == "invalid_api_key"
    assert_envelope(httpx.get(guarded.url + "/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    samples, _ = scrape(guarded.url, Authorization="Bearer sesame")
    assert value(samples, "sd_requests_total", api="other", status="401") == 2  # the refusals were counted


def test_openmetrics_is_answered_to_a_scraper_that_asks_for_it(make_server: Callable[..., Any]) -> None:
    server = make_server()
    response = httpx.get(server.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF") and "sd_requests_running" in response.text


@pytest.mark.parametrize(
    ("argv", "environ", "line"),
    [
        (["--metrics-auth"], {}, "--metrics-auth: needs --api-key"),
        ([], {"SERVER_METRICS_AUTH": "1"}, "SERVER_METRICS_AUTH: needs --api-key"),
    ],
)
def test_metrics_auth_without_an_api_key_is_a_settings_error(
    argv: list[str], environ: dict[str, str], line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in environ.items():
        monkeypatch.setenv(name, text)
    with pytest.raises(SettingsError) as caught:
        parse_settings(argv)
    assert [problem for problem in caught.value.lines if problem.startswith(line)], caught.value.lines
    assert parse_settings([*argv, "--api-key", "k"]).metrics_auth is True
