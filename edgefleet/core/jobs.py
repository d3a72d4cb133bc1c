"""Fine-tune and compile jobs: their state, progress, trials, target outcomes and events.
One type each, for the worker, the cloud's store and the client (messages in
protos/admin/v1/jobs.proto)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.core.wire import WireEnum


class JobState(WireEnum):
    UNSPECIFIED = "unknown"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobProgress:
    """Where a running job is: its phase and, while training, the latest epoch."""

    phase: str = ""
    epoch: int = 0
    epochs: int = 0
    loss: float = 0.0
    train_accuracy: float = 0.0
    val_accuracy: float = 0.0
    eta_seconds: float = 0.0
    trial: int = 0
    trials: int = 0
    message: str = ""

    def describe(self) -> str:
        """One line, e.g. 'training trial 2/4 epoch 3/20 loss 0.4100 train 91.0% val 88.5%'."""
        parts = [self.phase or "waiting"]
        if self.trials > 1:
            parts.append(f"trial {self.trial}/{self.trials}")
        if self.epochs and self.phase == "training":
            parts.append(
                f"epoch {self.epoch}/{self.epochs} loss {self.loss:.4f} "
                f"train {self.train_accuracy:.1%} val {self.val_accuracy:.1%}"
            )
        elif self.message:
            parts.append(self.message)
        return " ".join(parts)


@dataclass(frozen=True)
class Trial:
    """One run of a search."""

    number: int
    params: Mapping[str, str]
    val_accuracy: float = 0.0
    epochs_run: int = 0
    seconds: float = 0.0
    best: bool = False
    error: str = ""
    val_loss: float = 0.0
    # With several seeds: val_accuracy and val_loss are their means, these the range.
    seeds: int = 1
    val_accuracy_min: float = 0.0
    val_accuracy_max: float = 0.0


@dataclass(frozen=True)
class TargetOutcome:
    """What became of one requested target: built, refused (e.g. accuracy drop over the
    limit) or failed."""

    target: str
    status: str
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """A fine-tune or compile job. `request_json` is the request as submitted (what a retry
    submits again)."""

    job_id: str
    kind: str
    model: str
    request_json: str
    state: JobState = JobState.QUEUED
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    slot: str = ""
    progress: JobProgress = field(default_factory=JobProgress)
    error: str = ""
    result_version: int = 0
    trials: tuple[Trial, ...] = ()
    targets: tuple[TargetOutcome, ...] = ()
    retry_of: str = ""

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def request(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.request_json) if self.request_json else {}
        return parsed


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's log: a message, a progress snapshot or a state change."""

    job_id: str
    seq: int
    at: float
    kind: str  # log | progress | state
    message: str = ""
    progress: JobProgress | None = None
    state: JobState = JobState.UNSPECIFIED
