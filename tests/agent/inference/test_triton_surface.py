"""Triton's protocol surface beyond KServe's, through tritonclient.grpc against a live agent:
the bidirectional ModelStreamInfer (an error answers in error_message and the stream goes on),
ModelStatistics after N calls, ModelConfig, RepositoryIndex, ServerMetadata's extensions, and
UNIMPLEMENTED with a message for what is not served. The proto is checked against Triton's
own descriptors (tritonclient ships them), message by message and method by method."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import ModelRepository
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.inference.conftest import load
from tests.agent.inference.test_classification import NAMES, scores_model

tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (dev extra)")
triton_service = pytest.importorskip("tritonclient.grpc.service_pb2")
triton_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

X = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.ones(4, dtype=np.float32)


# -- the wire contract ---------------------------------------------------------------------


def _fields(message: Any) -> list[tuple[str, int, int, bool, str]]:
    return [
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
        )
        for f in message.fields
    ]


def _walk(message: Any, path: str = "") -> dict[str, Any]:
    found = {path + message.name: message}
    for nested in message.nested_types:
        found.update(_walk(nested, path + message.name + "."))
    return found


def _theirs(module: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for message in module.DESCRIPTOR.message_types_by_name.values():
        found.update(_walk(message))
    return found


# edgefleet's addition to a Triton message (Triton's clients skip unknown fields).
ADDED = {"ModelMetadataResponse": {"parameters"}, "ModelMetadataResponse.ParametersEntry": None}


def test_every_grpc_service_message_is_tritons_field_for_field() -> None:
    service = _theirs(triton_service)
    config = _theirs(triton_config)
    ours: dict[str, Any] = {}
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        ours.update(_walk(message))
    # Every message of Triton's grpc_service.proto is here, identical.
    for path, theirs in service.items():
        assert path in ours, f"{path} of Triton's grpc_service.proto is missing"
        added = ADDED.get(path) or set()
        kept = [f for f in _fields(ours[path]) if f[0] not in added]
        assert kept == _fields(theirs), path
    # What is not in grpc_service.proto is a subset of model_config.proto, same numbers.
    for path, message in ours.items():
        if path in service or path in ADDED:
            continue
        assert path in config, f"{path} is in neither of Triton's protos"
        theirs_by_name = {f[0]: f for f in _fields(config[path])}
        for field in _fields(message):
            assert theirs_by_name.get(field[0]) == field, f"{path}.{field[0]}"
    ours_enum = pb.DESCRIPTOR.enum_types_by_name["DataType"]
    theirs_enum = triton_config.DESCRIPTOR.enum_types_by_name["DataType"]
    assert [(v.name, v.number) for v in ours_enum.values] == [
        (v.name, v.number) for v in theirs_enum.values
    ]


def test_every_triton_method_is_here_with_its_streaming() -> None:
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert set(ours) == set(theirs)
    for name, method in theirs.items():
        mine = ours[name]
        assert mine.input_type.full_name == method.input_type.full_name, name
        assert mine.output_type.full_name == method.output_type.full_name, name
        assert (mine.client_streaming, mine.server_streaming) == (
            method.client_streaming,
            method.server_streaming,
        ), name


# -- a live server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_server(
    tmp_path_factory: pytest.TempPathFactory, repository: ModelRepository
) -> Iterator[InferenceServer]:
    folder = tmp_path_factory.mktemp("triton")
    repository.publish(load("animals", 1, scores_model(folder / "a.onnx", NAMES)))
    srv = start_inference_server(repository, "127.0.0.1", 0, max_workers=4, batching=True)
    yield srv
    srv.stop(None)
    repository.remove("animals")


@pytest.fixture
def triton(triton_server: InferenceServer) -> Iterator[Any]:
    client = tg.InferenceServerClient(f"127.0.0.1:{triton_server.port}")
    yield client
    client.close()


def _inputs(x: np.ndarray[Any, Any] = X, datatype: str = "FP32") -> list[Any]:
    first = tg.InferInput("x", list(x.shape), datatype)
    first.set_data_from_numpy(x)
    second = tg.InferInput("b", [4], "FP32")
    second.set_data_from_numpy(B)
    return [first, second]


def test_stream_infer_answers_in_order_and_survives_an_error(triton: Any) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton.async_stream_infer("affine", _inputs(), request_id="a", model_version="1")
        triton.async_stream_infer("affine", _inputs(X.astype(np.int32), "INT32"), request_id="b")
        triton.async_stream_infer("nope", _inputs(), request_id="c")
        triton.async_stream_infer("affine", _inputs(), request_id="d")
        got = [answers.get(timeout=10) for _ in range(4)]
    finally:
        triton.stop_stream()
    (first, e1), (_, e2), (_, e3), (last, e4) = got
    assert e1 is None and first.get_response().id == "a"
    np.testing.assert_allclose(first.as_numpy("y"), X * 2 + B)
    assert "has datatype INT32 but model 'affine' takes FP32" in str(e2)
    assert "'nope' is not served here" in str(e3)
    assert e4 is None and last.get_response().id == "d"
    np.testing.assert_allclose(last.as_numpy("y"), X * 3 + B)


def test_stream_with_our_stub_carries_the_error_and_the_id(
    triton_server: InferenceServer,
) -> None:
    good = pb.ModelInferRequest(
        model_name="affine", id="ok", raw_input_contents=[X.tobytes(), B.tobytes()]
    )
    good.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    good.inputs.add(name="b", datatype="FP32", shape=[4])
    bad = pb.ModelInferRequest()
    bad.CopyFrom(good)
    bad.id = "bad"
    bad.raw_input_contents[0] = b"\0" * 3
    with grpc.insecure_channel(f"127.0.0.1:{triton_server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter([good, bad, good]), timeout=10))
    assert [r.error_message == "" for r in replies] == [True, False, True]
    assert "needs 8 x 4 = 32 bytes" in replies[1].error_message
    assert replies[1].infer_response.id == "bad"
    assert [r.infer_response.id for r in replies] == ["ok", "bad", "ok"]


def test_statistics_count_the_calls(triton: Any, triton_server: InferenceServer) -> None:
    def figures(version: str) -> Any:
        stats = triton.get_inference_statistics("animals", version).model_stats
        assert [(s.name, s.version) for s in stats] == [("animals", "1")]
        return stats[0]

    before = figures("1")
    x = tg.InferInput("x", [3, 4], "FP32")
    x.set_data_from_numpy(np.ones((3, 4), np.float32))
    for _ in range(5):
        triton.infer("animals", [x])
    wrong = tg.InferInput("x", [3, 5], "FP32")
    wrong.set_data_from_numpy(np.ones((3, 5), np.float32))
    with pytest.raises(InferenceServerException):
        triton.infer("animals", [wrong])
    after = figures("")
    inference = after.inference_stats
    assert inference.success.count == before.inference_stats.success.count + 5
    assert inference.fail.count == before.inference_stats.fail.count + 1
    # A batch model counts each row as an inference (Triton's max_batch_size > 0).
    assert after.inference_count == before.inference_count + 15
    assert after.execution_count >= before.execution_count + 5
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(inference, part).count == inference.success.count
        assert getattr(inference, part).ns > 0
    assert inference.success.ns >= inference.compute_infer.ns
    assert after.last_inference > 0
    everything = triton.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in everything} >= {("affine", "1"), ("affine", "2")}
    with pytest.raises(InferenceServerException, match="not served here"):
        triton.get_inference_statistics("nope")


def test_model_config_in_tritons_shape(triton: Any) -> None:
    config = triton.get_model_config("animals").config
    assert (config.name, config.platform, config.backend) == (
        "animals",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 64  # dimension 0 is the batch: dims leave it out
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", triton_config.TYPE_FP32, [4])
    ]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        ("scores", [4], "labels.txt")
    ]
    assert config.HasField("dynamic_batching")  # this server batches
    assert config.parameters["class_names"].string_value == '["cat", "dog", "bird", "fish"]'
    plain = triton.get_model_config("affine", "1").config
    assert plain.max_batch_size == 0  # "b" has no batch dimension
    assert [list(i.dims) for i in plain.input] == [[-1, 4], [4]]
    assert all(o.label_filename == "" for o in plain.output)


def test_repository_index_and_extensions(triton: Any) -> None:
    index = triton.get_model_repository_index().models
    assert {(m.name, m.version, m.state) for m in index} >= {
        ("affine", "1", "READY"),
        ("affine", "2", "READY"),
        ("animals", "1", "READY"),
    }
    extensions = set(triton.get_server_metadata().extensions)
    assert {"classification", "statistics", "model_configuration"} <= extensions
    assert "system_shared_memory" in extensions


@pytest.mark.parametrize(
    ("call", "method"),
    [
        (lambda c: c.load_model("affine"), "RepositoryModelLoad"),
        (lambda c: c.unload_model("affine"), "RepositoryModelUnload"),
        (lambda c: c.get_cuda_shared_memory_status(), "CudaSharedMemoryStatus"),
        (lambda c: c.unregister_cuda_shared_memory(), "CudaSharedMemoryUnregister"),
        (lambda c: c.get_trace_settings(), "TraceSetting"),
        (lambda c: c.get_log_settings(), "LogSettings"),
    ],
)
def test_what_is_not_served_says_so(triton: Any, call: Any, method: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(triton)
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert f"{method} is not implemented by this server" in info.value.message()


def test_streams_are_capped(repository: ModelRepository, tmp_path: Path) -> None:
    server = start_inference_server(repository, "127.0.0.1", 0, max_workers=2)  # one stream
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            held: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

            def pending() -> Iterator[pb.ModelInferRequest]:
                while (item := held.get()) is not None:
                    yield item

            first = stub.ModelStreamInfer(pending(), timeout=10)
            request = pb.ModelInferRequest(model_name="nope")
            held.put(request)
            assert "not served here" in next(first).error_message  # the stream is open
            with pytest.raises(grpc.RpcError) as info:
                list(stub.ModelStreamInfer(iter([request]), timeout=10))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            held.put(None)
            assert list(first) == []
    finally:
        server.stop(0)
