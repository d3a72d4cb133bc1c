"""Serde between wire messages and store records; servicers call nothing else to convert."""

from __future__ import annotations

import json
from collections.abc import Iterable

from cloudsvc.fleet import DeviceView
from cloudsvc.jobs.events import Progress
from cloudsvc.store.metadata import (
    ArtifactRecord,
    Assignment,
    CapabilitiesRecord,
    DesiredStateRecord,
    EvaluationRecord,
    JobEventRecord,
    JobRecord,
    JobState,
    LineageRecord,
    ModelRecord,
    ModelStatusRecord,
    TensorSpecRecord,
    VersionRecord,
)
from protos.admin.v1 import admin_pb2, jobs_pb2
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import fleet_pb2


def tensor_specs(specs: Iterable[TensorSpecRecord]) -> list[artifact_pb2.TensorSpec]:
    return [
        artifact_pb2.TensorSpec(name=s.name, datatype=s.datatype, shape=list(s.shape))
        for s in specs
    ]


def model_to_proto(m: ModelRecord) -> admin_pb2.Model:
    return admin_pb2.Model(
        name=m.name,
        description=m.description,
        latest_version=m.latest_version,
        created_at=m.created_at,
        version_count=m.version_count,
    )


def artifact_to_proto(a: ArtifactRecord) -> admin_pb2.ArtifactInfo:
    return admin_pb2.ArtifactInfo(
        target=a.target,
        manifest_digest=a.manifest_digest,
        size_bytes=a.size_bytes,
        chunk_count=a.chunk_count,
        metrics=dict(a.metrics),
        steps=list(a.steps),
        format=a.format,
        file_count=a.file_count,
    )


def lineage_to_proto(lineage: LineageRecord | None) -> admin_pb2.Lineage | None:
    if lineage is None:
        return None
    return admin_pb2.Lineage(
        base_model=lineage.base_model,
        base_digest=lineage.base_digest,
        dataset=lineage.dataset,
        dataset_digest=lineage.dataset_digest,
        hyperparameters=dict(lineage.hyperparameters),
        seed=lineage.seed,
        strategy=lineage.strategy,
        device=lineage.device,
        training_seconds=lineage.training_seconds,
        job_id=lineage.job_id,
        class_names=list(lineage.class_names),
        train_examples=lineage.train_examples,
        validation_examples=lineage.validation_examples,
        epochs_run=lineage.epochs_run,
        best_epoch=lineage.best_epoch,
    )


def evaluation_to_proto(evaluation: EvaluationRecord | None) -> admin_pb2.Evaluation | None:
    if evaluation is None:
        return None
    return admin_pb2.Evaluation(
        accuracy=evaluation.accuracy,
        count=evaluation.count,
        per_class=[
            admin_pb2.ClassMetrics(
                name=c.name, precision=c.precision, recall=c.recall, support=c.support
            )
            for c in evaluation.per_class
        ],
        confusion=[admin_pb2.ConfusionRow(counts=list(row)) for row in evaluation.confusion],
        split=evaluation.split,
    )


def version_to_proto(v: VersionRecord) -> admin_pb2.ModelVersion:
    return admin_pb2.ModelVersion(
        model=v.model,
        version=v.version,
        description=v.description,
        parent_version=v.parent_version,
        metadata=dict(v.metadata),
        artifacts=[artifact_to_proto(a) for a in v.artifacts],
        inputs=tensor_specs(v.inputs),
        outputs=tensor_specs(v.outputs),
        created_at=v.created_at,
        source_sha256=v.source_sha256,
        golden_sample_count=v.golden_sample_count,
        created_by=v.created_by,
        lineage=lineage_to_proto(v.lineage),
        evaluation=evaluation_to_proto(v.evaluation),
    )


def capabilities_from_proto(c: fleet_pb2.Capabilities) -> CapabilitiesRecord:
    return CapabilitiesRecord(
        arch=c.arch,
        os=c.os,
        execution_providers=tuple(c.execution_providers),
        memory_bytes=c.memory_bytes,
        agent_version=c.agent_version,
        hostname=c.hostname,
        onnxruntime_version=c.onnxruntime_version,
    )


