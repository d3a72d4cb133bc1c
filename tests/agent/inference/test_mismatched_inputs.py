"""Inputs that each pass their own checks but do not fit together: INVALID_ARGUMENT, not
INTERNAL, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import ModelRepository, SessionOptions, load_model
from edgefleet.client.inference import InferenceClient
from edgefleet.core.errors import EdgefleetError, ErrorCode


@pytest.fixture
def add_server(tmp_path: Path) -> Iterator[InferenceServer]:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N"])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N"])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "add.onnx"
    onnx.save(model, str(path))
    repo = ModelRepository()
    repo.publish(load_model("add", 1, "sha256:add", path, SessionOptions(intra_op_threads=1)))
    server = start_inference_server(repo, "127.0.0.1", 0)
    yield server
    server.stop(None)


def test_inputs_that_do_not_fit_together(add_server: InferenceServer) -> None:
    with InferenceClient(f"127.0.0.1:{add_server.port}") as client:
        with pytest.raises(EdgefleetError) as err:
            client.infer("add", {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)})
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert "cannot run on these inputs" in err.value.message
        ok = client.infer("add", {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)})
        np.testing.assert_array_equal(ok.outputs["c"], np.full(3, 2, np.float32))


def test_status_code_on_the_wire(add_server: InferenceServer) -> None:
    from protos.inference.v2 import grpc_predict_v2_pb2 as pb
    from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pbg

    with grpc.insecure_channel(f"127.0.0.1:{add_server.port}") as channel:
        request = pb.ModelInferRequest(model_name="add")
        for name, n in (("a", 2), ("b", 5)):
            request.inputs.add(name=name, datatype="FP32", shape=[n])
            request.raw_input_contents.append(np.zeros(n, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as err:
            pbg.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
