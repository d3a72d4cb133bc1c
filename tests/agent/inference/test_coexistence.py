"""The agent's inference server beside other Open Inference Protocol libraries: Triton's
client in the same process (its `inference.*` messages used to clash with ours:
kserve#3099, MLServer#1730), every parameter a client may send either honoured or refused,
and bytes that are no message answered INVALID_ARGUMENT."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgefleet.client.inference import InferenceClient
from edgefleet.core.errors import InvalidArgument
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

tritonclient_grpc = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] (dev extra) is not installed"
)

REPO = Path(__file__).resolve().parents[3]


def test_tritons_client_and_ours_in_one_process_against_a_live_server(
    address: str, client: InferenceClient
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones(4, dtype=np.float32)
    triton = tritonclient_grpc.InferenceServerClient(address)
    try:
        assert triton.is_server_live() and triton.is_model_ready("affine", "2")
        inputs = [
            tritonclient_grpc.InferInput("x", [2, 4], "FP32"),
            tritonclient_grpc.InferInput("b", [4], "FP32"),
        ]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(b)
        theirs = triton.infer("affine", inputs, model_version="1").as_numpy("y")
        meta = triton.get_model_metadata("affine")
        assert [i.name for i in meta.inputs] == ["x", "b"]
    finally:
        triton.close()
    ours = client.infer("affine", {"x": x, "b": b}, version=1).outputs["y"]
    np.testing.assert_array_equal(theirs, ours)
    np.testing.assert_allclose(ours, x * 2.0 + b)


def test_triton_imported_first_in_a_fresh_process(tmp_path: Path) -> None:
    """The order that broke before: tritonclient's descriptors registered first."""
    script = textwrap.dedent(
        """
        import tritonclient.grpc as triton
        import numpy as np
        from agent.inference.server import start_inference_server
        from agent.runtime import ModelRepository, SessionOptions, load_model
        from edgefleet.client import InferenceClient
        from tests.agent.inference.conftest import affine_model

        path = affine_model(__import__("pathlib").Path(TMP) / "a.onnx", 2.0)
        repo = ModelRepository()
        repo.publish(load_model("affine", 1, "d", path, SessionOptions(intra_op_threads=1)))
        server = start_inference_server(repo, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.port}"
        x, b = np.ones((1, 4), np.float32), np.zeros(4, np.float32)
        with InferenceClient(address) as ours:
            mine = ours.infer("affine", {"x": x, "b": b}).outputs["y"]
        c = triton.InferenceServerClient(address)
        inputs = [triton.InferInput("x", [1, 4], "FP32"), triton.InferInput("b", [4], "FP32")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(b)
        theirs = c.infer("affine", inputs).as_numpy("y")
        assert (mine == theirs).all() and (mine == 2.0).all()
        server.stop(None)
        print("both clients agree")
        """
    ).replace("TMP", repr(str(tmp_path)))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "both clients agree" in done.stdout


def test_parameters_the_server_does_not_support_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    x = np.zeros((1, 4), np.float32).tobytes()
    b = np.zeros(4, np.float32).tobytes()

    def request() -> pb.ModelInferRequest:
        return pb.ModelInferRequest(
            model_name="affine",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4]),
                pb.ModelInferRequest.InferInputTensor(name="b", datatype="FP32", shape=[4]),
            ],
            raw_input_contents=[x, b],
        )

    stub.ModelInfer(request(), timeout=10)  # the plain request works
    with_double = request()
    with_double.parameters["temperature"].double_param = 0.5
    with_uint64 = request()
    with_uint64.parameters["sequence_id"].uint64_param = 7
    # Classification is served (test_classification.py); other output parameters are not.
    top_k = request()
    wanted = top_k.outputs.add(name="y")
    wanted.parameters["top_k"].int64_param = 3
    for sent in (with_double, with_uint64, top_k):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(sent, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not support" in (info.value.details() or "")


def test_tritons_classification_request_is_answered(address: str) -> None:
    """Triton's class_count: BYTES "score:index:label", the index as label without names."""
    triton = tritonclient_grpc.InferenceServerClient(address)
    try:
        inputs = [
            tritonclient_grpc.InferInput("x", [1, 4], "FP32"),
            tritonclient_grpc.InferInput("b", [4], "FP32"),
        ]
        inputs[0].set_data_from_numpy(np.array([[1, 4, 2, 3]], np.float32))
        inputs[1].set_data_from_numpy(np.zeros(4, np.float32))
        outputs = [tritonclient_grpc.InferRequestedOutput("y", class_count=2)]
        result = triton.infer("affine", inputs, outputs=outputs, model_version="1")
        got = result.as_numpy("y")
        assert got.shape == (1, 2)
        assert [v.decode() for v in got[0]] == ["8.000000:1:1", "6.000000:3:3"]
    finally:
        triton.close()


def test_undecodable_bytes_are_invalid_argument_without_a_traceback(
    address: str, client: InferenceClient, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(address) as channel, caplog.at_level(logging.WARNING):
        for method in ("ModelInfer", "ModelMetadata", "ServerLive"):
            call: Any = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\xff\x0f", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
    assert not [r for r in caplog.records if r.exc_info]
    assert client.live()  # and the server goes on serving


def test_unknown_model_name_is_bounded_not_found(client: InferenceClient) -> None:
    from edgefleet.core.errors import NotFound

    with pytest.raises(NotFound) as info:
        client.metadata("m" * 20_000)
    assert len(info.value.message) <= 1000
    with pytest.raises(InvalidArgument):
        client.infer("affine", {"x": np.zeros((1, 3), np.float32), "b": np.zeros(4, np.float32)})
