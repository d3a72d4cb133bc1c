"""Fixtures wired like production: settings -> stores -> registry, fleet -> real gRPC server
on a free loopback port -> generated stubs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper

from cloudsvc.fleet import Fleet
from cloudsvc.registry import Registry
from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings
from cloudsvc.signing import RootKeys
from cloudsvc.store.blobs import MemoryBlobStore
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.tokens import Tokens
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.tls import ClientSecurity
from edgefleet.core.trust import TrustChain, follow_chain
from edgefleet.core.wire import from_proto
from protos.admin.v1 import admin_pb2, admin_pb2_grpc
from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

ENROLL_TOKEN = "enr_test-static-token"
ADMIN_TOKEN = "adm_test-admin-token"


def write_linear_model(path: Path, scale: float = 1.0, features: int = 4, classes: int = 3) -> Path:
    """A tiny classifier y = softmax(x @ W + b) with a dynamic batch dimension."""
    rng = np.random.default_rng(int(scale * 1000))
    w = (rng.standard_normal((features, classes)) * scale).astype(np.float32)
    b = np.linspace(-1, 1, classes, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_linear_model(tmp_path / "model.onnx")


@pytest.fixture
def keys() -> RootKeys:
    return RootKeys.generate()


@pytest.fixture
def registry(keys: RootKeys) -> Registry:
    return Registry(MemoryMetadataStore(), MemoryBlobStore(), keys, chunk_size=64)


@pytest.fixture
def fleet(registry: Registry, keys: RootKeys) -> Fleet:
    return Fleet(
        registry.metadata,
        registry,
        Tokens(registry.metadata, ADMIN_TOKEN),
        static_enroll_tokens=[ENROLL_TOKEN],
        keys=keys,
    )


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    return CloudSettings.load(
        None,
        data_dir=tmp_path / "cloud",
        port=0,
        admin_token=ADMIN_TOKEN,
        enroll_tokens=[ENROLL_TOKEN],
        max_upload_bytes=64 << 10,
        chunk_size=1024,
        max_workers=11,  # 3 stream threads: 2 for device watches, 1 for anonymous ones
    )


@pytest.fixture
def cloud(settings: CloudSettings) -> Iterator[CloudServer]:
    server = serve(settings)
    yield server
    server.stop(grace=1.0)


@pytest.fixture
def run(cloud: CloudServer) -> Callable[..., Result]:
    """`edgefleet ...` as a user types it, against this cloud (its address, CA and admin
    token from the environment, as the README says); exceptions surface as failures."""
    runner = CliRunner()
    env = {
        "EDGEFLEET_CLOUD": cloud.address,
        "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
        "COLUMNS": "200",
    }

    def invoke(*args: str) -> Result:
        from edgefleet.cli import cli

        return runner.invoke(cli, list(args), env=env, catch_exceptions=False)

    return invoke


def secure_channel(cloud: CloudServer) -> grpc.Channel:
    """A channel that verifies the cloud against the CA bundle it published: TLS, as every
    client of a cloud without --insecure."""
    return ClientSecurity(ca_file=cloud.trust_dir / "ca.pem").channel(cloud.address)


@pytest.fixture
def channel(cloud: CloudServer) -> Iterator[grpc.Channel]:
    with secure_channel(cloud) as ch:
        yield ch


@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
def agent(channel: grpc.Channel) -> fleet_pb2_grpc.AgentServiceStub:
    return fleet_pb2_grpc.AgentServiceStub(channel)


ADMIN = bearer_metadata(ADMIN_TOKEN)


def enroll(channel: grpc.Channel, device_id: str = "", **labels: str) -> fleet_pb2.EnrollResponse:
    """Enroll a device; with `labels`, through a token that grants them (labels are the
    operator's), else with the fixture's fleet-wide token."""
    token = ENROLL_TOKEN
    if labels:
        created = admin_pb2_grpc.AdminServiceStub(channel).CreateEnrollToken(
            admin_pb2.CreateEnrollTokenRequest(labels=labels, max_uses=1), metadata=ADMIN
        )
        token = created.enroll_token
    response: fleet_pb2.EnrollResponse = fleet_pb2_grpc.AgentServiceStub(channel).Enroll(
        fleet_pb2.EnrollRequest(enroll_token=token, device_id=device_id)
    )
    return response


def desired_of(signed: fleet_pb2.SignedDesiredState) -> fleet_pb2.DesiredState:
    """The desired state inside a signed one (tests that check signatures do so apart)."""
    return fleet_pb2.DesiredState.FromString(signed.state)


def trusted_keys(cloud: CloudServer, agent: fleet_pb2_grpc.AgentServiceStub) -> list[bytes]:
    """What a device provisioned with the cloud's root-key.txt trusts: the cloud's chain,
    followed from that fingerprint."""
    pin = (cloud.trust_dir / "root-key.txt").read_text().strip()
    chain = from_proto(agent.GetTrust(fleet_pb2.GetTrustRequest()), TrustChain)
    return [key.public_key for key in follow_chain(chain, pin)]
