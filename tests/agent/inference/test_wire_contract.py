"""Our inference proto against the published KServe v2 contract (kserve/kserve
docs/predict-api/v2/grpc_predict_v2.proto), field by field, so Triton's and KServe's clients
keep working against the agent. The expected table is written out here on purpose: a change
to the .proto that breaks the wire shows up as a diff against the published contract."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from protos.inference.v2 import grpc_predict_v2_pb2 as pb

# message -> [(field, number, type, label)]; "map<K,V>" for map fields, "oneof:NAME/type" for
# members of a oneof, message types by their name inside package "inference".
EXPECTED_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", "optional")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", "optional")],
    "ModelReadyRequest": [("name", 1, "string", "optional"), ("version", 2, "string", "optional")],
    "ModelReadyResponse": [("ready", 1, "bool", "optional")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [
        ("name", 1, "string", "optional"),
        ("version", 2, "string", "optional"),
        ("extensions", 3, "string", "repeated"),
    ],
    "ModelMetadataRequest": [
        ("name", 1, "string", "optional"),
        ("version", 2, "string", "optional"),
    ],
    "ModelMetadataResponse": [
        ("name", 1, "string", "optional"),
        ("versions", 2, "string", "repeated"),
        ("platform", 3, "string", "optional"),
        ("inputs", 4, "ModelMetadataResponse.TensorMetadata", "repeated"),
        ("outputs", 5, "ModelMetadataResponse.TensorMetadata", "repeated"),
    ],
    "ModelMetadataResponse.TensorMetadata": [
        ("name", 1, "string", "optional"),
        ("datatype", 2, "string", "optional"),
        ("shape", 3, "int64", "repeated"),
    ],
    "ModelInferRequest": [
        ("model_name", 1, "string", "optional"),
        ("model_version", 2, "string", "optional"),
        ("id", 3, "string", "optional"),
        ("parameters", 4, "map<string,InferParameter>", "repeated"),
        ("inputs", 5, "ModelInferRequest.InferInputTensor", "repeated"),
        ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor", "repeated"),
        ("raw_input_contents", 7, "bytes", "repeated"),
    ],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, "string", "optional"),
        ("datatype", 2, "string", "optional"),
        ("shape", 3, "int64", "repeated"),
        ("parameters", 4, "map<string,InferParameter>", "repeated"),
        ("contents", 5, "InferTensorContents", "optional"),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, "string", "optional"),
        ("parameters", 2, "map<string,InferParameter>", "repeated"),
    ],
    "ModelInferResponse": [
        ("model_name", 1, "string", "optional"),
        ("model_version", 2, "string", "optional"),
        ("id", 3, "string", "optional"),
        ("parameters", 4, "map<string,InferParameter>", "repeated"),
        ("outputs", 5, "ModelInferResponse.InferOutputTensor", "repeated"),
        ("raw_output_contents", 6, "bytes", "repeated"),
    ],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, "string", "optional"),
        ("datatype", 2, "string", "optional"),
        ("shape", 3, "int64", "repeated"),
        ("parameters", 4, "map<string,InferParameter>", "repeated"),
        ("contents", 5, "InferTensorContents", "optional"),
    ],
    "InferParameter": [
        ("bool_param", 1, "oneof:parameter_choice/bool", "optional"),
        ("int64_param", 2, "oneof:parameter_choice/int64", "optional"),
        ("string_param", 3, "oneof:parameter_choice/string", "optional"),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "bool", "repeated"),
        ("int_contents", 2, "int32", "repeated"),
        ("int64_contents", 3, "int64", "repeated"),
        ("uint_contents", 4, "uint32", "repeated"),
        ("uint64_contents", 5, "uint64", "repeated"),
        ("fp32_contents", 6, "float", "repeated"),
        ("fp64_contents", 7, "double", "repeated"),
        ("bytes_contents", 8, "bytes", "repeated"),
    ],
}

EXPECTED_METHODS = [
    ("ServerLive", "ServerLiveRequest", "ServerLiveResponse"),
    ("ServerReady", "ServerReadyRequest", "ServerReadyResponse"),
    ("ModelReady", "ModelReadyRequest", "ModelReadyResponse"),
    ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse"),
    ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse"),
    ("ModelInfer", "ModelInferRequest", "ModelInferResponse"),
]

SCALARS = {
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_DOUBLE: "double",
}


def _local(full_name: str) -> str:
    assert full_name.startswith("inference."), full_name
    return full_name.removeprefix("inference.")


def _type_of(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message = field.message_type
        if message.GetOptions().map_entry:
            key, value = message.fields_by_name["key"], message.fields_by_name["value"]
            return f"map<{_type_of(key)},{_type_of(value)}>"
        return _local(message.full_name)
    name = SCALARS[field.type]
    oneof = field.containing_oneof
    return f"oneof:{oneof.name}/{name}" if oneof is not None else name


def _label(field: FieldDescriptor) -> str:
    # proto3 has no "required" (and protobuf 7 dropped .label): repeated or singular.
    return "repeated" if field.is_repeated else "optional"


def _messages(descriptors: list[Descriptor]) -> dict[str, list[tuple[str, int, str, str]]]:
    found: dict[str, list[tuple[str, int, str, str]]] = {}
    for message in descriptors:
        if message.GetOptions().map_entry:
            continue
        found[_local(message.full_name)] = [
            (f.name, f.number, _type_of(f), _label(f)) for f in message.fields
        ]
        found.update(_messages(list(message.nested_types)))
    return found


def test_package_is_inference() -> None:
    assert pb.DESCRIPTOR.package == "inference"


def test_every_message_matches_the_published_contract() -> None:
    ours = _messages(list(pb.DESCRIPTOR.message_types_by_name.values()))
    assert sorted(ours) == sorted(EXPECTED_MESSAGES)
    for name, fields in EXPECTED_MESSAGES.items():
        assert sorted(ours[name], key=lambda f: f[1]) == fields, name


def test_map_entries_use_string_keys_and_infer_parameter_values() -> None:
    entry = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["parameters"].message_type
    assert [(f.name, f.number) for f in entry.fields] == [("key", 1), ("value", 2)]


def test_service_methods_match_the_published_contract() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    ours = [
        (m.name, _local(m.input_type.full_name), _local(m.output_type.full_name))
        for m in service.methods
    ]
    assert ours == EXPECTED_METHODS
    assert not any(m.client_streaming or m.server_streaming for m in service.methods)
