"""Class names reach clients: from the ONNX model's metadata_props (as the compiler writes
them) through ModelMetadata's "class_names" parameter, and Triton's classification extension
(an output asked for with `classification` = N answers BYTES "score:index:label")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import ModelRepository
from edgefleet.client.inference import InferenceClient
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.tensors import CLASS_NAMES_KEY
from tests.agent.inference.conftest import load

NAMES = ["cat", "dog", "bird", "fish"]


def scores_model(path: Path, names: list[str] | None) -> Path:
    """x: FP32[N,4] -> scores = x (FP32[N,4]), count = INT64[N] (not scores)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Identity", ["x"], ["scores"])]
    model = helper.make_model(
        helper.make_graph(nodes, "scores", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    if names is not None:
        helper.set_model_props(model, {CLASS_NAMES_KEY: json.dumps(names)})
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    folder = tmp_path_factory.mktemp("classes")
    repo = ModelRepository()
    repo.publish(load("animals", 1, scores_model(folder / "a.onnx", NAMES)))
    repo.publish(load("plain", 1, scores_model(folder / "p.onnx", None)))
    srv = start_inference_server(repo, "127.0.0.1", 0, max_workers=4)
    yield srv
    srv.stop(None)


@pytest.fixture(scope="module")
def client(server: InferenceServer) -> Iterator[InferenceClient]:
    with InferenceClient(f"127.0.0.1:{server.port}", timeout=10.0) as c:
        yield c


X = np.array([[0.1, 0.7, 0.05, 0.15], [0.5, 0.2, 0.2, 0.1]], np.float32)


def test_model_metadata_answers_class_names(client: InferenceClient) -> None:
    meta = client.metadata("animals")
    assert meta.class_names == tuple(NAMES)
    assert meta.platform == "onnxruntime_onnx"
    assert client.metadata("plain").class_names == ()
    assert "classification" in client.server_metadata()[2]


def test_top_n_as_score_index_label(client: InferenceClient) -> None:
    got = client.infer("animals", {"x": X}, outputs=["scores"], class_count=2).outputs["scores"]
    assert got.shape == (2, 2)
    assert [[v.decode() for v in row] for row in got] == [
        ["0.700000:1:dog", "0.150000:3:fish"],
        ["0.500000:0:cat", "0.200000:1:dog"],  # a tie keeps the lower index first
    ]
    plain = client.infer("plain", {"x": X}, outputs=["scores"], class_count=1).outputs["scores"]
    assert [v.decode() for v in plain[:, 0]] == ["0.700000:1:1", "0.500000:0:0"]


@pytest.mark.parametrize("count", [-1, 5])
def test_class_count_out_of_range_is_refused(client: InferenceClient, count: int) -> None:
    with pytest.raises(InvalidArgument, match=r"classification|classes"):
        client.infer("animals", {"x": X}, outputs=["scores"], class_count=count)


def test_classification_of_zero_or_not_an_integer_is_refused(client: InferenceClient) -> None:
    for setting in ("int64_param", "string_param"):
        request = client.prepare("animals", {"x": X}, outputs=["scores"], class_count=2)
        param = request.outputs[0].parameters["classification"]
        if setting == "int64_param":
            param.int64_param = 0
        else:
            param.string_param = "2"
        with pytest.raises(InvalidArgument, match="at least 1"):
            client.infer_prepared(request)


def test_tritons_class_count_gets_labels(server: InferenceServer) -> None:
    triton = pytest.importorskip("tritonclient.grpc")
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        x = triton.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(X)
        out = triton.InferRequestedOutput("scores", class_count=3)
        got = c.infer("animals", [x], outputs=[out]).as_numpy("scores")
        assert [v.decode() for v in got[0]] == [
            "0.700000:1:dog",
            "0.150000:3:fish",
            "0.100000:0:cat",
        ]
        meta = c.get_model_metadata("animals")  # Triton's client skips the added field
        assert meta.platform == "onnxruntime_onnx" and [o.name for o in meta.outputs] == ["scores"]
    finally:
        c.close()
