"""`edgefleet devices` says which target each device runs and why, against a real cloud on
loopback: enrolled over gRPC with its CPU's features, deployed with `edgefleet deploy`."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from click.testing import CliRunner

from cloudsvc.server import CloudServer
from compilers.build import Build
from edgefleet.cli import cli
from edgefleet.core.fleet import Capabilities, CpuFeatures
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from tests.cloudsvc.conftest import ADMIN_TOKEN, ENROLL_TOKEN

CPU = ("CPUExecutionProvider",)


def test_devices_show_each_devices_target_and_why(
    cloud: CloudServer, channel: grpc.Channel, model_path: Path
) -> None:
    cloud.registry.push("clf", model_path)
    cloud.registry.add_target(
        "clf",
        1,
        Build(
            "onnx-cpu-int8",
            model_path.parent,
            (model_path.name,),
            metrics={"latency_p50_ms": 0.4, "accuracy": 0.95, "accuracy_drop": 0.002},
        ),
    )
    agent = fleet_pb2_grpc.AgentServiceStub(channel)
    for device_id, features in (("edge-vnni", ("avx512_vnni",)), ("edge-old", ())):
        caps = Capabilities("x86_64", execution_providers=CPU, cpu_features=CpuFeatures(features))
        agent.Enroll(
            fleet_pb2.EnrollRequest(
                enroll_token=ENROLL_TOKEN,
                device_id=device_id,
                capabilities=to_proto(caps, fleet_pb2.Capabilities),
            )
        )
    env = {
        "EDGEFLEET_CLOUD": cloud.address,
        "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
        "COLUMNS": "250",
    }
    runner = CliRunner()
    deployed = runner.invoke(cli, ["deploy", "clf", "--version", "1"], env=env)
    assert deployed.exit_code == 0, deployed.output

    listed = runner.invoke(cli, ["devices", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    rows = {d["device_id"]: d for d in json.loads(listed.output)}
    fast = rows["edge-vnni"]["desired"]["assignments"][0]
    assert fast["target"] == "onnx-cpu-int8"
    assert fast["target_reason"].startswith("CPU has avx512_vnni")
    assert "passed the accuracy gate (accuracy 95.00%, -0.20 pts)" in fast["target_reason"]
    assert rows["edge-vnni"]["capabilities"]["cpu_features"] == {"int8": ["avx512_vnni"]}
    old = rows["edge-old"]["desired"]["assignments"][0]
    assert old["target"] == "onnx-cpu-fp32"
    assert old["target_reason"] == "CPU has no VNNI/dotprod: INT8 would be slower"

    table = runner.invoke(cli, ["devices"], env=env)
    assert table.exit_code == 0, table.output
    assert "target (why)" in table.output
    assert "clf: onnx-cpu-fp32 (CPU has no VNNI/dotprod: INT8 would be slower)" in table.output
    assert "clf: onnx-cpu-int8 (CPU has avx512_vnni;" in table.output
    print(table.output)
