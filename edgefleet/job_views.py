"""What the admin client returns for jobs and fine-tuned versions: plain frozen dataclasses
made from the wire messages, so callers never handle protobuf."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from protos.admin.v1 import admin_pb2, jobs_pb2

JOB_STATE_NAMES = {
    jobs_pb2.JOB_STATE_UNSPECIFIED: "unknown",
    jobs_pb2.JOB_STATE_QUEUED: "queued",
    jobs_pb2.JOB_STATE_RUNNING: "running",
    jobs_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    jobs_pb2.JOB_STATE_FAILED: "failed",
    jobs_pb2.JOB_STATE_CANCELLED: "cancelled",
}
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobProgress:
    """Where a running job is: its phase and, while training, the latest epoch. The worker
    sends it, the cloud stores it as JSON, the client shows it."""

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobProgress:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict[str, str]
    val_accuracy: float
    epochs_run: int
    seconds: float
    best: bool
    error: str


@dataclass(frozen=True)
class TargetOutcome:
    target: str
    status: str  # built | refused | failed
    reason: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class Job:
    job_id: str
    kind: str
    model: str
    state: str
    created_at: int
    started_at: int
    finished_at: int
    slot: str
    progress: JobProgress
    error: str
    result_version: int
    request: dict[str, Any]
    trials: tuple[Trial, ...] = ()
    targets: tuple[TargetOutcome, ...] = ()
    retry_of: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass(frozen=True)
class JobEvent:
    seq: int
    at_ms: int
    kind: str  # log | progress | state
    message: str
    progress: JobProgress | None = None
    state: str = ""


@dataclass(frozen=True)
class Lineage:
    base_model: str
    base_digest: str
    dataset: str
    dataset_digest: str
    hyperparameters: dict[str, str]
    seed: int
    strategy: str
    device: str
    training_seconds: float
    job_id: str
    class_names: tuple[str, ...]
    train_examples: int
    validation_examples: int
    epochs_run: int
    best_epoch: int


@dataclass(frozen=True)
class ClassScore:
    name: str
    precision: float
    recall: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    count: int
    per_class: tuple[ClassScore, ...]
    confusion: tuple[tuple[int, ...], ...]
    split: str = field(default="")


def progress_from(p: jobs_pb2.JobProgress) -> JobProgress:
    return JobProgress(
        phase=p.phase,
        epoch=p.epoch,
        epochs=p.epochs,
        loss=p.loss,
        train_accuracy=p.train_accuracy,
        val_accuracy=p.val_accuracy,
        eta_seconds=p.eta_seconds,
        trial=p.trial,
        trials=p.trials,
        message=p.message,
    )


def job_from(j: jobs_pb2.Job) -> Job:
    return Job(
        job_id=j.job_id,
        kind=j.kind,
        model=j.model,
        state=JOB_STATE_NAMES.get(j.state, "unknown"),
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        slot=j.slot,
        progress=progress_from(j.progress),
        error=j.error,
        result_version=j.result_version,
        request=json.loads(j.request_json) if j.request_json else {},
        trials=tuple(
            Trial(
                t.number, dict(t.params), t.val_accuracy, t.epochs_run, t.seconds, t.best, t.error
            )
            for t in j.trials
        ),
        targets=tuple(
            TargetOutcome(o.target, o.status, o.reason, dict(o.metrics)) for o in j.targets
        ),
        retry_of=j.retry_of,
    )


def event_from(e: jobs_pb2.JobEvent) -> JobEvent:
    return JobEvent(
        seq=e.seq,
        at_ms=e.at_ms,
        kind=e.kind,
        message=e.message,
        progress=progress_from(e.progress) if e.kind == "progress" else None,
        state=JOB_STATE_NAMES.get(e.state, "") if e.kind == "state" else "",
    )


def lineage_from(v: admin_pb2.ModelVersion) -> Lineage | None:
    if not v.HasField("lineage"):
        return None
    lin = v.lineage
    return Lineage(
        base_model=lin.base_model,
        base_digest=lin.base_digest,
        dataset=lin.dataset,
        dataset_digest=lin.dataset_digest,
        hyperparameters=dict(lin.hyperparameters),
        seed=lin.seed,
        strategy=lin.strategy,
        device=lin.device,
        training_seconds=lin.training_seconds,
        job_id=lin.job_id,
        class_names=tuple(lin.class_names),
        train_examples=lin.train_examples,
        validation_examples=lin.validation_examples,
        epochs_run=lin.epochs_run,
        best_epoch=lin.best_epoch,
    )


def evaluation_from(v: admin_pb2.ModelVersion) -> Evaluation | None:
    if not v.HasField("evaluation"):
        return None
    e = v.evaluation
    return Evaluation(
        accuracy=e.accuracy,
        count=e.count,
        per_class=tuple(ClassScore(c.name, c.precision, c.recall, c.support) for c in e.per_class),
        confusion=tuple(tuple(int(n) for n in row.counts) for row in e.confusion),
        split=e.split,
    )
