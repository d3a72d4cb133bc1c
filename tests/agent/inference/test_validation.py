"""Request checks and conversions, without a server: every bad request names what to fix."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from agent.errors import InvalidRequest
from agent.inference.validation import ModelPlan, decode_request, encode_response, plan_for
from agent.runtime import LoadedModel
from protos.inference.v2 import grpc_predict_v2_pb2 as pb

Input = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor

X = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.array([1, 2, 3, 4], dtype=np.float32)


@pytest.fixture(scope="module")
def plan(affine_v1: LoadedModel) -> ModelPlan:
    return plan_for(affine_v1)


def raw_request(**overrides: object) -> pb.ModelInferRequest:
    fields: dict[str, object] = {
        "model_name": "affine",
        "id": "req-1",
        "inputs": [
            Input(name="x", datatype="FP32", shape=[2, 4]),
            Input(name="b", datatype="FP32", shape=[4]),
        ],
        "raw_input_contents": [X.tobytes(), B.tobytes()],
    }
    fields.update(overrides)
    return pb.ModelInferRequest(**fields)  # type: ignore[arg-type]


def typed_request() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="affine",
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
    )


def bad(plan: ModelPlan, request: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidRequest) as info:
        decode_request(plan, request)
    return str(info.value)


def test_raw_inputs_decode_without_copy(plan: ModelPlan) -> None:
    request = raw_request()
    decoded = decode_request(plan, request)
    np.testing.assert_array_equal(decoded.feeds["x"], X)
    np.testing.assert_array_equal(decoded.feeds["b"], B)
    assert not decoded.feeds["x"].flags.owndata  # a view over the request's bytes
    assert decoded.output_names == ("y", "total")
    assert not decoded.typed


def test_raw_request_answers_raw_outputs_with_id_and_version(
    plan: ModelPlan, affine_v1: LoadedModel
) -> None:
    request = raw_request()
    decoded = decode_request(plan, request)
    results = affine_v1.run(decoded.feeds, decoded.output_names)
    response = encode_response(plan, request, decoded, results)
    assert (response.model_name, response.model_version, response.id) == ("affine", "1", "req-1")
    assert [o.name for o in response.outputs] == ["y", "total"]
    assert [list(o.shape) for o in response.outputs] == [[2, 4], [2]]
    assert all(o.datatype == "FP32" for o in response.outputs)
    assert not response.outputs[0].HasField("contents")
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_allclose(y, X * 2 + B)


def test_typed_request_answers_typed_outputs(plan: ModelPlan, affine_v1: LoadedModel) -> None:
    request = typed_request()
    decoded = decode_request(plan, request)
    assert decoded.typed
    results = affine_v1.run(decoded.feeds, decoded.output_names)
    response = encode_response(plan, request, decoded, results)
    assert len(response.raw_output_contents) == 0
    total = np.array(response.outputs[1].contents.fp32_contents, dtype=np.float32)
    np.testing.assert_allclose(total, (X * 2 + B).sum(axis=1))


def test_requested_output_subset(plan: ModelPlan) -> None:
    decoded = decode_request(plan, raw_request(outputs=[Output(name="total")]))
    assert decoded.output_names == ("total",)


def test_missing_input_names_it_and_lists_inputs(plan: ModelPlan) -> None:
    msg = bad(
        plan,
        raw_request(
            inputs=[Input(name="x", datatype="FP32", shape=[2, 4])],
            raw_input_contents=[X.tobytes()],
        ),
    )
    assert "'b'" in msg and "does not give" in msg and "FP32[4]" in msg


def test_unknown_input_name(plan: ModelPlan) -> None:
    request = raw_request()
    request.inputs[1].name = "bias"
    msg = bad(plan, request)
    assert "no input named 'bias'" in msg and "'x', 'b'" in msg


def test_duplicate_input(plan: ModelPlan) -> None:
    request = raw_request()
    request.inputs[1].CopyFrom(Input(name="x", datatype="FP32", shape=[2, 4]))
    request.raw_input_contents[1] = X.tobytes()
    assert "more than once" in bad(plan, request)


def test_datatype_different_from_model(plan: ModelPlan) -> None:
    request = raw_request()
    request.inputs[0].datatype = "FP64"
    request.raw_input_contents[0] = X.astype(np.float64).tobytes()
    msg = bad(plan, request)
    assert "datatype FP64" in msg and "takes FP32" in msg


def test_shape_rank_mismatch(plan: ModelPlan) -> None:
    request = raw_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([8])
    msg = bad(plan, request)
    assert "rank 1" in msg and "rank 2" in msg


def test_fixed_dimension_mismatch(plan: ModelPlan) -> None:
    request = raw_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([4, 2])
    msg = bad(plan, request)
    assert "dimension 1 must be 4" in msg


def test_negative_dimension(plan: ModelPlan) -> None:
    request = raw_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([-1, 4])
    assert "negative dimension" in bad(plan, request)


def test_dynamic_dimension_accepts_any_batch(plan: ModelPlan) -> None:
    x = np.ones((5, 4), np.float32)
    request = raw_request()
    request.inputs[0].shape[0] = 5
    request.raw_input_contents[0] = x.tobytes()
    assert decode_request(plan, request).feeds["x"].shape == (5, 4)


def test_raw_byte_size_wrong(plan: ModelPlan) -> None:
    request = raw_request()
    request.raw_input_contents[0] = X.tobytes()[:-4]
    msg = bad(plan, request)
    assert "28 bytes" in msg and "32 bytes" in msg


def test_typed_element_count_wrong(plan: ModelPlan) -> None:
    request = typed_request()
    request.inputs[1].contents.fp32_contents.append(5.0)
    msg = bad(plan, request)
    assert "5 values in contents.fp32_contents" in msg and "needs 4" in msg


def test_typed_values_in_the_wrong_field(plan: ModelPlan) -> None:
    request = typed_request()
    request.inputs[1].contents.int_contents.extend([1, 2, 3, 4])
    assert "contents.int_contents" in bad(plan, request)


def test_both_raw_and_typed(plan: ModelPlan) -> None:
    request = raw_request()
    request.inputs[0].contents.fp32_contents.extend(X.ravel().tolist())
    assert "both typed contents and raw_input_contents" in bad(plan, request)


def test_raw_count_differs_from_inputs(plan: ModelPlan) -> None:
    msg = bad(plan, raw_request(raw_input_contents=[X.tobytes()]))
    assert "1 entries" in msg and "2 inputs" in msg


def test_unknown_requested_output(plan: ModelPlan) -> None:
    msg = bad(plan, raw_request(outputs=[Output(name="logits")]))
    assert "no output named 'logits'" in msg and "'y', 'total'" in msg


def test_fp16_only_as_raw(identities: dict[str, LoadedModel]) -> None:
    plan = plan_for(identities["FP16"])
    half = np.array([1.5, -2.0], dtype=np.float16)
    raw = pb.ModelInferRequest(
        model_name="id-fp16",
        inputs=[Input(name="in", datatype="FP16", shape=[2])],
        raw_input_contents=[half.tobytes()],
    )
    np.testing.assert_array_equal(decode_request(plan, raw).feeds["in"], half)
    typed = pb.ModelInferRequest(
        model_name="id-fp16",
        inputs=[
            Input(
                name="in",
                datatype="FP16",
                shape=[2],
                contents=pb.InferTensorContents(fp32_contents=[1.5, -2.0]),
            )
        ],
    )
    with pytest.raises(InvalidRequest, match="only as raw bytes"):
        decode_request(plan, typed)


def test_raw_bytes_tensor_with_length_prefixes(identities: dict[str, LoadedModel]) -> None:
    plan = plan_for(identities["BYTES"])
    data = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    request = pb.ModelInferRequest(
        model_name="id-bytes",
        inputs=[Input(name="in", datatype="BYTES", shape=[3])],
        raw_input_contents=[data],
    )
    assert list(decode_request(plan, request).feeds["in"]) == ["ab", "", "xyz"]
    request.raw_input_contents[0] = data[:-1]
    with pytest.raises(InvalidRequest, match="only 2 remain"):
        decode_request(plan, request)
