"""The metadata store interface and the records only the store keeps.

Domain types (versions, artifacts, desired and reported states, jobs...) come from
edgefleet.core and are stored as they are; the records here are the store's own: a device's
credential and enrollment tokens. Every implementation passes
tests/cloudsvc/test_metadata_store.py, so a PostgreSQL one can follow without callers
changing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgefleet.core.data import CapturePolicy
from edgefleet.core.fleet import Assignment, Capabilities, Deployment, DesiredState, ReportedState
from edgefleet.core.jobs import Job, JobEvent, JobState
from edgefleet.core.loop import Loop, LoopRun
from edgefleet.core.rollouts import Rollout, RolloutState
from edgefleet.core.tokens import AdminToken, EnrollToken
from edgefleet.core.versions import Artifact, Evaluation, Model, ModelVersion


@dataclass(frozen=True)
class DeviceRecord:
    """An enrolled device: its credential (hashed), operator labels and capabilities."""

    device_id: str
    token_hash: str
    enrolled_at: int
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)
    last_seen_at: float = 0.0
    revoked: bool = False

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class EnrollTokenRecord:
    """An enrollment token and the hash it is found by (the secret itself is never kept)."""

    token_hash: str
    token: EnrollToken


@dataclass(frozen=True)
class AdminTokenRecord:
    token_hash: str
    token: AdminToken


class MetadataStore(ABC):
    """Durable metadata. Methods are safe to call from many threads at once."""

    # models and versions -------------------------------------------------------------------
    @abstractmethod
    def ensure_model(self, name: str, description: str, created_at: int) -> Model:
        """The model, created with this description if it did not exist."""

    @abstractmethod
    def get_model(self, name: str) -> Model | None: ...

    @abstractmethod
    def list_models(self) -> list[Model]:
        """Every model, sorted by name."""

    @abstractmethod
    def add_version(self, version: ModelVersion) -> ModelVersion:
        """Record a new version with its artifacts; creates the model if needed.

        Raises Conflict when (model, version) exists: versions are immutable.
        """

    @abstractmethod
    def add_artifact(self, artifact: Artifact) -> None:
        """Another target's artifact for an existing version; Conflict if the target exists,
        UnknownResource if the version does not."""

    @abstractmethod
    def add_evaluation(self, model: str, version: int, evaluation: Evaluation) -> None:
        """Append a later scoring (`edgefleet evaluate`) to a version's record; the version
        itself stays as it was made. UnknownResource if the version does not exist."""

    @abstractmethod
    def get_version(self, model: str, version: int) -> ModelVersion | None: ...

    @abstractmethod
    def list_versions(self, model: str) -> list[ModelVersion]:
        """Versions of the model, oldest first."""

    @abstractmethod
    def find_artifact(self, manifest_digest: str) -> Artifact | None: ...

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
    def get_desired(self, device_id: str) -> DesiredState:
        """The desired state; generation 0 with no assignments when none was ever set."""

    @abstractmethod
    def assign(
        self,
        assignments: Mapping[str, Assignment],
        deployment: Deployment | None = None,
    ) -> dict[str, int]:
        """In one transaction: record `deployment` (replacing one of the same model and
        selector) and give each device (id -> assignment) its assignment, in place of the
        device's assignment of that model, moving its generation on by one.

        All or nothing: a crash leaves either the whole deploy or none of it. Returns the
        new generation of each device.
        """

    @abstractmethod
    def capture_policy(self, model: str) -> CapturePolicy | None:
        """What devices capture of the model's inferences (None: nothing was set)."""

    @abstractmethod
    def set_capture_policy(self, model: str, policy: CapturePolicy) -> None: ...

    @abstractmethod
    def peaks(self, device_id: str) -> dict[str, int]:
        """Model -> the highest version ever assigned to the device (kept by `assign`):
        below it, an assignment is a rollback, whatever the device activated since."""

    @abstractmethod
    def allowed_digests(self, device_id: str) -> set[str]:
        """Manifest digests of the device's current and previous desired state: what it
        may read."""

    @abstractmethod
    def get_reported(self, device_id: str) -> ReportedState | None: ...

    @abstractmethod
    def put_reported(self, state: ReportedState) -> None: ...

    # enrollment tokens -------------------------------------------------------------------
    @abstractmethod
    def add_enroll_token(self, token: EnrollTokenRecord) -> None: ...

    @abstractmethod
    def get_enroll_token(self, token_hash: str) -> EnrollTokenRecord | None: ...

    @abstractmethod
    def find_enroll_token(self, token_id: str) -> EnrollTokenRecord | None: ...

    @abstractmethod
    def list_enroll_tokens(self) -> list[EnrollToken]:
        """Every enrollment token, newest first."""

    @abstractmethod
    def put_enroll_token(self, token: EnrollTokenRecord) -> None:
        """Replace a stored token (revoked, ...); UnknownResource if there is none."""

    @abstractmethod
    def use_enroll_token(self, token_hash: str, now: float) -> tuple[EnrollToken | None, str]:
        """Count one use of the token if it may be used now, atomically: (the token after
        the use, "") or (the token or None, why it may not)."""

    # admin tokens ------------------------------------------------------------------------
    @abstractmethod
    def add_admin_token(self, token: AdminTokenRecord) -> None: ...

    @abstractmethod
    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None: ...

    @abstractmethod
    def find_admin_token(self, token_id: str) -> AdminTokenRecord | None: ...

    @abstractmethod
    def list_admin_tokens(self) -> list[AdminToken]:
        """Every admin token, newest first."""

    @abstractmethod
    def put_admin_token(self, token: AdminTokenRecord) -> None: ...

    # deployments -------------------------------------------------------------------------
    @abstractmethod
    def list_deployments(self) -> list[Deployment]:
        """Every standing deployment, oldest first."""

    @abstractmethod
    def unassign(self, model: str, device_ids: Sequence[str]) -> dict[str, int]:
        """In one transaction: take `model` out of each device's desired state (those that
        have it), moving its generation on by one. Returns the new generations."""

    # rollouts ------------------------------------------------------------------------------
    @abstractmethod
    def put_rollout(self, rollout: Rollout) -> None:
        """Store a rollout (new, or its next state)."""

    @abstractmethod
    def get_rollout(self, rollout_id: str) -> Rollout | None: ...

    @abstractmethod
    def list_rollouts(self, model: str = "", states: Sequence[RolloutState] = ()) -> list[Rollout]:
        """Rollouts (of `model`; "": all) in one of `states` (none given: any), oldest
        first."""

    @abstractmethod
    def count_rollouts(self) -> int:
        """How many rollouts were ever started."""

    # the closed loop -----------------------------------------------------------------------
    @abstractmethod
    def put_loop(self, loop: Loop) -> None:
        """Store a model's loop settings and note (its runs are stored apart)."""

    @abstractmethod
    def get_loop(self, model: str) -> Loop | None:
        """A model's loop, without its runs."""

    @abstractmethod
    def list_loops(self) -> list[Loop]:
        """Every loop, by model name, without runs."""

    @abstractmethod
    def put_loop_run(self, run: LoopRun) -> None:
        """Store a run (new, or its next state), by (model, number)."""

    @abstractmethod
    def list_loop_runs(self, model: str, limit: int = 20) -> list[LoopRun]:
        """A model's runs, newest first, at most `limit` (0: all)."""

    # jobs ----------------------------------------------------------------------------------
    @abstractmethod
    def create_job(self, job: Job) -> Job:
        """Store a new job; its `job_id` is ignored and a new one ("job-<n>") assigned."""

    @abstractmethod
    def get_job(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list_jobs(
        self, model: str = "", states: Sequence[JobState] = (), limit: int = 100
    ) -> list[Job]:
        """Jobs, newest first, optionally only one model's or only some states."""

    @abstractmethod
    def update_job(self, job: Job) -> None:
        """Replace the stored job with `job` (same id); UnknownResource if there is none."""

    @abstractmethod
    def add_job_event(self, event: JobEvent) -> JobEvent:
        """Append an event; the stored one's seq is one more than the job's last."""

    @abstractmethod
    def list_job_events(
        self, job_id: str, after_seq: int = 0, limit: int = 10_000
    ) -> list[JobEvent]:
        """The job's events with seq > after_seq, oldest first."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; the store is unusable afterwards."""
