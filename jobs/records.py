"""A job as a durable store keeps it: a flat record (what re-running it needs, its state, its lease), and the views
built from one (``GET``'s state, the events a new follower is replayed).

A record's fields (``FIELDS``, each with its kind): ``body`` is the generation with its seed resolved (so a run on
another server gives the same images) and ``context`` what builds its answer (the output format; the image URLs are
built when the job is read, for the reader); ``owner`` is the id of the server running it ('' while it waits for
one), ``attempt`` how many runs it has had, ``lease_until`` the wall-clock time its owner's claim ends unless renewed
and ``renewed_at`` when the owner last renewed it; ``cancel`` is set by a ``DELETE`` on any server. Progress
(``status``, ``position``, ``step``, ``elapsed_s``, ``last_step_at``, ``preview``) is written by the owner as it
goes; ``finished_at``, ``result`` and ``error`` once, when it ends.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
from types import SimpleNamespace
from typing import Any

__all__ = [
    "FIELDS",
    "FINAL",
    "attempts_error",
    "body_of",
    "diff_events",
    "from_flat",
    "generation_of",
    "replay",
    "state_of",
    "to_flat",
]

FINAL = frozenset({"succeeded", "failed", "cancelled"})
FIELDS: dict[str, str] = {
    "id": "str",
    "seq": "int",
    "created_at": "float",
    "body": "json",
    "context": "json",
    "status": "str",
    "owner": "str",
    "attempt": "int",
    "lease_until": "float",
    "cancel": "int",
    "renewed_at": "float",
    "step": "int",
    "position": "int",
    "elapsed_s": "float",
    "last_step_at": "float",
    "preview": "json",
    "finished_at": "float",
    "result": "json",
    "error": "json",
}
# What a run that ended without finishing leaves behind when the job goes back to wait for a server.
REQUEUED: dict[str, Any] = {
    "status": "queued",
    "owner": "",
    "renewed_at": None,
    "position": None,
    "step": 0,
    "elapsed_s": None,
    "last_step_at": None,
    "preview": None,
}


def attempts_error(attempts: int) -> dict[str, Any]:
    """The error of a job whose server stopped (crashed, was killed) during each of its ``attempts`` runs."""
    message = (
        f"The job was started {attempts} time(s) and its server stopped each time before it finished (it may be "
        "what crashes the server); it is not run again (--job-max-attempts)."
    )
    return {"message": message, "type": "server_error", "param": None, "code": "too_many_attempts"}


# -- the generation a record runs ---------------------------------------------------------------------------------


IMAGE_FIELDS = ("image", "mask_image")  # GenerationRequest's PIL images: stored as base64 PNGs (lossless, mode kept)


def body_of(generation: Any) -> dict[str, Any]:
    """The generation's fields as JSON: everything ``GenerationRequest`` holds (its init image and mask as base64
    PNGs, its LoRA set as a list of [name, scale])."""
    images = {name: getattr(generation, name) for name in IMAGE_FIELDS}
    body = dataclasses.asdict(dataclasses.replace(generation, **dict.fromkeys(IMAGE_FIELDS)))
    for name, image in images.items():
        body.pop(name, None)
        if image is not None:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            body[f"{name}_png"] = base64.b64encode(buffer.getvalue()).decode()
    body["loras"] = [list(pair) for pair in generation.loras]
    return body


def generation_of(body: dict[str, Any]) -> Any:
    """The ``GenerationRequest`` a record's ``body`` describes (the inverse of ``body_of``)."""
    from engine import GenerationRequest

    body = dict(body)
    for name in IMAGE_FIELDS:
        encoded = body.pop(f"{name}_png", None)
        if encoded is not None:
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(encoded)))
            image.load()
            body[name] = image
    body["loras"] = tuple((str(name), float(scale)) for name, scale in body.get("loras", ()))
    return GenerationRequest(**body)


# -- flat storage (Redis hashes are strings) -------------------------------------------------------------------


def to_flat(fields: dict[str, Any]) -> dict[str, str]:
    flat = {}
    for name, value in fields.items():
        if value is None:
            flat[name] = ""
        elif FIELDS[name] == "json":
            flat[name] = json.dumps(value, separators=(",", ":"))
        else:
            flat[name] = str(value)
    return flat


