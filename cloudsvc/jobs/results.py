"""What a worker hands back to the manager (result.json in the job's folder), torch-free.

The worker builds files; the manager, in the cloud process, turns them into a registered
version or artifact. Keeping registration in one process keeps the registry's numbering
and the metadata store's writes in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cloudsvc.registry import Build
from cloudsvc.store.metadata import (
    ClassMetricsRecord,
    EvaluationRecord,
    LineageRecord,
)
from protos.artifact.v1 import artifact_pb2

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"


class BuildResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str
    folder: str  # relative to the job folder
    files: list[str]  # relative to `folder`, entrypoint first
    format: str = "onnx"
    metrics: dict[str, float] = {}
    steps: list[str] = []
    golden_file: str = ""  # a serialized Manifest holding only golden_samples
    preprocessing: dict[str, str] = {}
    metadata: dict[str, str] = {}

    def to_build(self, job_dir: Path) -> Build:
        samples: tuple[artifact_pb2.GoldenSample, ...] = ()
        if self.golden_file:
            holder = artifact_pb2.Manifest()
            holder.ParseFromString((job_dir / self.golden_file).read_bytes())
            samples = tuple(holder.golden_samples)
        return Build(
            target=self.target,
            folder=job_dir / self.folder,
            files=tuple(self.files),
            format=self.format,
            metrics=dict(self.metrics),
            steps=tuple(self.steps),
            golden_samples=samples,
            preprocessing=dict(self.preprocessing),
            metadata=dict(self.metadata),
        )


class TargetOutcome(BaseModel):
    target: str
    status: Literal["built", "refused", "failed"]
    reason: str = ""
    metrics: dict[str, float] = {}


class TrialResult(BaseModel):
    number: int
    params: dict[str, str]
    val_accuracy: float = 0.0
    epochs_run: int = 0
    seconds: float = 0.0
    best: bool = False
    error: str = ""


class ClassScore(BaseModel):
    name: str
    precision: float
    recall: float
    support: int


class Evaluation(BaseModel):
    accuracy: float
    count: int
    per_class: list[ClassScore]
    confusion: list[list[int]]
    split: str

    def to_record(self) -> EvaluationRecord:
        return EvaluationRecord(
            accuracy=self.accuracy,
            count=self.count,
            per_class=tuple(
                ClassMetricsRecord(c.name, c.precision, c.recall, c.support) for c in self.per_class
            ),
            confusion=tuple(tuple(row) for row in self.confusion),
            split=self.split,
        )


class Lineage(BaseModel):
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
    class_names: list[str]
    train_examples: int
    validation_examples: int
    epochs_run: int
    best_epoch: int

    def to_record(self) -> LineageRecord:
        data = self.model_dump()
        data["class_names"] = tuple(self.class_names)
        return LineageRecord(**data)


class JobResult(BaseModel):
    """Everything a finished worker produced; `source` only for fine-tunes."""

    builds: list[BuildResult] = []
    source: BuildResult | None = None
    outcomes: list[TargetOutcome] = []
    trials: list[TrialResult] = []
    lineage: Lineage | None = None
    evaluation: Evaluation | None = None


class WorkerError(BaseModel):
    message: str
    code: str = "failed_precondition"
    phase: str = ""
