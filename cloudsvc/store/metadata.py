"""The metadata store interface and its records.

Records are plain frozen dataclasses, not protos, so a PostgreSQL implementation can follow
without callers changing. Every implementation passes tests/cloudsvc/test_metadata_store.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class TensorSpecRecord:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for dynamic dimensions


@dataclass(frozen=True)
class ModelRecord:
    name: str
    description: str
    created_at: int
    latest_version: int = 0
    version_count: int = 0


@dataclass(frozen=True)
class ArtifactRecord:
    model: str
    version: int
    target: str
    manifest_digest: str
    size_bytes: int
    chunk_count: int
    created_at: int
    # The manifest's own bytes are a blob named by manifest_digest; its Ed25519 signature
    # lives here so that blob stays verifiable by its name.
    signature_hex: str = ""
    key_id: str = ""
    # What the compile measured (size_bytes, latency_p50_ms, accuracy_drop, ...).
    metrics: Mapping[str, float] = field(default_factory=dict)
    steps: tuple[str, ...] = ()
    format: str = "onnx"
    file_count: int = 1


@dataclass(frozen=True)
class LineageRecord:
    """Where a fine-tuned version came from (see admin.proto Lineage)."""

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


@dataclass(frozen=True)
class ClassMetricsRecord:
    name: str
    precision: float
    recall: float
    support: int


@dataclass(frozen=True)
class EvaluationRecord:
    """Scores on the held-out split; confusion rows are true classes."""

    accuracy: float
    count: int
    per_class: tuple[ClassMetricsRecord, ...] = ()
    confusion: tuple[tuple[int, ...], ...] = ()
    split: str = ""


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: int
    description: str
    created_at: int
    source_sha256: str
    parent_version: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[TensorSpecRecord, ...] = ()
    outputs: tuple[TensorSpecRecord, ...] = ()
    golden_sample_count: int = 0
    created_by: str = ""
    artifacts: tuple[ArtifactRecord, ...] = ()
    lineage: LineageRecord | None = None
    evaluation: EvaluationRecord | None = None

    def artifact(self, target: str) -> ArtifactRecord | None:
        return next((a for a in self.artifacts if a.target == target), None)


@dataclass(frozen=True)
class CapabilitiesRecord:
    arch: str = ""
    os: str = ""
    execution_providers: tuple[str, ...] = ()
    memory_bytes: int = 0
    agent_version: str = ""
    hostname: str = ""
    onnxruntime_version: str = ""


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    token_hash: str
    enrolled_at: int
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: CapabilitiesRecord = field(default_factory=CapabilitiesRecord)
    last_seen_at: float = 0.0

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Assignment:
    model: str
    version: int
    target: str
    manifest_digest: str


@dataclass(frozen=True)
class DesiredStateRecord:
    device_id: str
    generation: int = 0
    assignments: tuple[Assignment, ...] = ()


@dataclass(frozen=True)
class ModelStatusRecord:
    model: str
    active_version: int = 0
    active_digest: str = ""
    previous_version: int = 0
    desired_version: int = 0
    phase: int = 0  # fleet_pb2.ModelPhase value
    error: str = ""
    execution_provider: str = ""


@dataclass(frozen=True)
class ReportedStateRecord:
    device_id: str
    observed_generation: int = 0
    models: tuple[ModelStatusRecord, ...] = ()
    last_error: str = ""
    inference_endpoint: str = ""
    reported_at: float = 0.0


@dataclass(frozen=True)
class EnrollTokenRecord:
    token_hash: str
    created_at: int
    expires_at: int = 0  # unix seconds; 0 = never
    note: str = ""

    def valid_at(self, now: float) -> bool:
        return self.expires_at == 0 or now < self.expires_at


@dataclass(frozen=True)
class DeploymentRecord:
    """A standing intent: devices matching `selector` run `model` v`version`.

    Applied to matching devices when deployed, and again to every device that enrolls
    later with matching labels (a replaced device at a site gets what the site runs).
    """

    model: str
    selector: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    version: int
    target: str = ""
    created_at: float = 0.0

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    """A fine-tune or compile job. `request`, `progress` and `result` are JSON documents
    whose shapes belong to cloudsvc.jobs; the store keeps them opaque."""

    job_id: str
    kind: str
    model: str
    request: str
    state: JobState = JobState.QUEUED
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    slot: str = ""
    progress: str = "{}"
    result: str = "{}"
    error: str = ""
    retry_of: str = ""


@dataclass(frozen=True)
class JobEventRecord:
    """One line of a job's log: a message, a progress snapshot (JSON) or a state change."""

    job_id: str
    seq: int
    at: float
    kind: str  # log | progress | state
    message: str = ""
    data: str = ""


