"""Every domain type and its message agree field for field, and survive the round trip.

This is what keeps "a new field costs two edits" true: add a field to a type and not to its
message (or the reverse) and this fails naming both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from google.protobuf.message import Message

from edgefleet.core import data, fleet, jobs, loop, rollouts, tokens, trust, versions
from edgefleet.core.wire import from_json, from_proto, to_json, to_proto
from protos.admin.v1 import admin_pb2, jobs_pb2, loop_pb2, rollout_pb2
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import data_pb2, fleet_pb2
from protos.inference.v2 import grpc_predict_v2_pb2 as oip

SPEC = versions.TensorSpec("x", "FP32", (-1, 3))
LINEAGE = versions.Lineage(
    "small-cnn",
    "ab" * 32,
    "synthetic",
    "cd" * 32,
    {"lr": "0.001"},
    3,
    "head",
    "cpu",
    1.5,
    "job-1",
    ("a", "b"),
    80,
    20,
    4,
    3,
    1,
    25,
    True,
)
EVALUATION = versions.Evaluation(
    0.75,
    20,
    (versions.ClassScore("a", 0.5, 1.0, 10), versions.ClassScore("b", 1.0, 0.5, 10)),
    ((10, 0), (5, 5)),
    "validation 20%",
    (versions.EpochRecord(1, 0.9, 0.5, 0.8, 0.6, 0.001),),
    0.42,
    "onnx-cpu-int8",
    "./field-images",
    1700000100,
    "20 examples, 10 per class for 2 classes",
)
ARTIFACT = versions.Artifact(
    "m",
    2,
    "onnx-cpu-fp32",
    "ef" * 32,
    1000,
    3,
    1700000000,
    "00ff",
    "kid",
    {"size_bytes": 1.0},
    ("optimize",),
    "onnx",
    4,
)
VERSION = versions.ModelVersion(
    "m",
    2,
    "second",
    1700000000,
    "12" * 32,
    1,
    {"job": "job-1"},
    (SPEC,),
    (SPEC,),
    2,
    "admin",
    (ARTIFACT,),
    LINEAGE,
    EVALUATION,
    (),
    dataclasses.replace(EVALUATION, split="test: ./test"),
    (EVALUATION,),
)
CAPS = fleet.Capabilities(
    "x86_64",
    "Linux",
    ("CPUExecutionProvider",),
    1 << 30,
    "0.1",
    "h",
    "1.2",
    fleet.CpuFeatures(("avx512_vnni",)),
)
POLICY = data.CapturePolicy(0.1, 0.6, 1 << 20)
BINS = (data.InputBins("image", (0.0, 0.5, 1.0)),)
VARIANT = fleet.Variant(3, "onnx-cpu-int8", "ab" * 32, 0.25)
SHADOW_VARIANT = fleet.Variant(4, "onnx-cpu-fp32", "cd" * 32, 0.0, True)
DESIRED = fleet.DesiredState(
    "d1",
    7,
    (
        fleet.Assignment(
            "m",
            2,
            "onnx-cpu-fp32",
            "ef" * 32,
            True,
            POLICY,
            BINS,
            (VARIANT, SHADOW_VARIANT),
            "CPU has no VNNI/dotprod: INT8 would be slower",
        ),
    ),
    1.5,
    2.5,
)
CHANNEL = data.ChannelStats(10, 0.5, 2.0, -1.0, 3.0, (1, 2, 3, 4))
INPUT_STATS = data.InputStats("image", (CHANNEL, CHANNEL), (0.0, 0.5, 1.0))
LATENCY = data.latency_histogram([0.3, 1.2, 40.0])
WINDOW = data.ModelWindow(
    "m", 2, 10.0, 70.0, 100, 2, LATENCY, (INPUT_STATS,), 1.5, 7, 30.0, "onnx-cpu-fp32", 90, 81, 1
)
DEVICE_WINDOW = data.DeviceWindow(10.0, 70.0, 3.5, 4, 1 << 27, 1 << 30, -1.0, 4096, 12, 3)
BASELINED = dataclasses.replace(VERSION, baseline=(INPUT_STATS,))
CAPTURE = data.Capture(
    5, "m", 2, "r1", 1.8e9, 1.25, b"in", b"out", "cat", 0.42, "low-confidence", "d1", 77
)
CHANNEL_DRIFT = data.ChannelDrift("x", 3, 0.25, 1000, 1.5, 0.5, 0.2, 0.01, 400)
DRIFT_SCOPE = data.DriftScope("d1", 12, 0.25, "drifted", (CHANNEL_DRIFT,))
ROOT = trust.RootKey(2, b"p" * 32)
STATUS = fleet.ModelStatus("m", 2, "ef" * 32, 1, 2, fleet.ModelPhase.READY, "", "CPU")
REPORTED = fleet.ReportedState("d1", 7, (STATUS,), CAPS, "", {"site": "a"}, "1.2.3.4:8001", 5.0)
PROGRESS = jobs.JobProgress("training", 2, 10, 0.5, 0.9, 0.8, 12.0, 1, 2, "")
TRIAL = jobs.Trial(1, {"lr": "0.1"}, 0.8, 5, 1.25, True, "", 0.31, 3, 0.75, 0.85)
OUTCOME = jobs.TargetOutcome("onnx-cpu-int8", "refused", "lost 2 points", {"accuracy": 0.9})

# (an instance of every domain type, the message it travels as)
GATE = rollouts.Gate("p95_latency_ms", "<", 0.2, relative=True)
CHECK = rollouts.GateCheck("error_rate<0.5%", 0.001, 0.002, 0.005, True, True, "ok")
SPEC_R = rollouts.RolloutSpec(
    "m", 4, {"site": "a"}, (0.1, 1.0), 60.0, 0.05, (GATE,), 300.0, rollouts.DeadlineAction.SKIP, "t"
)
WAVE = rollouts.Wave(1, 0.5, 3, rollouts.WaveState.BAKING, 1.0, 2.0, 3.0, 4.0, 5.0, (CHECK,))
MEMBER = rollouts.RolloutDevice("d1", 1, 3, rollouts.DevicePhase.ROLLED_BACK, "e")
ROLLOUT = rollouts.Rollout(
    "r-1", SPEC_R, rollouts.RolloutState.ABORTED, 1.0, 2.0, 1, (WAVE,), (MEMBER,), "why"
)

LOOP_CONFIG = loop.LoopConfig(
    "m", "captures:m", False, True, 30, 0.25, 0.02, 60.0, (0.1, 1.0), ("error_rate<1%",), 90.0,
    {"site": "a"}, 5.0,
)  # fmt: skip
TRIGGER = loop.LoopTrigger("drift", 2, "d1", "x", 3, 0.7, 0.2, 9.0)
SCORE = loop.HoldoutScore(2, 0.9, 50, 45, 0.78, 0.96)
LOOP_RUN = loop.LoopRun(
    "m", 3, loop.RunState.ROLLED_OUT, TRIGGER, 1.0, 2.0, 3.0, 2, 100, 80, 40, 60, 20, 1234,
    "job-7", 3, SCORE, dataclasses.replace(SCORE, version=3), "promote", "r-2", "better",
)  # fmt: skip

PAIRS: list[tuple[object, type[Message]]] = [
    (LOOP_CONFIG, loop_pb2.LoopConfig),
    (TRIGGER, loop_pb2.LoopTrigger),
    (SCORE, loop_pb2.HoldoutScore),
    (LOOP_RUN, loop_pb2.LoopRun),
    (loop.Loop(LOOP_CONFIG, (LOOP_RUN,), "noted"), loop_pb2.Loop),
    (GATE, rollout_pb2.Gate),
    (CHECK, rollout_pb2.GateCheck),
    (SPEC_R, rollout_pb2.RolloutSpec),
    (WAVE, rollout_pb2.Wave),
    (MEMBER, rollout_pb2.RolloutDevice),
    (ROLLOUT, rollout_pb2.Rollout),
    (SPEC, artifact_pb2.TensorSpec),
    (SPEC, oip.ModelMetadataResponse.TensorMetadata),
    (versions.Model("m", "d", 1, 2, 2), admin_pb2.Model),
    (ARTIFACT, admin_pb2.Artifact),
    (LINEAGE, admin_pb2.Lineage),
    (EVALUATION, admin_pb2.Evaluation),
    (versions.EpochRecord(2, 0.5, 0.75, 0.625, 0.7, 0.001), admin_pb2.EpochRecord),
    (
        versions.Evaluation(
            0.5,
            4,
            history=(
                versions.EpochRecord(1, 1.5, 0.25, 1.25, 0.5),
                versions.EpochRecord(2, 1.0, 0.5, 1.0, 0.5, 3e-3),
            ),
        ),
        admin_pb2.Evaluation,
    ),
    (VERSION, admin_pb2.ModelVersion),
    (CAPS, fleet_pb2.Capabilities),
    (DESIRED, fleet_pb2.DesiredState),
    (VARIANT, fleet_pb2.Variant),
    (fleet.TrafficVariant(3, 0.25, False), admin_pb2.TrafficVariant),
    (STATUS, fleet_pb2.ModelStatus),
    (REPORTED, fleet_pb2.ReportedState),
    (
        fleet.Enrollment(
            "d1",
            "dev_x",
            b"-----CERT-----",
            7443,
            fleet.MqttAccess("mqtts://broker:8883", "d1", "mqtt_x"),
        ),
        fleet_pb2.EnrollResponse,
    ),
    (fleet.Enrollment("d1", "dev_x"), fleet_pb2.EnrollResponse),
    (fleet.MqttAccess("mqtt://broker:1883", "d1", "mqtt_x"), fleet_pb2.MqttAccess),
    (
        fleet.Device(
            "d1", {"site": "a"}, CAPS, True, 1700000000.0, 1699999999, DESIRED, REPORTED, True
        ),
        admin_pb2.Device,
    ),
    (fleet.Deployment("m", {"site": "a"}, 3, "onnx-cpu-int8", 12.5, True), admin_pb2.Deployment),
    (ROOT, fleet_pb2.RootKey),
    (
        trust.TrustChain(ROOT, (trust.KeyRotation(b"new", b"s" * 64, b"t" * 64),)),
        fleet_pb2.TrustChain,
    ),
    (trust.SignedDesiredState(b"state", b"s" * 64, "abcd"), fleet_pb2.SignedDesiredState),
    (
        tokens.EnrollToken("t1", 1.0, 2.0, "n", 3, 1, {"site": "a"}, True, "d1"),
        admin_pb2.EnrollToken,
    ),
    (tokens.AdminToken("t2", "ci", tokens.Role.OPERATOR, 3.0, True), admin_pb2.AdminToken),
    (BASELINED, admin_pb2.ModelVersion),
    (POLICY, data_pb2.CapturePolicy),
    (BINS[0], data_pb2.InputBins),
    (CAPTURE, data_pb2.Capture),
    (LATENCY, data_pb2.LatencyHistogram),
    (CHANNEL, data_pb2.ChannelStats),
    (INPUT_STATS, data_pb2.InputStats),
    (WINDOW, data_pb2.ModelWindow),
    (DEVICE_WINDOW, data_pb2.DeviceWindow),
    (data.TelemetryRecord(3, model=WINDOW, device_id="d1"), data_pb2.TelemetryRecord),
    (data.TelemetryRecord(4, device=DEVICE_WINDOW), data_pb2.TelemetryRecord),
    (data.SyncAck(3, 5, 7, 1), data_pb2.SyncAck),
    (
        data.DataSet(
            "captures:m", "m", 10, 4, 2048, 2, 1.0, 2.0, (data.VersionRows(1, 10),), {"cat": 4}
        ),
        admin_pb2.DataSet,
    ),
    (data.CaptureLabel(77, "dog"), admin_pb2.CaptureLabel),
    (CHANNEL_DRIFT, admin_pb2.ChannelDrift),
    (DRIFT_SCOPE, admin_pb2.DriftScope),
    (data.VersionDrift("m", 2, DRIFT_SCOPE, (DRIFT_SCOPE,)), admin_pb2.VersionDrift),
    (
        data.DriftReport("m", 1.0, 2.0, 0.2, (data.VersionDrift("m", 2, DRIFT_SCOPE),)),
        admin_pb2.DriftReport,
    ),
    (
        data.VersionTelemetry(
            "m",
            2,
            "onnx-cpu-fp32",
            3,
            100,
            2,
            60.0,
            1.0,
            2.0,
            3.0,
            LATENCY,
            (INPUT_STATS,),
            1.5,
            20.0,
            7,
            90,
            81,
            1,
        ),
        admin_pb2.VersionTelemetry,
    ),
    (PROGRESS, jobs_pb2.JobProgress),
    (TRIAL, jobs_pb2.Trial),
    (OUTCOME, jobs_pb2.TargetOutcome),
    (
        jobs.Job(
            "job-1",
            "finetune",
            "m",
            '{"a": 1}',
            jobs.JobState.SUCCEEDED,
            1.0,
            2.0,
            3.0,
            "cpu",
            PROGRESS,
            "",
            2,
            (TRIAL,),
            (OUTCOME,),
            "job-0",
        ),
        jobs_pb2.Job,
    ),
    (
        jobs.JobEvent("job-1", 3, 1.5, "progress", "x", PROGRESS, jobs.JobState.RUNNING),
        jobs_pb2.JobEvent,
    ),
]


def _names(obj: object) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


@pytest.mark.parametrize(("obj", "message"), PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_type_and_message_have_the_same_fields(obj: object, message: type[Message]) -> None:
    wire = {f.name for f in message.DESCRIPTOR.fields}
    assert _names(obj) == wire, (
        f"{type(obj).__name__} and {message.DESCRIPTOR.full_name} differ: only in the type "
        f"{sorted(_names(obj) - wire)}, only in the message {sorted(wire - _names(obj))}"
    )


@pytest.mark.parametrize(("obj", "message"), PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_round_trip_through_the_message(obj: object, message: type[Message]) -> None:
    sent = to_proto(obj, message)
    back = from_proto(message.FromString(sent.SerializeToString()), type(obj))
    assert back == obj


@pytest.mark.parametrize(("obj", "message"), PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_round_trip_through_json(obj: object, message: type[Message]) -> None:
    assert from_json(type(obj), to_json(obj)) == obj


def test_absent_optional_message_stays_none() -> None:
    bare = dataclasses.replace(VERSION, lineage=None, evaluation=None, test=None)
    back = from_proto(to_proto(bare, admin_pb2.ModelVersion), versions.ModelVersion)
    assert back.lineage is None and back.evaluation is None and back.test is None


def test_deployment_round_trip() -> None:
    deployment = fleet.Deployment("m", {"site": "a"}, 3, "onnx-cpu-int8", 12.5)
    message = to_proto(deployment, admin_pb2.Deployment)
    assert from_proto(message, fleet.Deployment) == deployment
    assert {f.name for f in admin_pb2.Deployment.DESCRIPTOR.fields} == _names(deployment)


@pytest.mark.parametrize(
    ("enum", "proto_enum", "prefix"),
    [
        (fleet.ModelPhase, fleet_pb2.ModelPhase, "MODEL_PHASE_"),
        (jobs.JobState, jobs_pb2.JobState, "JOB_STATE_"),
        (rollouts.RolloutState, rollout_pb2.RolloutState, "ROLLOUT_STATE_"),
        (rollouts.WaveState, rollout_pb2.WaveState, "WAVE_STATE_"),
        (rollouts.DevicePhase, rollout_pb2.DevicePhase, "DEVICE_PHASE_"),
        (rollouts.DeadlineAction, rollout_pb2.DeadlineAction, "DEADLINE_ACTION_"),
        (loop.RunState, loop_pb2.RunState, "RUN_STATE_"),
    ],
)
def test_wire_enums_follow_their_proto_enum(enum: Any, proto_enum: Any, prefix: str) -> None:
    """A member travels as its position: the domain enum must list the proto's values in
    number order under the same names, or a device would report the wrong phase."""
    wire = {v.number: v.name.removeprefix(prefix) for v in proto_enum.DESCRIPTOR.values}
    assert {m.number: m.name for m in enum} == wire
