"""Our inference proto against the published Open Inference Protocol contract.

Two references. The tables below are copied by hand from kserve/kserve
``docs/predict-api/v2/grpc_predict_v2.proto``, with the two InferParameter fields Triton's
``grpc_service.proto`` adds (double_param, uint64_param; without them a Triton client's
double or uint64 parameter was dropped silently). And the descriptors tritonclient itself
ships (its ``service_pb2``, generated from Triton's grpc_service.proto): every message we
define must be there, field for field. Any drift in ours (a renumbered field, a changed
type, an extra or missing field) breaks Triton's and KServe's clients silently, so it
fails here instead.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from protos.inference.v2 import grpc_predict_v2_pb2 as pb

F = descriptor_pb2.FieldDescriptorProto
OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
BOOL, STRING, BYTES = F.TYPE_BOOL, F.TYPE_STRING, F.TYPE_BYTES
INT32, INT64, UINT32, UINT64 = F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64
FLOAT, DOUBLE, MESSAGE = F.TYPE_FLOAT, F.TYPE_DOUBLE, F.TYPE_MESSAGE

PARAMS = ".inference.InferParameter"

# message (dotted path below the package) -> [(field, number, label, type, message type)]
EXPECTED_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, OPT, BOOL, "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, OPT, BOOL, "")],
    "ModelReadyRequest": [("name", 1, OPT, STRING, ""), ("version", 2, OPT, STRING, "")],
    "ModelReadyResponse": [("ready", 1, OPT, BOOL, "")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [
        ("name", 1, OPT, STRING, ""),
        ("version", 2, OPT, STRING, ""),
        ("extensions", 3, REP, STRING, ""),
    ],
    "ModelMetadataRequest": [("name", 1, OPT, STRING, ""), ("version", 2, OPT, STRING, "")],
    "ModelMetadataResponse": [
        ("name", 1, OPT, STRING, ""),
        ("versions", 2, REP, STRING, ""),
        ("platform", 3, OPT, STRING, ""),
        ("inputs", 4, REP, MESSAGE, ".inference.ModelMetadataResponse.TensorMetadata"),
        ("outputs", 5, REP, MESSAGE, ".inference.ModelMetadataResponse.TensorMetadata"),
        # edgefleet's addition ("class_names"); Triton's clients skip an unknown field.
        ("parameters", 6, REP, MESSAGE, ".inference.ModelMetadataResponse.ParametersEntry"),
    ],
    "ModelMetadataResponse.ParametersEntry": [
        ("key", 1, OPT, STRING, ""),
        ("value", 2, OPT, MESSAGE, PARAMS),
    ],
    "ModelMetadataResponse.TensorMetadata": [
        ("name", 1, OPT, STRING, ""),
        ("datatype", 2, OPT, STRING, ""),
        ("shape", 3, REP, INT64, ""),
    ],
    "ModelInferRequest": [
        ("model_name", 1, OPT, STRING, ""),
        ("model_version", 2, OPT, STRING, ""),
        ("id", 3, OPT, STRING, ""),
        ("parameters", 4, REP, MESSAGE, ".inference.ModelInferRequest.ParametersEntry"),
        ("inputs", 5, REP, MESSAGE, ".inference.ModelInferRequest.InferInputTensor"),
        (
            "outputs",
            6,
            REP,
            MESSAGE,
            ".inference.ModelInferRequest.InferRequestedOutputTensor",
        ),
        ("raw_input_contents", 7, REP, BYTES, ""),
    ],
    "ModelInferRequest.ParametersEntry": [
        ("key", 1, OPT, STRING, ""),
        ("value", 2, OPT, MESSAGE, PARAMS),
    ],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, OPT, STRING, ""),
        ("datatype", 2, OPT, STRING, ""),
        ("shape", 3, REP, INT64, ""),
        (
            "parameters",
            4,
            REP,
            MESSAGE,
            ".inference.ModelInferRequest.InferInputTensor.ParametersEntry",
        ),
        ("contents", 5, OPT, MESSAGE, ".inference.InferTensorContents"),
    ],
    "ModelInferRequest.InferInputTensor.ParametersEntry": [
        ("key", 1, OPT, STRING, ""),
        ("value", 2, OPT, MESSAGE, PARAMS),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, OPT, STRING, ""),
        (
            "parameters",
            2,
            REP,
            MESSAGE,
            ".inference.ModelInferRequest.InferRequestedOutputTensor.ParametersEntry",
        ),
    ],
    "ModelInferRequest.InferRequestedOutputTensor.ParametersEntry": [
        ("key", 1, OPT, STRING, ""),
        ("value", 2, OPT, MESSAGE, PARAMS),
    ],
    "ModelInferResponse": [
        ("model_name", 1, OPT, STRING, ""),
        ("model_version", 2, OPT, STRING, ""),
        ("id", 3, OPT, STRING, ""),
        ("parameters", 4, REP, MESSAGE, ".inference.ModelInferResponse.ParametersEntry"),
        ("outputs", 5, REP, MESSAGE, ".inference.ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, REP, BYTES, ""),
    ],
    "ModelInferResponse.ParametersEntry": [
        ("key", 1, OPT, STRING, ""),
        ("value", 2, OPT, MESSAGE, PARAMS),
    ],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, OPT, STRING, ""),
        ("datatype", 2, OPT, STRING, ""),
        ("shape", 3, REP, INT64, ""),
        (
            "parameters",
            4,
            REP,
            MESSAGE,
            ".inference.ModelInferResponse.InferOutputTensor.ParametersEntry",
        ),
        ("contents", 5, OPT, MESSAGE, ".inference.InferTensorContents"),
    ],
    "ModelInferResponse.InferOutputTensor.ParametersEntry": [
        ("key", 1, OPT, STRING, ""),
        ("value", 2, OPT, MESSAGE, PARAMS),
    ],
    "InferParameter": [
        ("bool_param", 1, OPT, BOOL, ""),
        ("int64_param", 2, OPT, INT64, ""),
        ("string_param", 3, OPT, STRING, ""),
        ("double_param", 4, OPT, DOUBLE, ""),
        ("uint64_param", 5, OPT, UINT64, ""),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, REP, BOOL, ""),
        ("int_contents", 2, REP, INT32, ""),
        ("int64_contents", 3, REP, INT64, ""),
        ("uint_contents", 4, REP, UINT32, ""),
        ("uint64_contents", 5, REP, UINT64, ""),
        ("fp32_contents", 6, REP, FLOAT, ""),
        ("fp64_contents", 7, REP, DOUBLE, ""),
        ("bytes_contents", 8, REP, BYTES, ""),
    ],
}

MAP_ENTRIES = {name for name in EXPECTED_MESSAGES if name.endswith(".ParametersEntry")}

# method -> (request, response); all unary.
EXPECTED_METHODS: dict[str, tuple[str, str]] = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    return proto


def _messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str = ""
) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}
    for message in messages:
        path = prefix + message.name
        found[path] = message
        found.update(_messages(list(message.nested_type), path + "."))
    return found


def test_package_and_syntax() -> None:
    proto = _file()
    assert proto.package == "inference"
    assert proto.syntax == "proto3"


def test_every_message_and_field_matches_the_published_contract() -> None:
    # KServe's messages exactly; Triton's additions are checked against Triton's own
    # descriptors below and in test_triton_surface.py.
    ours = _messages(list(_file().message_type))
    assert set(EXPECTED_MESSAGES) <= set(ours)
    for path, expected in EXPECTED_MESSAGES.items():
        fields = [
            (f.name, f.number, f.label, f.type, f.type_name if f.type == MESSAGE else "")
            for f in ours[path].field
        ]
        assert fields == expected, path


def test_maps_and_oneof_are_as_published() -> None:
    ours = {
        p: m for p, m in _messages(list(_file().message_type)).items() if p in EXPECTED_MESSAGES
    }
    for path, message in ours.items():
        assert message.options.map_entry == (path in MAP_ENTRIES), path
    params = ours["InferParameter"]
    assert [o.name for o in params.oneof_decl] == ["parameter_choice"]
    assert all(f.HasField("oneof_index") and f.oneof_index == 0 for f in params.field)
    # proto3 scalars elsewhere carry no presence (no synthetic optional oneofs).
    assert all(not m.oneof_decl for p, m in ours.items() if p != "InferParameter")


def test_service_methods_match_the_published_contract() -> None:
    services = _file().service
    assert [s.name for s in services] == ["GRPCInferenceService"]
    methods = {
        m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        for m in services[0].method
        if m.name in EXPECTED_METHODS  # Triton's others: test_triton_surface.py
    }
    assert methods == {
        name: (f".inference.{req}", f".inference.{resp}", False, False)
        for name, (req, resp) in EXPECTED_METHODS.items()
    }
    # Clients address the service by its full name in the HTTP/2 path.
    assert pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == (
        "inference.GRPCInferenceService"
    )


def _fields(message: Any) -> list[tuple[str, int, int, bool, str]]:
    return [
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type is not None else "",
        )
        for f in message.fields
    ]


def _walk(message: Any, path: str = "") -> dict[str, Any]:
    found = {path + message.name: message}
    for nested in message.nested_types:
        found.update(_walk(nested, path + message.name + "."))
    return found


# edgefleet's additions to Triton's messages (Triton's clients skip unknown fields).
ADDED_FIELDS = {"ModelMetadataResponse": {"parameters"}}
ADDED_MESSAGES = {"ModelMetadataResponse.ParametersEntry"}


def test_every_message_matches_tritons_own_descriptors() -> None:
    # tritonclient[grpc] is in the dev extra; its descriptors are Triton's published proto.
    triton = pytest.importorskip(
        "tritonclient.grpc.service_pb2", reason="tritonclient[grpc] (dev extra) is not installed"
    )
    theirs: dict[str, Any] = {}
    for message in triton.DESCRIPTOR.message_types_by_name.values():
        theirs.update(_walk(message))
    config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    # ModelConfig and what it needs: a subset of Triton's model_config.proto, field by field
    # (test_triton_surface.py).
    subset = set(config.DESCRIPTOR.message_types_by_name)
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for path, ours in _walk(message).items():
            if path.split(".")[0] in subset:
                continue
            if path in ADDED_MESSAGES:
                assert path not in theirs, path
                continue
            assert path in theirs, f"{path} is not in Triton's grpc_service.proto"
            added = ADDED_FIELDS.get(path, set())
            kept = [f for f in _fields(ours) if f[0] not in added]
            assert kept == _fields(theirs[path]), path
            # an addition takes a number Triton's message does not use
            numbers = {f[1] for f in _fields(theirs[path])}
            assert all(f[1] not in numbers for f in _fields(ours) if f[0] in added), path
    methods = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        assert method.name in methods
        assert method.input_type.full_name == methods[method.name].input_type.full_name
        assert method.output_type.full_name == methods[method.name].output_type.full_name