class MetadataStore(ABC):
    """Durable metadata. Methods are safe to call from many threads at once."""

    # models and versions -------------------------------------------------------------------
    @abstractmethod
    def ensure_model(self, name: str, description: str, created_at: int) -> ModelRecord:
        """The model, created with this description if it did not exist."""

    @abstractmethod
    def get_model(self, name: str) -> ModelRecord | None: ...

    @abstractmethod
    def list_models(self) -> list[ModelRecord]:
        """Every model, sorted by name."""

    @abstractmethod
    def add_version(self, version: VersionRecord) -> VersionRecord:
        """Record a new version with its artifacts; creates the model if needed.

        Raises Conflict when (model, version) exists: versions are immutable.
        """

    @abstractmethod
    def add_artifact(self, artifact: ArtifactRecord) -> None:
        """Another target's artifact for an existing version; Conflict if the target exists,
        UnknownResource if the version does not."""

    @abstractmethod
    def get_version(self, model: str, version: int) -> VersionRecord | None: ...

    @abstractmethod
    def list_versions(self, model: str) -> list[VersionRecord]:
        """Versions of the model, oldest first."""

    @abstractmethod
    def find_artifact(self, manifest_digest: str) -> ArtifactRecord | None: ...

    # devices -------------------------------------------------------------------------------
    @abstractmethod
    def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace the device's record (labels, capabilities, token hash)."""

    @abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    @abstractmethod
    def device_by_token_hash(self, token_hash: str) -> DeviceRecord | None: ...

    @abstractmethod
    def list_devices(self) -> list[DeviceRecord]:
        """Every device, sorted by id."""

    @abstractmethod
    def touch_device(self, device_id: str, seen_at: float) -> None: ...

    # desired and reported state ----------------------------------------------------------
    @abstractmethod
    def get_desired(self, device_id: str) -> DesiredStateRecord:
        """The desired state; generation 0 with no assignments when none was ever set."""

    @abstractmethod
    def put_desired(self, state: DesiredStateRecord, expected_generation: int) -> bool:
        """Store the state if the stored generation is still `expected_generation`.

        False (nothing written) when another writer moved it on first.
        """

    @abstractmethod
    def get_reported(self, device_id: str) -> ReportedStateRecord | None: ...

    @abstractmethod
    def put_reported(self, state: ReportedStateRecord) -> None: ...

    # enrollment tokens -------------------------------------------------------------------
    @abstractmethod
    def add_enroll_token(self, token: EnrollTokenRecord) -> None: ...

    @abstractmethod
    def get_enroll_token(self, token_hash: str) -> EnrollTokenRecord | None: ...

    # deployments -------------------------------------------------------------------------
    @abstractmethod
    def put_deployment(self, deployment: DeploymentRecord) -> None:
        """Record a deployment; one for the same model and selector is replaced."""

    @abstractmethod
    def list_deployments(self) -> list[DeploymentRecord]:
        """Every standing deployment, oldest first."""

    # jobs ----------------------------------------------------------------------------------
    @abstractmethod
    def create_job(self, job: JobRecord) -> JobRecord:
        """Store a new job; its `job_id` is ignored and a new one ("job-<n>") assigned."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def list_jobs(
        self, model: str = "", states: Sequence[JobState] = (), limit: int = 100
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally only one model's or only some states."""

    @abstractmethod
    def update_job(self, job: JobRecord) -> None:
        """Replace the stored job with `job` (same id); UnknownResource if there is none."""

    @abstractmethod
    def add_job_event(
        self, job_id: str, kind: str, message: str = "", data: str = "", at: float = 0.0
    ) -> JobEventRecord:
        """Append an event; its seq is one more than the job's last."""

    @abstractmethod
    def list_job_events(
        self, job_id: str, after_seq: int = 0, limit: int = 10_000
    ) -> list[JobEventRecord]:
        """The job's events with seq > after_seq, oldest first."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the store is unusable afterwards."""
