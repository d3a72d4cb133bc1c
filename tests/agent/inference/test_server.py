"""A real inference server on loopback port 0, called through the generated stub and the client."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import edgefleet
from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import LoadedModel, ModelRepository
from edgefleet.client.inference import InferenceClient
from edgefleet.core.errors import EdgefleetError, ErrorCode
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

from .conftest import MAX_MESSAGE

Input = pb.ModelInferRequest.InferInputTensor
X = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.array([1, 2, 3, 4], dtype=np.float32)


def affine_request(**overrides: object) -> pb.ModelInferRequest:
    fields: dict[str, object] = {
        "model_name": "affine",
        "inputs": [
            Input(name="x", datatype="FP32", shape=[2, 4]),
            Input(name="b", datatype="FP32", shape=[4]),
        ],
        "raw_input_contents": [X.tobytes(), B.tobytes()],
    }
    fields.update(overrides)
    return pb.ModelInferRequest(**fields)  # type: ignore[arg-type]


def test_live_ready_and_server_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "edgefleet-agent"
    assert meta.version == edgefleet.__version__


def test_model_ready_by_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name="affine")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="affine", version="1")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="affine", version="2")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="affine", version="3")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready


def test_model_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="affine"))
    assert meta.name == "affine"
    assert list(meta.versions) == ["1", "2"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("x", "FP32", [-1, 4]),
        ("b", "FP32", [4]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("y", "FP32", [-1, 4]),
        ("total", "FP32", [-1]),
    ]


def test_raw_infer_through_stub(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(affine_request(id="abc"))
    assert (response.model_name, response.model_version, response.id) == ("affine", "2", "abc")
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_allclose(y, X * 3 + B)


def test_typed_infer_through_stub(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(
        model_name="affine",
        model_version="1",
        inputs=[
            Input(
                name="x",
                datatype="FP32",
                shape=[2, 4],
                contents=pb.InferTensorContents(fp32_contents=X.ravel().tolist()),
            ),
            Input(
                name="b",
                datatype="FP32",
                shape=[4],
                contents=pb.InferTensorContents(fp32_contents=B.tolist()),
            ),
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="total")],
    )
    response = stub.ModelInfer(request)
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 0
    assert [o.name for o in response.outputs] == ["total"]
    np.testing.assert_allclose(response.outputs[0].contents.fp32_contents, (X * 2 + B).sum(1))


TYPED_VALUES: dict[str, tuple[str, list[object]]] = {
    "BOOL": ("bool_contents", [True, False, True]),
    "INT8": ("int_contents", [-128, 0, 127]),
    "INT32": ("int_contents", [-(2**31), 0, 2**31 - 1]),
    "INT64": ("int64_contents", [-(2**63), 0, 2**63 - 1]),
    "UINT8": ("uint_contents", [0, 1, 255]),
    "UINT32": ("uint_contents", [0, 1, 2**32 - 1]),
    "UINT64": ("uint64_contents", [0, 1, 2**64 - 1]),
    "FP32": ("fp32_contents", [0.5, -1.25, 3.0]),
    "FP64": ("fp64_contents", [0.1, -1e300, 3.0]),
    "BYTES": ("bytes_contents", [b"a", b"", b"hello"]),
}


@pytest.mark.parametrize("datatype", sorted(TYPED_VALUES))
def test_typed_round_trip_of_every_type(
    stub: pb_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    field, values = TYPED_VALUES[datatype]
    contents = pb.InferTensorContents(**{field: values})  # type: ignore[arg-type]
    request = pb.ModelInferRequest(
        model_name=f"id-{datatype.lower()}",
        inputs=[Input(name="in", datatype=datatype, shape=[3], contents=contents)],
    )
    out = stub.ModelInfer(request).outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("out", datatype, [3])
    assert list(getattr(out.contents, field)) == values


@pytest.mark.parametrize("datatype", ["BOOL", "INT8", "UINT64", "FP16", "FP64", "INT64"])
def test_raw_round_trip_through_client(client: InferenceClient, datatype: str) -> None:
    from edgefleet.core.tensors import DATATYPE_TO_NUMPY

    array = np.array([1, 0, 1, 1], dtype=DATATYPE_TO_NUMPY[datatype])
    result = client.infer(f"id-{datatype.lower()}", {"in": array})
    assert result.outputs["out"].dtype == array.dtype
    np.testing.assert_array_equal(result.outputs["out"], array)


def test_bytes_round_trip_through_client(client: InferenceClient) -> None:
    words = np.array([b"edge", b"", b"fleet"], dtype=np.object_)
    result = client.infer("id-bytes", {"in": words})
    assert list(result.outputs["out"]) == [b"edge", b"", b"fleet"]


def test_client_infer_addresses_versions(client: InferenceClient) -> None:
    latest = client.infer("affine", {"x": X, "b": B})
    assert latest.model_version == "2"
    np.testing.assert_allclose(latest.outputs["y"], X * 3 + B)
    old = client.infer("affine", {"x": X, "b": B}, version=1, outputs=["total"])
    assert old.model_version == "1"
    assert set(old.outputs) == {"total"}
    np.testing.assert_allclose(old.outputs["total"], (X * 2 + B).sum(1))


def test_client_metadata_and_readiness(client: InferenceClient) -> None:
    assert client.live() and client.ready()
    assert client.model_ready("affine", 1)
    assert not client.model_ready("affine", 7)
    meta = client.metadata("affine", version=1)
    assert meta.versions == ("1", "2")
    assert [(t.name, t.shape) for t in meta.inputs] == [("x", (-1, 4)), ("b", (4,))]
    name, version, _ = client.server_metadata()
    assert (name, version) == ("edgefleet-agent", edgefleet.__version__)


def test_prepared_request_is_reusable(client: InferenceClient) -> None:
    request = client.prepare("affine", {"x": X, "b": B}, version=2)
    for k in range(3):
        request.raw_input_contents[0] = (X + k).tobytes()
        result = client.infer_prepared(request)
        np.testing.assert_allclose(result.outputs["y"], (X + k) * 3 + B)


def _bad_requests() -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, str]]:
    wrong_dtype = affine_request()
    wrong_dtype.inputs[0].datatype = "INT32"
    wrong_shape = affine_request()
    wrong_shape.inputs[0].shape[1] = 3
    short_raw = affine_request()
    short_raw.raw_input_contents[0] = b"\0" * 3
    both = affine_request()
    both.inputs[1].contents.fp32_contents.extend([1, 2, 3, 4])
    typed_count = pb.ModelInferRequest(
        model_name="id-int64",
        inputs=[
            Input(
                name="in",
                datatype="INT64",
                shape=[3],
                contents=pb.InferTensorContents(int64_contents=[1, 2]),
            )
        ],
    )
    dup = affine_request()
    dup.inputs[1].name = "x"
    return {
        "unknown model": (
            affine_request(model_name="resnet"),
            grpc.StatusCode.NOT_FOUND,
            "'resnet' is not served here",
        ),
        "unknown version": (
            affine_request(model_version="9"),
            grpc.StatusCode.NOT_FOUND,
            "no version 9 loaded (loaded: 1, 2)",
        ),
        "missing input": (
            affine_request(
                inputs=[Input(name="x", datatype="FP32", shape=[2, 4])],
                raw_input_contents=[X.tobytes()],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs input(s) 'b'",
        ),
        "unknown input": (
            affine_request(
                inputs=[
                    Input(name="x", datatype="FP32", shape=[2, 4]),
                    Input(name="bias", datatype="FP32", shape=[4]),
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no input named 'bias'",
        ),
        "duplicate input": (dup, grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
        "wrong datatype": (wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "takes FP32"),
        "wrong shape": (wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "dimension 1 must be 4"),
        "wrong raw size": (short_raw, grpc.StatusCode.INVALID_ARGUMENT, "needs 8 x 4 = 32 bytes"),
        "wrong typed count": (typed_count, grpc.StatusCode.INVALID_ARGUMENT, "needs 3"),
        "raw and typed": (both, grpc.StatusCode.INVALID_ARGUMENT, "send one or the other"),
        "raw count": (
            affine_request(raw_input_contents=[X.tobytes()]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "one raw_input_contents entry per input",
        ),
        "unknown output": (
            affine_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="z")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no output named 'z'",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_requests()))
def test_bad_request_gets_its_status_and_server_keeps_serving(
    stub: pb_grpc.GRPCInferenceServiceStub, case: str
) -> None:
    request, code, fragment = _bad_requests()[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == code
    assert fragment in (info.value.details() or "")
    assert stub.ModelInfer(affine_request()).model_version == "2"


def test_client_raises_edgefleet_errors(client: InferenceClient) -> None:
    with pytest.raises(EdgefleetError) as info:
        client.infer("affine", {"x": X.astype(np.float64), "b": B})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "takes FP32" in info.value.message
    with pytest.raises(EdgefleetError) as missing:
        client.metadata("resnet")
    assert missing.value.code is ErrorCode.NOT_FOUND


def test_oversized_request_is_resource_exhausted(
    stub: pb_grpc.GRPCInferenceServiceStub, client: InferenceClient
) -> None:
    rows = MAX_MESSAGE // 16 + 1  # one FP32[rows, 4] tensor larger than the limit
    big = np.zeros((rows, 4), np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(
            affine_request(
                inputs=[
                    Input(name="x", datatype="FP32", shape=[rows, 4]),
                    Input(name="b", datatype="FP32", shape=[4]),
                ],
                raw_input_contents=[big.tobytes(), B.tobytes()],
            )
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(EdgefleetError) as err:
        client.infer("affine", {"x": big, "b": B})
    assert err.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert client.infer("affine", {"x": X, "b": B}).model_version == "2"


def test_health_follows_serving_and_readiness(affine_v1: LoadedModel) -> None:
    repo = ModelRepository()
    server: InferenceServer = start_inference_server(repo, "127.0.0.1", 0, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            oip = pb_grpc.GRPCInferenceServiceStub(channel)

            def status(service: str = "") -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return int(health.Check(request).status)

            serving, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            assert oip.ServerLive(pb.ServerLiveRequest()).live
            assert not oip.ServerReady(pb.ServerReadyRequest()).ready  # nothing loaded yet
            assert status() == not_serving
            repo.publish(affine_v1)
            assert oip.ServerReady(pb.ServerReadyRequest()).ready
            assert status() == serving
            assert status("inference.GRPCInferenceService") == serving
            server.set_serving(False)  # draining: not ready, still answers inference
            assert not oip.ServerReady(pb.ServerReadyRequest()).ready
            assert status() == not_serving
            assert oip.ModelInfer(affine_request()).model_version == "1"
            server.set_serving(True)
            assert status() == serving
    finally:
        server.stop(0)


def test_port_in_use_is_a_clear_error(server: InferenceServer) -> None:
    with pytest.raises(EdgefleetError, match="choose another with --inference-port"):
        start_inference_server(ModelRepository(), "127.0.0.1", server.port)


def test_raw_bytes_layout_matches_protocol() -> None:
    from edgefleet.client.inference import encode_input

    tensor, data = encode_input("in", np.array(["ab", "c"], dtype=np.object_))
    assert tensor.datatype == "BYTES"
    assert data == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"
