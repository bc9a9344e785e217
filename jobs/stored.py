"""A job this server runs for a durable store (``jobs.durable``): its events go to the store as well, and it knows its
run's attempt, its lease's last renewal, and whether its run still counts."""

from __future__ import annotations

import time
from typing import Any

from jobs.job import Job, Subscriber

__all__ = ["StoredJob"]


class StoredJob(Job):
    """A job this server runs: ``jobs.job.Job`` whose events are also written to the store (through a bounded queue,
    so a slow store loses intermediate steps, never holds the job)."""

    def __init__(self, generation: Any, record: dict[str, Any] | None = None) -> None:
        super().__init__(generation)
        if record is not None:  # a run of a job made earlier (here or elsewhere)
            self.id, self.created_at = record["id"], record["created_at"]
        self.attempt = 1 if record is None else record["attempt"]
        # Unix seconds of this server's last renewal of the job's lease that the store took.
        self.renewed_at: float | None = None if record is None else record.get("renewed_at")
        self.ending = False  # the run is over; its end is being written to the store
        self.mirror = Subscriber()
        self.lost = False  # the lease went to another server: this run's outcome is not the job's
        self.admitting = True  # until the engine has said whether it takes the job
        self.refused: Any = None  # the engine's refusal (as ``failure_of`` describes it), answered to the POST

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        super()._publish(name, data)
        if name != "done":  # the end is written by the run's final, conditional write
            self.mirror.put(name, data)

    def eta_s(self) -> float | None:
        return None if self.ending else super().eta_s()  # no steps left: the end waits for the store, not the engine

    def to_dict(self) -> dict[str, Any]:
        state = super().to_dict()
        if not self.finished and self.renewed_at is not None:
            state["runner_renewed_at"] = round(self.renewed_at, 3)
        return state

    def progress_fields(self) -> dict[str, Any]:
        at = None if self.last_step_at is None else time.time() - (time.monotonic() - self.last_step_at)
        return {
            "status": self.status,
            "position": self.position if self.status == "queued" else None,
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "last_step_at": at,
            "preview": self.last_preview,
        }

    def hand_over(self) -> None:
        """Tell local followers to go on from the store: this server no longer runs the job."""
        self._publish("moved", {})
        self.subscribers.clear()