def capabilities_to_proto(c: CapabilitiesRecord) -> fleet_pb2.Capabilities:
    return fleet_pb2.Capabilities(
        arch=c.arch,
        os=c.os,
        execution_providers=list(c.execution_providers),
        memory_bytes=c.memory_bytes,
        agent_version=c.agent_version,
        hostname=c.hostname,
        onnxruntime_version=c.onnxruntime_version,
    )


def assignment_to_proto(a: Assignment) -> fleet_pb2.ModelAssignment:
    return fleet_pb2.ModelAssignment(
        model=a.model, version=a.version, target=a.target, manifest_digest=a.manifest_digest
    )


def desired_to_proto(d: DesiredStateRecord) -> fleet_pb2.DesiredState:
    return fleet_pb2.DesiredState(
        device_id=d.device_id,
        generation=d.generation,
        models=[assignment_to_proto(a) for a in d.assignments],
    )


def model_status_from_proto(s: fleet_pb2.ModelStatus) -> ModelStatusRecord:
    return ModelStatusRecord(
        model=s.model,
        active_version=s.active_version,
        active_digest=s.active_digest,
        previous_version=s.previous_version,
        desired_version=s.desired_version,
        phase=int(s.phase),
        error=s.error,
        execution_provider=s.execution_provider,
    )


def model_status_to_proto(s: ModelStatusRecord) -> fleet_pb2.ModelStatus:
    return fleet_pb2.ModelStatus(
        model=s.model,
        active_version=s.active_version,
        active_digest=s.active_digest,
        previous_version=s.previous_version,
        desired_version=s.desired_version,
        phase=fleet_pb2.ModelPhase.ValueType(s.phase),
        error=s.error,
        execution_provider=s.execution_provider,
    )


def device_to_proto(v: DeviceView) -> admin_pb2.Device:
    reported = v.reported
    return admin_pb2.Device(
        device_id=v.device.device_id,
        labels=dict(v.device.labels),
        capabilities=capabilities_to_proto(v.device.capabilities),
        online=v.online,
        last_seen_at=int(v.device.last_seen_at),
        desired_generation=v.desired.generation,
        reported_generation=reported.observed_generation if reported else 0,
        desired_models=[assignment_to_proto(a) for a in v.desired.assignments],
        models=[model_status_to_proto(m) for m in reported.models] if reported else [],
        last_error=reported.last_error if reported else "",
        enrolled_at=v.device.enrolled_at,
        inference_endpoint=reported.inference_endpoint if reported else "",
    )


JOB_STATES: dict[JobState, jobs_pb2.JobState.ValueType] = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}


def progress_to_proto(p: Progress) -> jobs_pb2.JobProgress:
    return jobs_pb2.JobProgress(
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


def job_to_proto(job: JobRecord) -> jobs_pb2.Job:
    result = json.loads(job.result or "{}")
    return jobs_pb2.Job(
        job_id=job.job_id,
        kind=job.kind,
        model=job.model,
        state=JOB_STATES[job.state],
        created_at=int(job.created_at),
        started_at=int(job.started_at),
        finished_at=int(job.finished_at),
        slot=job.slot,
        progress=progress_to_proto(Progress.from_json(job.progress)),
        error=job.error,
        result_version=int(result.get("version", 0)),
        request_json=job.request,
        trials=[
            jobs_pb2.Trial(
                number=t["number"],
                params=t["params"],
                val_accuracy=t["val_accuracy"],
                epochs_run=t["epochs_run"],
                seconds=t["seconds"],
                best=t["best"],
                error=t["error"],
            )
            for t in result.get("trials", [])
        ],
        targets=[
            jobs_pb2.TargetOutcome(
                target=o["target"], status=o["status"], reason=o["reason"], metrics=o["metrics"]
            )
            for o in result.get("outcomes", [])
        ],
        retry_of=job.retry_of,
    )


def job_event_to_proto(event: JobEventRecord) -> jobs_pb2.JobEvent:
    message = jobs_pb2.JobEvent(
        seq=event.seq, at_ms=int(event.at * 1000), kind=event.kind, message=event.message
    )
    if event.kind == "progress":
        message.progress.CopyFrom(progress_to_proto(Progress.from_json(event.data)))
    elif event.kind == "state" and event.data:
        message.state = JOB_STATES[JobState(event.data)]
    return message
