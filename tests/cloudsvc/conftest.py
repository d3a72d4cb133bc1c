"""Fixtures wired like production: settings -> stores -> registry, fleet -> real gRPC server
on a free loopback port -> generated stubs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cloudsvc.fleet import Fleet
from cloudsvc.registry import Registry
from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings
from cloudsvc.signing import ManifestSigner
from cloudsvc.store.blobs import MemoryBlobStore
from cloudsvc.store.memory import MemoryMetadataStore
from edgefleet.core.auth import bearer_metadata
from protos.admin.v1 import admin_pb2_grpc
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
def signer() -> ManifestSigner:
    return _new_signer()


def _new_signer() -> ManifestSigner:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return ManifestSigner(Ed25519PrivateKey.generate())


@pytest.fixture
def registry(signer: ManifestSigner) -> Registry:
    return Registry(MemoryMetadataStore(), MemoryBlobStore(), signer, chunk_size=64)


@pytest.fixture
def fleet(registry: Registry, signer: ManifestSigner) -> Fleet:
    return Fleet(
        registry.metadata,
        registry,
        trusted_keys=signer.trusted_public_keys,
        static_enroll_tokens=[ENROLL_TOKEN],
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
        max_workers=10,  # 2 watch streams at most
    )


@pytest.fixture
def cloud(settings: CloudSettings) -> Iterator[CloudServer]:
    server = serve(settings)
    yield server
    server.stop(grace=1.0)


@pytest.fixture
def channel(cloud: CloudServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cloud.address) as ch:
        yield ch


@pytest.fixture
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
def agent(channel: grpc.Channel) -> fleet_pb2_grpc.AgentServiceStub:
    return fleet_pb2_grpc.AgentServiceStub(channel)


ADMIN = bearer_metadata(ADMIN_TOKEN)


def enroll(
    agent: fleet_pb2_grpc.AgentServiceStub, device_id: str = "", **labels: str
) -> fleet_pb2.EnrollResponse:
    response: fleet_pb2.EnrollResponse = agent.Enroll(
        fleet_pb2.EnrollRequest(enroll_token=ENROLL_TOKEN, device_id=device_id, labels=labels)
    )
    return response
