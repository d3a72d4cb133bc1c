"""The daemon wired for real: inference server on loopback port 0, reconcile loop, restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from agent.daemon import Agent, advertised_endpoint
from agent.settings import AgentSettings
from edgefleet.core.tensors import to_raw
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.fakes import WIDTH, FakeCloud, build_artifact


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def infer(port: int, model: str = "m") -> float:
    x = np.zeros((1, WIDTH), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[to_raw(x)])
    request.inputs.add(name="x", datatype="FP32", shape=[1, WIDTH])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    return float(y[0])


def test_agent_converges_serves_and_restarts_offline(
    settings: AgentSettings, cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.assign(build_artifact(tmp_path, cloud.key, "m", 1))
    agent = Agent(settings, link=cloud)
    agent.start()
    try:
        wait_for(lambda: agent.repository.names() == ["m"])
        assert infer(agent.inference_port) == 1.0
        cloud.assign(build_artifact(tmp_path, cloud.key, "m", 2))  # the watch wakes the loop
        wait_for(lambda: agent.repository.default_version("m") == 2)
        assert infer(agent.inference_port) == 2.0
        wait_for(lambda: any(r.observed_generation == 2 for r in cloud.reports))
    finally:
        agent.stop()
    cloud.down = True
    again = Agent(settings, link=cloud)
    again.start()
    try:
        assert infer(again.inference_port) == 2.0  # served from disk with the cloud down
    finally:
        again.stop()


def test_advertised_endpoint() -> None:
    s = AgentSettings(cloud="127.0.0.1:7000", inference_host="0.0.0.0")
    assert advertised_endpoint(s, 8001) == "127.0.0.1:8001"
    s = AgentSettings(cloud="127.0.0.1:7000", advertise_address="edge-7:9000")
    assert advertised_endpoint(s, 8001) == "edge-7:9000"


def test_against_the_real_cloud_service_over_tls(tmp_path: Path) -> None:
    from cloudsvc.server import serve
    from cloudsvc.settings import CloudSettings
    from edgefleet.client import AdminClient
    from tests.agent.fakes import inline_golden, model_bytes

    cloud = serve(
        CloudSettings.model_validate({"data_dir": tmp_path / "cloud", "port": 0, "chunk_size": 256})
    )
    trust = cloud.trust_dir
    admin = AdminClient(
        cloud.address, token_file=tmp_path / "cloud" / "admin-token", ca_file=trust / "ca.pem"
    )
    secret, _ = admin.create_enroll_token(labels={"site": "lab"}, max_uses=1)
    token_file = tmp_path / "enroll-token"
    token_file.write_text(secret)
    settings = AgentSettings(
        cloud=cloud.address,
        ca_file=trust / "ca.pem",
        root_key=(trust / "root-key.txt").read_text(),
        enroll_token_file=token_file,
        device_id="edge-1",
        data_dir=tmp_path / "agent",
        providers=["CPUExecutionProvider"],
        inference_host="127.0.0.1",
        inference_port=0,
        resync_interval_s=1,
        report_interval_s=0.5,
        backoff_base_s=0.05,
        backoff_cap_s=0.5,
        min_free_disk_bytes=0,
    )
    agent = Agent(settings)
    try:
        agent.start()
        wait_for(lambda: any(d.device_id == "edge-1" for d in admin.devices()))
        for version in (1, 2):
            path = tmp_path / f"m{version}.onnx"
            path.write_bytes(model_bytes(float(version)))
            pushed = admin.push_model("m", path, golden_samples=[inline_golden(float(version))])
            assert pushed.version == version
            admin.deploy("m", version, selector={"site": "lab"})
            admin.wait_converged("m", version, ["edge-1"], timeout=60)
            assert infer(agent.inference_port) == float(version)
        (device,) = admin.devices()
        assert device.converged and device.labels == {"site": "lab"}
    finally:
        admin.close()
        agent.stop()
        cloud.stop(grace=1.0)
