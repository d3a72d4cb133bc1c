"""Metadata kept in dictionaries: for tests and throw-away demos (lost on exit)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence

from cloudsvc.errors import Conflict, UnknownResource
from cloudsvc.store.metadata import (
    AdminTokenRecord,
    DeviceRecord,
    EnrollTokenRecord,
    MetadataStore,
)
from edgefleet.core.data import CapturePolicy
from edgefleet.core.fleet import Assignment, Deployment, DesiredState, ReportedState
from edgefleet.core.jobs import Job, JobEvent, JobState
from edgefleet.core.loop import Loop, LoopRun
from edgefleet.core.rollouts import Rollout, RolloutState
from edgefleet.core.tokens import AdminToken, EnrollToken
from edgefleet.core.versions import Artifact, Evaluation, Model, ModelVersion


class MemoryMetadataStore(MetadataStore):
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._models: dict[str, Model] = {}
        self._versions: dict[tuple[str, int], ModelVersion] = {}
        self._devices: dict[str, DeviceRecord] = {}
        self._desired: dict[str, DesiredState] = {}
        self._reported: dict[str, ReportedState] = {}
        self._tokens: dict[str, EnrollTokenRecord] = {}
        self._admin_tokens: dict[str, AdminTokenRecord] = {}
        self._previous: dict[str, DesiredState] = {}
        self._peaks: dict[str, dict[str, int]] = {}
        self._capture_policies: dict[str, CapturePolicy] = {}
        self._deployments: dict[tuple[str, tuple[tuple[str, str], ...]], Deployment] = {}
        self._rollouts: dict[str, Rollout] = {}
        self._loops: dict[str, Loop] = {}
        self._loop_runs: dict[tuple[str, int], LoopRun] = {}
        self._jobs: dict[str, Job] = {}  # insertion order is creation order
        self._job_events: dict[str, list[JobEvent]] = {}

    def ensure_model(self, name: str, description: str, created_at: int) -> Model:
        with self._lock:
            if name not in self._models:
                self._models[name] = Model(name, description, created_at)
            return self._model_view(name)

    def _model_view(self, name: str) -> Model:
        base = self._models[name]
        numbers = [v for (m, v) in self._versions if m == name]
        return dataclasses.replace(
            base, latest_version=max(numbers, default=0), version_count=len(numbers)
        )

    def get_model(self, name: str) -> Model | None:
        with self._lock:
            return self._model_view(name) if name in self._models else None

    def list_models(self) -> list[Model]:
        with self._lock:
            return [self._model_view(n) for n in sorted(self._models)]

    def add_version(self, version: ModelVersion) -> ModelVersion:
        with self._lock:
            key = (version.model, version.version)
            if key in self._versions:
                raise Conflict(
                    f"{version.model} version {version.version} exists; versions are immutable"
                )
            self.ensure_model(version.model, version.description, version.created_at)
            self._versions[key] = version
            return version

    def add_artifact(self, artifact: Artifact) -> None:
        with self._lock:
            key = (artifact.model, artifact.version)
            current = self._versions.get(key)
            if current is None:
                raise UnknownResource(f"{artifact.model} has no version {artifact.version}")
            if current.artifact(artifact.target) is not None:
                raise Conflict(
                    f"{artifact.model} v{artifact.version} already has a {artifact.target} artifact"
                )
            self._versions[key] = dataclasses.replace(
                current, artifacts=(*current.artifacts, artifact)
            )

    def add_evaluation(self, model: str, version: int, evaluation: Evaluation) -> None:
        with self._lock:
            current = self._versions.get((model, version))
            if current is None:
                raise UnknownResource(f"{model} has no version {version}")
            self._versions[(model, version)] = dataclasses.replace(
                current, evaluations=(*current.evaluations, evaluation)
            )

    def get_version(self, model: str, version: int) -> ModelVersion | None:
        with self._lock:
            return self._versions.get((model, version))

    def list_versions(self, model: str) -> list[ModelVersion]:
        with self._lock:
            return sorted(
                (v for (m, _), v in self._versions.items() if m == model),
                key=lambda v: v.version,
            )

    def find_artifact(self, manifest_digest: str) -> Artifact | None:
        with self._lock:
            for v in self._versions.values():
                for a in v.artifacts:
                    if a.manifest_digest == manifest_digest:
                        return a
            return None

    def put_device(self, device: DeviceRecord) -> None:
        with self._lock:
            self._devices[device.device_id] = device

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_id)

    def device_by_token_hash(self, token_hash: str) -> DeviceRecord | None:
        with self._lock:
            return next((d for d in self._devices.values() if d.token_hash == token_hash), None)

    def list_devices(self) -> list[DeviceRecord]:
        with self._lock:
            return [self._devices[k] for k in sorted(self._devices)]

    def touch_device(self, device_id: str, seen_at: float) -> None:
        with self._lock:
            device = self._devices.get(device_id)
            if device is not None:
                self._devices[device_id] = dataclasses.replace(device, last_seen_at=seen_at)

    def get_desired(self, device_id: str) -> DesiredState:
        with self._lock:
            return self._desired.get(device_id, DesiredState(device_id))

    def assign(
        self,
        assignments: Mapping[str, Assignment],
        deployment: Deployment | None = None,
    ) -> dict[str, int]:
        with self._lock:
            if deployment is not None:
                key = deployment.key
                self._deployments.pop(key, None)  # re-inserted last: newest wins on replay
                self._deployments[key] = deployment
            generations = {}
            for device_id, assignment in assignments.items():
                current = self.get_desired(device_id)
                state = current.with_assignment(assignment)
                self._previous[device_id] = current
                self._desired[device_id] = state
                peaks = self._peaks.setdefault(device_id, {})
                # Variants count: a device sends telemetry of the versions it serves beside.
                peaks[assignment.model] = max(
                    peaks.get(assignment.model, 0),
                    assignment.version,
                    *(v.version for v in assignment.variants),
                )
                generations[device_id] = state.generation
            return generations

    def capture_policy(self, model: str) -> CapturePolicy | None:
        with self._lock:
            return self._capture_policies.get(model)

    def set_capture_policy(self, model: str, policy: CapturePolicy) -> None:
        with self._lock:
            self._capture_policies[model] = policy

    def peaks(self, device_id: str) -> dict[str, int]:
        with self._lock:
            return dict(self._peaks.get(device_id, {}))

    def allowed_digests(self, device_id: str) -> set[str]:
        with self._lock:
            previous = self._previous.get(device_id, DesiredState(device_id))
            return self.get_desired(device_id).digests() | previous.digests()

    def get_reported(self, device_id: str) -> ReportedState | None:
        with self._lock:
            return self._reported.get(device_id)

    def put_reported(self, state: ReportedState) -> None:
        with self._lock:
            self._reported[state.device_id] = state

    def add_enroll_token(self, token: EnrollTokenRecord) -> None:
        with self._lock:
            if token.token_hash in self._tokens:
                raise Conflict("that enrollment token exists already")
            self._tokens[token.token_hash] = token

    def get_enroll_token(self, token_hash: str) -> EnrollTokenRecord | None:
        with self._lock:
            return self._tokens.get(token_hash)

    def find_enroll_token(self, token_id: str) -> EnrollTokenRecord | None:
        with self._lock:
            return next((t for t in self._tokens.values() if t.token.token_id == token_id), None)

    def list_enroll_tokens(self) -> list[EnrollToken]:
        with self._lock:
            return [t.token for t in reversed(self._tokens.values())]

    def put_enroll_token(self, token: EnrollTokenRecord) -> None:
        with self._lock:
            if token.token_hash not in self._tokens:
                raise UnknownResource(f"no enrollment token {token.token.token_id}")
            self._tokens[token.token_hash] = token

    def use_enroll_token(self, token_hash: str, now: float) -> tuple[EnrollToken | None, str]:
        with self._lock:
            record = self._tokens.get(token_hash)
            if record is None:
                return None, "is not valid"
            refusal = record.token.refusal(now)
            if refusal:
                return record.token, refusal
            used = dataclasses.replace(record.token, uses=record.token.uses + 1)
            self._tokens[token_hash] = EnrollTokenRecord(token_hash, used)
            return used, ""

    def add_admin_token(self, token: AdminTokenRecord) -> None:
        with self._lock:
            if token.token_hash in self._admin_tokens:
                raise Conflict("that admin token exists already")
            self._admin_tokens[token.token_hash] = token

    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None:
        with self._lock:
            return self._admin_tokens.get(token_hash)

    def find_admin_token(self, token_id: str) -> AdminTokenRecord | None:
        with self._lock:
            found = self._admin_tokens.values()
            return next((t for t in found if t.token.token_id == token_id), None)

    def list_admin_tokens(self) -> list[AdminToken]:
        with self._lock:
            return [t.token for t in reversed(self._admin_tokens.values())]

    def put_admin_token(self, token: AdminTokenRecord) -> None:
        with self._lock:
            if token.token_hash not in self._admin_tokens:
                raise UnknownResource(f"no admin token {token.token.token_id}")
            self._admin_tokens[token.token_hash] = token

    def list_deployments(self) -> list[Deployment]:
        with self._lock:
            return list(self._deployments.values())

    def unassign(self, model: str, device_ids: Sequence[str]) -> dict[str, int]:
        with self._lock:
            generations = {}
            for device_id in device_ids:
                current = self.get_desired(device_id)
                if current.assignment(model) is None:
                    continue
                self._previous[device_id] = current
                self._desired[device_id] = current.without(model)
                generations[device_id] = current.generation + 1
            return generations

    def put_rollout(self, rollout: Rollout) -> None:
        with self._lock:
            self._rollouts[rollout.rollout_id] = rollout

    def get_rollout(self, rollout_id: str) -> Rollout | None:
        with self._lock:
            return self._rollouts.get(rollout_id)

    def list_rollouts(self, model: str = "", states: Sequence[RolloutState] = ()) -> list[Rollout]:
        with self._lock:
            found = [
                r
                for r in self._rollouts.values()
                if (not model or r.spec.model == model) and (not states or r.state in states)
            ]
        return sorted(found, key=lambda r: r.created_at)

    def count_rollouts(self) -> int:
        with self._lock:
            return len(self._rollouts)

    def put_loop(self, loop: Loop) -> None:
        with self._lock:
            self._loops[loop.config.model] = dataclasses.replace(loop, runs=())

    def get_loop(self, model: str) -> Loop | None:
        with self._lock:
            return self._loops.get(model)

    def list_loops(self) -> list[Loop]:
        with self._lock:
            return [self._loops[k] for k in sorted(self._loops)]

    def put_loop_run(self, run: LoopRun) -> None:
        with self._lock:
            self._loop_runs[(run.model, run.number)] = run

    def list_loop_runs(self, model: str, limit: int = 20) -> list[LoopRun]:
        with self._lock:
            found = sorted(
                (r for (m, _), r in self._loop_runs.items() if m == model),
                key=lambda r: -r.number,
            )
        return found[:limit] if limit else found

    def create_job(self, job: Job) -> Job:
        with self._lock:
            created = dataclasses.replace(job, job_id=f"job-{len(self._jobs) + 1}")
            self._jobs[created.job_id] = created
            return created

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list_jobs(
        self, model: str = "", states: Sequence[JobState] = (), limit: int = 100
    ) -> list[Job]:
        with self._lock:
            jobs = [
                j
                for j in reversed(self._jobs.values())
                if (not model or j.model == model) and (not states or j.state in states)
            ]
            return jobs[:limit]

    def update_job(self, job: Job) -> None:
        with self._lock:
            if job.job_id not in self._jobs:
                raise UnknownResource(f"no job is called {job.job_id!r}")
            self._jobs[job.job_id] = job

    def add_job_event(self, event: JobEvent) -> JobEvent:
        with self._lock:
            events = self._job_events.setdefault(event.job_id, [])
            stored = dataclasses.replace(event, seq=len(events) + 1)
            events.append(stored)
            return stored

    def list_job_events(
        self, job_id: str, after_seq: int = 0, limit: int = 10_000
    ) -> list[JobEvent]:
        with self._lock:
            events = self._job_events.get(job_id, [])
            return events[after_seq : after_seq + limit]
