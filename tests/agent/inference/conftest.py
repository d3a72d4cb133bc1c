"""Small real ONNX models (built with onnx.helper) and a real inference server on port 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx
import pytest
from onnx import TensorProto, helper

from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import LoadedModel, ModelRepository, SessionOptions, load_model
from edgefleet.client.inference import InferenceClient
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

ONE_THREAD = SessionOptions(
    providers=("CPUExecutionProvider",), intra_op_threads=1, inter_op_threads=1
)

# OIP datatype -> ONNX element type, for the identity models that carry each type.
IDENTITY_TYPES = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def affine_model(path: Path, scale: float) -> Path:
    """x: FP32[N,4], b: FP32[4] -> y = x*scale + b (FP32[N,4]), total = sum(y, axis 1) (FP32[N])."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"])
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Add", ["xs", "b"], ["y"]),
        helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0),
    ]
    return _save(helper.make_graph(nodes, "affine", [x, b], [y, total], inits), path)


def identity_model(path: Path, elem_type: int) -> Path:
    """in: T[N] -> out: T[N]."""
    i = helper.make_tensor_value_info("in", elem_type, ["N"])
    o = helper.make_tensor_value_info("out", elem_type, ["N"])
    graph = helper.make_graph([helper.make_node("Identity", ["in"], ["out"])], "id", [i], [o])
    return _save(graph, path)


def load(name: str, version: int, path: Path) -> LoadedModel:
    return load_model(name, version, f"sha256:{name}-{version}", path, ONE_THREAD)


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="package")
def affine_v1(model_dir: Path) -> LoadedModel:
    return load("affine", 1, affine_model(model_dir / "affine1.onnx", 2.0))


@pytest.fixture(scope="package")
def affine_v2(model_dir: Path) -> LoadedModel:
    return load("affine", 2, affine_model(model_dir / "affine2.onnx", 3.0))


@pytest.fixture(scope="package")
def identities(model_dir: Path) -> dict[str, LoadedModel]:
    return {
        dt: load(f"id-{dt.lower()}", 1, identity_model(model_dir / f"id-{dt}.onnx", et))
        for dt, et in IDENTITY_TYPES.items()
    }


@pytest.fixture(scope="package")
def repository(
    affine_v1: LoadedModel, affine_v2: LoadedModel, identities: dict[str, LoadedModel]
) -> ModelRepository:
    repo = ModelRepository()
    repo.publish(affine_v1)
    repo.publish(affine_v2, keep=[1])  # version 2 is the default; 1 stays addressable
    for model in identities.values():
        repo.publish(model)
    return repo


# Small enough that a 2 x 64 KiB request is refused; everything else in the tests fits.
MAX_MESSAGE = 64 << 10


@pytest.fixture(scope="package")
def server(repository: ModelRepository) -> Iterator[InferenceServer]:
    srv = start_inference_server(
        repository, "127.0.0.1", 0, max_workers=4, max_message_bytes=MAX_MESSAGE
    )
    yield srv
    srv.stop(None)


@pytest.fixture(scope="package")
def address(server: InferenceServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="package")
def stub(address: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(address)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="package")
def client(address: str) -> Iterator[InferenceClient]:
    with InferenceClient(address, timeout=10.0) as c:
        yield c
