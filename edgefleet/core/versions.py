"""The registry's concepts: models, their immutable versions, where a version came from and
how it scored, and the artifacts compiled from it. One type each, used by the cloud, its
stores, the job worker and the client alike (messages in protos/admin/v1/admin.proto)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.core.data import InputStats
from edgefleet.core.stats import wilson_interval
from edgefleet.core.wire import wire_field


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's name, Open Inference Protocol datatype and shape (-1: dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        """The datatype and shape, e.g. FP32[?, 3, 64, 64]."""
        dims = ", ".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.datatype}[{dims}]"

    def __str__(self) -> str:
        dims = ",".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}:{self.datatype}[{dims}]"


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    created_at: int
    latest_version: int = 0
    version_count: int = 0


@dataclass(frozen=True)
class Artifact:
    """One version compiled for one target. The manifest's bytes are a blob named by
    `manifest_digest`; its Ed25519 signature lives here, so the blob stays verifiable by
    its name."""

    model: str
    version: int
    target: str
    manifest_digest: str
    size_bytes: int
    chunk_count: int
    created_at: int
    signature_hex: str = ""
    key_id: str = ""
    # What the compile measured (size_bytes, latency_p50_ms, accuracy_drop, update_bytes...).
    metrics: Mapping[str, float] = field(default_factory=dict)
    steps: tuple[str, ...] = ()
    format: str = "onnx"
    file_count: int = 1


@dataclass(frozen=True)
class Lineage:
    """Where a fine-tuned version came from: enough to reproduce it."""

    base_model: str
    base_digest: str
    dataset: str
    dataset_digest: str
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    strategy: str = ""
    device: str = ""
    training_seconds: float = 0.0
    job_id: str = ""
    class_names: tuple[str, ...] = ()
    train_examples: int = 0
    validation_examples: int = 0
    epochs_run: int = 0
    best_epoch: int = 0
    # The version whose trained weights training started from (0: a fresh head).
    warm_start_from: int = 0
    test_examples: int = 0
    final: bool = False


@dataclass(frozen=True)
class ClassScore:
    name: str
    precision: float
    recall: float
    support: int


def _rows_from_wire(rows: object) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(n) for n in row.counts) for row in rows)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ConfusionRow:
    """How a row of a confusion matrix travels (a message can't nest repeated fields)."""

    counts: tuple[int, ...]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training: losses and accuracies on the training and validation data.

    `learning_rate` is 0 where it is not known.
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    """Scores on held-out data; confusion rows are true classes, columns predicted ones."""

    accuracy: float
    count: int
    per_class: tuple[ClassScore, ...] = ()
    confusion: tuple[tuple[int, ...], ...] = field(
        default=(),
        metadata=wire_field(
            to_wire=lambda rows: tuple(ConfusionRow(tuple(r)) for r in rows),
            from_wire=_rows_from_wire,
        ),
    )
    split: str = ""
    # Per-epoch training curves of the run that produced it; empty where not trained here.
    history: tuple[EpochRecord, ...] = ()
    loss: float = 0.0  # mean cross-entropy; 0 where not measured
    target: str = ""  # the artifact scored; "": the trained model, in its job
    data: str = ""  # the data set scored, as the user named it
    created_at: int = 0  # when it was measured; 0: when the version was made
    sample: str = ""  # how the scored examples were drawn

    def interval(self) -> tuple[float, float]:
        """The accuracy's 95% Wilson interval on `count` examples."""
        return wilson_interval(self.accuracy * self.count, self.count)

    @property
    def example_points(self) -> float:
        """What one example moves the accuracy by, in points (1.1 on 88 examples)."""
        return 100.0 / self.count if self.count else 0.0


@dataclass(frozen=True)
class ModelVersion:
    """An immutable, numbered version of a model with its artifacts."""

    model: str
    version: int
    description: str
    created_at: int
    source_sha256: str
    parent_version: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    golden_sample_count: int = 0
    created_by: str = ""
    artifacts: tuple[Artifact, ...] = ()
    lineage: Lineage | None = None
    evaluation: Evaluation | None = None
    # Statistics of its training inputs: what devices' input statistics are compared with.
    baseline: tuple[InputStats, ...] = ()
    # Scores on the test set its fine-tune kept apart; None where none was kept.
    test: Evaluation | None = None
    # Later scorings by `edgefleet evaluate`, oldest first.
    evaluations: tuple[Evaluation, ...] = ()

    def artifact(self, target: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.target == target), None)