def from_flat(flat: dict[Any, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, raw in flat.items():
        name = key.decode() if isinstance(key, bytes) else key
        value = raw.decode() if isinstance(raw, bytes) else raw
        kind = FIELDS.get(name)
        if kind is None:
            continue
        if value == "" and kind != "str":
            record[name] = None
        elif kind == "json":
            record[name] = json.loads(value)
        else:
            record[name] = {"int": int, "float": float, "str": str}[kind](value)
    return record


# -- views ---------------------------------------------------------------------------------------------------------


def total_steps(body: dict[str, Any]) -> int:
    """The denoising steps a record's generation runs, as its task counts them (``jobs.job.Job.total_steps``): all
    of them, or the part of the schedule an edit's strength leaves (read from the body, its images left as they are)."""
    from engine.tasks import get_task

    # What a task's ``steps`` reads of a request (its schedule and strength), not the whole GenerationRequest.
    counted = SimpleNamespace(num_inference_steps=body["num_inference_steps"], strength=body.get("strength"))
    return get_task(body.get("task") or "text-to-image").steps(counted)


def _eta(record: dict[str, Any], total: int, now: float) -> float | None:
    step, elapsed, at = record.get("step") or 0, record.get("elapsed_s"), record.get("last_step_at")
    if record["status"] != "running" or not step or elapsed is None or at is None:
        return None
    return round(max(0.0, elapsed / step * (total - step) - (now - at)), 3)


def _runner(record: dict[str, Any], now: float, stale_after: float | None) -> tuple[float | None, bool]:
    """When the job's runner last renewed its claim (None: no server holds it), and whether it has stopped renewing:
    its lease ran out, or it is ``stale_after`` seconds old (a renewal missed). Such a job waits to be taken over."""
    if record["status"] in FINAL or not record.get("owner"):
        return None, False
    renewed, until = record.get("renewed_at"), record.get("lease_until")
    late = stale_after is not None and renewed is not None and now - renewed > stale_after
    return (None if renewed is None else round(renewed, 3)), late or (until is not None and until < now)


def state_of(record: dict[str, Any], now: float | None = None, stale_after: float | None = None) -> dict[str, Any]:
    """The job as ``GET /api/jobs/{id}`` answers it (``jobs.job.Job.to_dict``'s fields), read by a server that does
    not run it: one whose runner has stopped renewing (see ``_runner``) has no eta, and says it waits."""
    body = record["body"]
    now = time.time() if now is None else now
    renewed_at, waiting = _runner(record, now, stale_after)
    return {
        "id": record["id"],
        "status": record["status"],
        "created_at": round(record["created_at"], 3),
        "position": record.get("position") if record["status"] == "queued" else None,
        "step": record.get("step") or 0,
        "total_steps": total_steps(body),
        "eta_s": None if waiting else _eta(record, total_steps(body), now),
        "seed": body["seed"],
        "result": record.get("result"),
        "error": record.get("error"),
        "runner_renewed_at": renewed_at,
        "waiting_for_takeover": waiting,
    }


def _step_data(record: dict[str, Any]) -> dict[str, Any]:
    elapsed = record.get("elapsed_s")
    total = total_steps(record["body"])
    return {"step": record["step"], "total": total, "elapsed_s": None if elapsed is None else round(elapsed, 3)}


def replay(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """What a new follower is told first: where the job is (as ``jobs.job.Job.subscribe`` replays it)."""
    if record["status"] in FINAL:
        return [("done", state_of(record))]
    if record["status"] == "queued":
        return [("queued", {"position": record["position"]})] if record.get("position") else []
    events: list[tuple[str, dict[str, Any]]] = [("started", {})]
    if record.get("step"):
        events.append(("step", _step_data(record)))
    if record.get("preview"):
        events.append(("preview", record["preview"]))
    return events


def diff_events(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events between two readings of one record (a follower of a store with no event stream polls it)."""
    if new["status"] in FINAL:
        return [("done", state_of(new))]
    events: list[tuple[str, dict[str, Any]]] = []
    rerun = new.get("attempt") != old.get("attempt")
    if new["status"] == "queued" and new.get("position") and (rerun or new.get("position") != old.get("position")):
        events.append(("queued", {"position": new["position"]}))
    if new["status"] == "running" and (rerun or old["status"] != "running"):
        events.append(("started", {}))
    if new.get("step") and (rerun or new["step"] != old.get("step")):
        events.append(("step", _step_data(new)))
    if new.get("preview") and new["preview"] != old.get("preview"):
        events.append(("preview", new["preview"]))
    return events
