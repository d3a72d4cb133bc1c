"""The whole loop with real processes: push, deploy by selector, converge, infer, upgrade."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.core.errors import EdgefleetError, ErrorCode
from tests.integration.conftest import Fleet, Versions, running

pytestmark = pytest.mark.integration


def test_push_deploy_infer_and_upgrade(fleet: Fleet, models: Versions) -> None:
    fleet.start_agent("a1", {"site": "plant-1"})
    fleet.start_agent("a2", {"site": "plant-1"})
    fleet.start_agent("b1", {"site": "plant-2", "hw": "jetson"})
    devices = fleet.wait_for(lambda ds: len(ds) == 3, what="three enrolled devices")
    by_id = {d.device_id: d for d in devices}
    assert by_id["b1"].labels == {"site": "plant-2", "hw": "jetson"}
    caps = by_id["a1"].capabilities
    assert "CPUExecutionProvider" in caps.execution_providers
    assert caps.arch and caps.memory_bytes > 0

    v1 = fleet.admin.push_model("m", models.v1, description="first")
    assert v1.version == 1 and v1.golden_sample_count >= 1
    assert [s.name for s in v1.inputs] == ["x"] and v1.inputs[0].shape == (-1, 8)

    generations = fleet.admin.deploy("m", 1, selector={"site": "plant-1"})
    assert set(generations) == {"a1", "a2"}
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1, "a2": 1, "b1": 0}, what="plant-1 on v1")

    version, logits = fleet.infer("a1", models.x)
    assert version == 1
    np.testing.assert_allclose(logits, models.expected(1), rtol=1e-5, atol=1e-5)

    v2 = fleet.admin.push_model("m", models.v2, description="second", parent_version=1)
    assert v2.version == 2 and v2.parent_version == 1
    assert [v.version for v in fleet.admin.versions("m")] == [1, 2]
    fleet.admin.deploy("m", 2)  # empty selector: every device
    devices = fleet.wait_for(
        lambda ds: running(ds) == {"a1": 2, "a2": 2, "b1": 2} and all(d.converged for d in ds),
        what="every device on v2",
    )
    assert all(not d.last_error for d in devices)
    assert all(d.reported_generation == d.desired.generation for d in devices)

    for name in ("a1", "a2", "b1"):
        version, logits = fleet.infer(name, models.x)
        assert version == 2
        np.testing.assert_allclose(logits, models.expected(2), rtol=1e-5, atol=1e-5)
    # The previous version stays loaded for rollback and is addressable by version.
    version, logits = fleet.infer("a1", models.x, version=1)
    assert version == 1
    np.testing.assert_allclose(logits, models.expected(1), rtol=1e-5, atol=1e-5)

    # `edgefleet devices` says where each device answers inference, as a table and as JSON.
    env = {**os.environ, "EDGEFLEET_CLOUD": fleet.cloud.address, "COLUMNS": "250"}
    env["EDGEFLEET_ADMIN_TOKEN_FILE"] = str(fleet.trust.admin_token_file)
    env["EDGEFLEET_CA_FILE"] = str(fleet.trust.ca_file)
    table = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "devices"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert fleet.agents["a1"].address in table.stdout and "inference at" in table.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "devices", "--json"], env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    endpoints = {
        d["device_id"]: d["reported"]["inference_endpoint"] for d in json.loads(listed.stdout)
    }
    assert endpoints == {name: fleet.agents[name].address for name in ("a1", "a2", "b1")}
    standing = fleet.admin.deployments()
    assert [(d.model, dict(d.selector), d.version) for d in standing] == [
        ("m", {"site": "plant-1"}, 1),
        ("m", {}, 2),
    ]


def test_cli_lists_what_the_api_holds(fleet: Fleet, models: Versions) -> None:
    fleet.start_agent("a1", {"site": "plant-1"})
    env_args = fleet.admin_args

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "edgefleet.cli", *args, *env_args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},  # tables unwrapped, as on a wide terminal
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = cli("models", "push", "m", str(models.v1), "-d", "from the CLI")
    assert "pushed" in out and "v1" in out
    assert "m" in cli("models", "list")
    assert "from the CLI" in cli("models", "versions", "m")
    out = cli(
        "deploy", "m", "--version", "1", "--selector", "site=plant-1", "--wait", "--timeout", "60"
    )
    assert "1 device(s)" in out
    out = cli("devices")
    assert "a1" in out and "m v1" in out and "1 converged" in out


def test_admin_calls_need_the_admin_token(fleet: Fleet) -> None:
    from edgefleet.client import AdminClient

    with (
        AdminClient(fleet.cloud.address, "wrong-token", ca_file=fleet.trust.ca_file) as bad,
        pytest.raises(EdgefleetError) as err,
    ):
        bad.models()
    assert err.value.code is ErrorCode.UNAUTHENTICATED
    # and the service still answers the right token afterwards
    assert fleet.admin.models() == []


def test_unknown_model_or_selector_is_refused_clearly(fleet: Fleet, models: Versions) -> None:
    fleet.start_agent("a1", {"site": "plant-1"})
    with pytest.raises(EdgefleetError) as err:
        fleet.admin.deploy("nope", 1)
    assert err.value.code is ErrorCode.NOT_FOUND
    fleet.admin.push_model("m", models.v1)
    with pytest.raises(EdgefleetError) as err:
        fleet.admin.deploy("m", 7)
    assert err.value.code is ErrorCode.NOT_FOUND and "7" in err.value.message
    with pytest.raises(EdgefleetError) as err:
        fleet.admin.deploy("m", 1, selector={"site": "mars"})
    assert err.value.code is ErrorCode.FAILED_PRECONDITION


def test_agent_keeps_its_identity_across_restarts(fleet: Fleet, models: Versions) -> None:
    fleet.start_agent("a1", {"site": "plant-1"})
    fleet.wait_for(lambda ds: len(ds) == 1, what="enrollment")
    # A restart must not need the enrollment token again: the device credential persists.
    agent = fleet.agents["a1"]
    agent.stop()
    # The single-use token is spent; even gone, the restart does not need it.
    Path(agent.args[agent.args.index("--enroll-token-file") + 1]).unlink()
    agent.start().wait_ready(60)
    fleet.admin.push_model("m", models.v1)
    fleet.admin.deploy("m", 1)
    devices = fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, what="a1 on v1")
    assert [d.device_id for d in devices] == ["a1"]


def test_inference_port_answers_bad_requests_with_status_codes(
    fleet: Fleet, models: Versions
) -> None:
    from protos.inference.v2 import grpc_predict_v2_pb2 as pb
    from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pbg

    fleet.start_agent("a1")
    fleet.admin.push_model("m", models.v1)
    fleet.admin.deploy("m", 1)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, what="a1 on v1")
    with grpc.insecure_channel(fleet.agents["a1"].address) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)

        def infer(
            model: str = "m",
            version: int | None = None,
            name: str = "x",
            datatype: str = "FP32",
            shape: tuple[int, ...] = (1, 8),
            raw: bytes = np.ones((1, 8), np.float32).tobytes(),
        ) -> grpc.StatusCode:
            req = pb.ModelInferRequest(model_name=model, model_version=str(version or ""))
            req.inputs.add(name=name, datatype=datatype, shape=shape)
            req.raw_input_contents.append(raw)
            try:
                stub.ModelInfer(req, timeout=10)
            except grpc.RpcError as err:
                code: grpc.StatusCode = err.code()
                return code
            return grpc.StatusCode.OK

        assert infer() is grpc.StatusCode.OK
        assert infer(model="nope") is grpc.StatusCode.NOT_FOUND
        assert infer(version=9) is grpc.StatusCode.NOT_FOUND
        assert infer(datatype="INT64") is grpc.StatusCode.INVALID_ARGUMENT
        assert infer(shape=(1, 9)) is grpc.StatusCode.INVALID_ARGUMENT
        assert infer(raw=b"\x00" * 5) is grpc.StatusCode.INVALID_ARGUMENT
        assert infer(name="y") is grpc.StatusCode.INVALID_ARGUMENT
        assert infer() is grpc.StatusCode.OK  # still serving
        ready = stub.ModelReady(pb.ModelReadyRequest(name="m", version="1"), timeout=5)
        assert ready.ready
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=5)
        assert [i.name for i in meta.inputs] == ["x"] and list(meta.inputs[0].shape) == [-1, 8]
