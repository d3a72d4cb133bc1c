"""Serde between wire messages and store records; servicers call nothing else to convert."""

from __future__ import annotations

from collections.abc import Iterable

from cloudsvc.fleet import DeviceView
from cloudsvc.store.metadata import (
    ArtifactRecord,
    Assignment,
    CapabilitiesRecord,
    DesiredStateRecord,
    ModelRecord,
    ModelStatusRecord,
    TensorSpecRecord,
    VersionRecord,
)
from protos.admin.v1 import admin_pb2
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
