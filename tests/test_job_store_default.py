"""The default job store: a SQLite file in the server's data directory (``--data-dir``), beside its images, so that a
restart (an upgrade, a crash) loses no job; ``--job-store memory`` is the explicit choice of jobs that die with the
process. Servers here are in-process (the session's tiny pipeline) and restarted on the same data directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fault_helpers import read_only
from http_helpers import assert_envelope
from jobs_helpers import BLOCKER, JOBS, submit, wait_final, wait_for

import serverasync
from api.settings import parse_settings

BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "height": 64, "width": 64, "seed": 5}


def test_the_data_directory_holds_the_images_and_the_job_store_unless_each_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVER_DATA_DIR", raising=False)  # the suite's own (tests/conftest.py)
    default = parse_settings([])
    assert (default.data_dir, default.image_dir, default.job_store) == (".", "images", "sqlite:///jobs.db")
    there = parse_settings(["--data-dir", str(tmp_path)])
    assert (there.image_dir, there.job_store) == (str(tmp_path / "images"), f"sqlite:///{tmp_path}/jobs.db")
    chosen = parse_settings(["--data-dir", str(tmp_path), "--image-dir", "pictures", "--job-store", "memory"])
    assert (chosen.image_dir, chosen.job_store) == ("pictures", "memory")
    monkeypatch.setenv("SERVER_DATA_DIR", str(tmp_path))
    assert parse_settings([]).job_store == f"sqlite:///{tmp_path}/jobs.db"


def test_a_restart_on_the_same_data_directory_finds_every_job(make_server: Callable[..., Any], tmp_path: Path) -> None:
    """A finished job keeps its result (its images beside the store); the jobs queued or running when the server
    stopped run when it is back. No --job-store, no --image-dir: the defaults."""
    data = tmp_path / "data"
    data.mkdir()
    first = make_server(data_dir=str(data), image_dir=None, max_concurrency=1, max_steps=1000, shutdown_timeout=0.5)
    assert first.app.state.settings.job_store == f"sqlite:///{data}/jobs.db"
    with httpx.Client(base_url=first.url, timeout=120) as client:
        done = submit(client, BODY)
        finished = wait_final(client, done)
        blocker = submit(client, BLOCKER)
        wait_for(client, blocker, lambda state: state["status"] == "running")
        waiting = submit(client, {**BODY, "seed": 6})
    first.stop()  # as SIGTERM stops it: what it had not finished goes back to the store
    assert (data / "jobs.db").is_file() and (
        data / "images" / finished["result"]["response"][0].rsplit("/")[-1]
    ).is_file()

    second = make_server(data_dir=str(data), image_dir=None, max_concurrency=1, max_steps=1000)
    with httpx.Client(base_url=second.url, timeout=120) as client:
        again = client.get(f"{JOBS}/{done}").json()
        assert (again["status"], again["result"]["parameters"], again["seed"]) == (
            "succeeded",
            finished["result"]["parameters"],
            5,
        )
        assert client.get(again["result"]["response"][0]).status_code == 200  # its image, served by the new server
        assert client.delete(f"{JOBS}/{blocker}").json()["status"] == "cancelled"
        assert wait_final(client, waiting)["status"] == "succeeded"


def test_jobs_in_memory_are_an_explicit_choice_and_a_restart_loses_them(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    first = make_server(data_dir=str(tmp_path), job_store="memory")
    with httpx.Client(base_url=first.url, timeout=120) as client:
        done = submit(client, BODY)
        assert wait_final(client, done)["status"] == "succeeded"
    first.stop()
    assert not (tmp_path / "jobs.db").exists()
    second = make_server(data_dir=str(tmp_path), job_store="memory")
    assert_envelope(httpx.get(f"{second.url}{JOBS}/{done}", timeout=30), 404)


def test_a_data_directory_where_the_store_cannot_be_made_ends_the_start_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the model loads (this model does not exist: a start that got that far would say so)."""
    (tmp_path / "source").mkdir()
    with read_only(tmp_path / "source", tmp_path / "ro") as ro:
        argv = ["--data-dir", str(ro), "--model", "/nonexistent/model", "--host", "127.0.0.1", "--port", "0"]
        code = serverasync.main(argv)
    assert code == serverasync.EXIT_BAD_OPTION
    error = capsys.readouterr().err
    store = f"sqlite:///{ro}/jobs.db"
    assert f"serverasync.py: error: --job-store {store} (the default: jobs.db in --data-dir {ro}): " in error, error
    assert "cannot be created" in error and "nonexistent" not in error, error
    assert serverasync.main(["--data-dir", str(tmp_path / "missing")]) == serverasync.EXIT_BAD_OPTION
    assert "--data-dir: " in capsys.readouterr().err
