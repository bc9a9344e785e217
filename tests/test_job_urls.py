"""A job's image URLs are built for the client that reads the job (its request's Host, or ``--public-url``), as a
synchronous answer's are: whichever server made the job or ran it, the server that answers a ``GET`` or an
``/events`` stream hands out URLs that work on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from http_helpers import fetch_png
from jobs_helpers import JOBS, follow, submit, wait_final

BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "height": 64, "width": 64, "seed": 5}


def _urls(state: dict[str, Any]) -> list[str]:
    assert state["status"] == "succeeded", state
    return state["result"]["response"]


def test_a_jobs_urls_name_the_server_that_answers_for_it(make_server: Callable[..., Any], tmp_path: Path) -> None:
    """Two servers on one store and one image directory: a job made and run by the first names the second in the
    second's answers (before the fix, the URLs named the first for ever: dead once it stops)."""
    shared = {"job_store": f"sqlite:///{tmp_path / 'jobs.db'}", "image_dir": str(tmp_path / "images")}
    first, second = make_server(**shared), make_server(**shared)
    with httpx.Client(base_url=first.url, timeout=60) as a, httpx.Client(base_url=second.url, timeout=60) as b:
        job = submit(a, BODY)
        names = [url.rpartition("/images/")[2] for url in _urls(wait_final(a, job))]
        assert _urls(a.get(f"{JOBS}/{job}").json()) == [f"{first.url}/images/{name}" for name in names]
        on_second = _urls(b.get(f"{JOBS}/{job}").json())
        assert on_second == [f"{second.url}/images/{name}" for name in names]
        assert all(fetch_png(url, b) for url in on_second)
        assert _urls(follow(b, job)[-1][1]) == on_second  # the done event, through the other server
        assert _urls(b.delete(f"{JOBS}/{job}").json()) == on_second  # a DELETE answers the state too


def test_a_jobs_urls_follow_the_host_the_reader_used_or_the_public_url(make_server: Callable[..., Any]) -> None:
    live = make_server()  # the memory store: the same rule
    with httpx.Client(base_url=live.url, timeout=60) as client:
        job = submit(client, BODY)
        wait_final(client, job)
        other = {"Host": "jobs.example:8080"}
        urls = _urls(client.get(f"{JOBS}/{job}", headers=other).json())
        assert urls and all(url.startswith("http://jobs.example:8080/images/") for url in urls), urls
        with client.stream("GET", f"{JOBS}/{job}/events", headers=other) as response:
            done = response.read().decode()
        assert "http://jobs.example:8080/images/" in done and live.url not in done
    public = make_server(public_url="https://img.example.com")
    with httpx.Client(base_url=public.url, timeout=60) as client:
        urls = _urls(wait_final(client, submit(client, BODY)))
        assert all(url.startswith("https://img.example.com/images/") for url in urls), urls
