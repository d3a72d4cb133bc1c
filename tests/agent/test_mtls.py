"""Mutual TLS: with a device port, each device gets a client certificate at enrollment (its
own key; a CSR the cloud's CA signs) and its calls must present it there. A stolen device
token is then useless without the device's key, and a certificate without its token too."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent.daemon import Agent
from agent.settings import AgentSettings
from agent.state import StateStore
from cloudsvc.server import serve
from cloudsvc.settings import CloudSettings
from edgefleet.client import AdminClient
from edgefleet.client.inference import InferenceClient
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.certs import common_name
from edgefleet.core.tls import ClientSecurity
from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from tests.agent.fakes import WIDTH, inline_golden, model_bytes


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_devices_call_with_their_own_certificate_and_nothing_else_works(tmp_path: Path) -> None:
    cloud = serve(
        CloudSettings.model_validate(
            {"data_dir": tmp_path / "cloud", "port": 0, "tls": {"device_port": 0}}
        )
    )
    trust = cloud.trust_dir
    ca = trust / "ca.pem"
    admin = AdminClient(cloud.address, token_file=tmp_path / "cloud" / "admin-token", ca_file=ca)
    agents: list[Agent] = []
    try:
        assert cloud.device_port and cloud.device_port != cloud.port
        for name in ("m1", "m2"):
            secret, _ = admin.create_enroll_token(labels={"site": "lab"}, max_uses=1)
            agent = Agent(
                AgentSettings(
                    cloud=cloud.address,
                    ca_file=ca,
                    root_key=(trust / "root-key.txt").read_text(),
                    enroll_token=secret,
                    device_id=name,
                    data_dir=tmp_path / name,
                    providers=["CPUExecutionProvider"],
                    inference_port=0,
                    report_interval_s=0.5,
                    backoff_cap_s=0.5,
                    min_free_disk_bytes=0,
                )
            )
            agent.start()
            agents.append(agent)
        wait_for(lambda: len(admin.devices()) == 2)
        path = tmp_path / "m.onnx"
        path.write_bytes(model_bytes(3.0))
        admin.push_model("m", path, golden_samples=[inline_golden(3.0)])
        admin.deploy("m", 1, selector={"site": "lab"})
        admin.wait_converged("m", 1, ["m1", "m2"], timeout=60)
        with InferenceClient(f"127.0.0.1:{agents[0].inference_port}") as client:
            out = client.infer("m", {"x": np.zeros((1, WIDTH), np.float32)})
        assert float(out.outputs["y"][0, 0]) == 3.0

        # Each device holds a certificate in its name, issued by the cloud's CA.
        def identity(name: str) -> tuple[str, bytes, bytes]:
            state = StateStore(tmp_path / name / "agent.db")
            try:
                found = state.identity()
            finally:
                state.close()
            assert found is not None and found.certificate and found.private_key
            assert common_name(found.certificate) == name
            return found.device_token, found.certificate, found.private_key

        token1, cert1, key1 = identity("m1")
        _, cert2, key2 = identity("m2")
        request = fleet_pb2.GetDesiredStateRequest()

        def call(port: int, token: str, cert: bytes = b"", key: bytes = b"") -> grpc.StatusCode:
            security = ClientSecurity(ca_file=ca, cert_pem=cert, key_pem=key)
            with security.channel(f"127.0.0.1:{port}") as channel:
                try:
                    fleet_pb2_grpc.AgentServiceStub(channel).GetDesiredState(
                        request, metadata=bearer_metadata(token), timeout=5
                    )
                except grpc.RpcError as err:
                    code: grpc.StatusCode = err.code()
                    return code
            return grpc.StatusCode.OK

        assert call(cloud.device_port, token1, cert1, key1) == grpc.StatusCode.OK
        # The token alone (stolen from a log, say), on either port: refused.
        assert call(cloud.port, token1) == grpc.StatusCode.UNAUTHENTICATED
        assert call(cloud.device_port, token1) == grpc.StatusCode.UNAVAILABLE  # no handshake
        # The token with another device's certificate and key: refused.
        assert call(cloud.device_port, token1, cert2, key2) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for agent in agents:
            agent.stop()
        admin.close()
        cloud.stop(grace=0.5)


def test_plain_text_and_a_ca_bundle_are_one_choice_or_the_other(tmp_path: Path) -> None:
    """Settings that ask for plain text and give a CA bundle are a mistake, said at start."""
    with pytest.raises(ValueError, match="contradict"):
        AgentSettings(cloud="127.0.0.1:1", insecure=True, ca_file=tmp_path / "ca.pem")
    plain = AgentSettings(cloud="127.0.0.1:1", insecure=True, data_dir=tmp_path)
    assert plain.cloud_security().insecure
