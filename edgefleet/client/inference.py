"""A small typed client for any Open Inference Protocol (KServe v2 gRPC) server, the agent's
included.

    from edgefleet.client.inference import InferenceClient
    with InferenceClient("127.0.0.1:8001") as client:
        result = client.infer("defect-classifier", {"image": batch})
        print(result.model_version, result.outputs["logits"].argmax(1))

Tensors travel as raw bytes (the fast path); one channel and stub serve every call. For the
lowest per-call cost, build the request once with :meth:`InferenceClient.prepare` and send it
with :meth:`InferenceClient.infer_prepared`, changing only the input bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from edgefleet.core.auth import bearer_metadata
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.rpc import error_from_rpc
from edgefleet.core.tensors import (
    DATATYPE_TO_NUMPY,
    TYPED_CONTENTS_FIELD,
    datatype_of,
    parse_class_names,
)
from edgefleet.core.tls import ClientSecurity
from edgefleet.core.versions import TensorSpec
from edgefleet.core.wire import from_proto, wire_field
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

# Any: outputs are whatever numeric (or object, for BYTES) dtype the server sent.
Array = npt.NDArray[Any]

DEFAULT_MAX_MESSAGE = 64 << 20


def _parameter_strings(parameters: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        found[str(key)] = str(getattr(value, kind)) if kind else ""
    return found


@dataclass(frozen=True)
class ModelMetadata:
    """What an inference server says of a model (the protocol's ModelMetadataResponse)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The model's parameters as strings (edgefleet's agent answers "class_names", a JSON list).
    parameters: dict[str, str] = field(
        default_factory=dict, metadata=wire_field(from_wire=_parameter_strings)
    )

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's class names (index i names class i); () when the server has none."""
        return parse_class_names(self.parameters.get("class_names", ""))


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str
    outputs: dict[str, Array]


def encode_input(name: str, array: Array) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """The tensor header and raw bytes of one input."""
    arr = np.asarray(array)
    datatype = datatype_of(arr)
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=arr.shape)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in arr.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts += (struct.pack("<I", len(data)), data)
        return tensor, b"".join(parts)
    return tensor, np.ascontiguousarray(arr, dtype=DATATYPE_TO_NUMPY[datatype]).tobytes()


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, Array]:
    """Output arrays by name, from raw_output_contents or typed contents."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InvalidArgument(
            f"the server answered {len(response.outputs)} outputs with {len(raw)} "
            "raw_output_contents entries"
        )
    result: dict[str, Array] = {}
    for index, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if raw:
            result[tensor.name] = _from_raw(tensor.datatype, shape, raw[index])
        else:
            result[tensor.name] = _from_typed(tensor.datatype, shape, tensor.contents)
    return result


def _from_raw(datatype: str, shape: tuple[int, ...], data: bytes) -> Array:
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<I", data, offset)
            items.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
        arr = np.empty(len(items), dtype=np.object_)
        arr[:] = items
        return arr.reshape(shape)
    dtype = _dtype(datatype)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_typed(datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> Array:
    field_name = TYPED_CONTENTS_FIELD.get(datatype)
    if field_name is None:
        raise InvalidArgument(f"the server sent {datatype} as typed contents, which has no field")
    values = list(getattr(contents, field_name))
    if datatype == "BYTES":
        arr = np.empty(len(values), dtype=np.object_)
        arr[:] = values
        return arr.reshape(shape)
    return np.asarray(values, dtype=_dtype(datatype)).reshape(shape)


def _dtype(datatype: str) -> np.dtype[np.generic]:
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidArgument(f"the server sent unknown datatype {datatype!r}") from None


class InferenceClient:
    """Open Inference Protocol over one gRPC channel. Errors raise EdgefleetError subclasses'
    codes (NOT_FOUND for an unknown model, INVALID_ARGUMENT for a bad tensor, ...)."""

    def __init__(
        self,
        address: str,
        timeout: float = 10.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        token: str = "",
        ca_file: Path | None = None,
    ) -> None:
        """`token`: the bearer token of a port that requires one; `ca_file`: the CA bundle
        that verifies a TLS port's certificate (plain text without it)."""
        self.address = address
        self.timeout = timeout
        security = ClientSecurity(ca_file=ca_file, insecure=ca_file is None)
        self._channel = security.channel(
            address,
            [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._metadata = bearer_metadata(token) if token else None
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer = self._stub.ModelInfer

    def live(self) -> bool:
        try:
            return self._stub.ServerLive(
                pb.ServerLiveRequest(), timeout=self.timeout, metadata=self._metadata
            ).live
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def ready(self) -> bool:
        try:
            return self._stub.ServerReady(
                pb.ServerReadyRequest(), timeout=self.timeout, metadata=self._metadata
            ).ready
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        """(name, version, extensions) of the server."""
        try:
            r = self._stub.ServerMetadata(
                pb.ServerMetadataRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return r.name, r.version, tuple(r.extensions)

    def model_ready(self, name: str, version: str | int | None = None) -> bool:
        request = pb.ModelReadyRequest(name=name, version=_version(version))
        try:
            return self._stub.ModelReady(
                request, timeout=self.timeout, metadata=self._metadata
            ).ready
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def metadata(self, name: str, version: str | int | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=name, version=_version(version))
        try:
            r = self._stub.ModelMetadata(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return from_proto(r, ModelMetadata)

    def prepare(
        self,
        name: str,
        inputs: Mapping[str, Array],
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str = "",
        label: str = "",
        routing_key: str = "",
        class_count: int = 0,
    ) -> pb.ModelInferRequest:
        """A request ready to send; reuse it, replacing ``raw_input_contents[i]`` per call.
        `label`: what the client knows the answer should be, kept with a capture of it.
        `routing_key`: keeps this client (a user, a camera) on one version of an A/B split.
        `class_count`: each of `outputs` answers its top N classes as BYTES
        "score:index:label" strings (Triton's classification extension)."""
        if class_count and not outputs:
            raise InvalidArgument("class_count needs the outputs to classify, by name")
        tensors = []
        raw = []
        for input_name, array in inputs.items():
            tensor, data = encode_input(input_name, array)
            tensors.append(tensor)
            raw.append(data)
        request = pb.ModelInferRequest(
            model_name=name,
            model_version=_version(version),
            id=request_id,
            inputs=tensors,
            outputs=[
                pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs or ()
            ],
            raw_input_contents=raw,
        )
        if label:
            request.parameters["label"].string_param = label
        if routing_key:
            request.parameters["routing_key"].string_param = routing_key
        if class_count:
            for wanted in request.outputs:
                wanted.parameters["classification"].int64_param = class_count
        return request

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Array],
        version: str | int | None = None,
        outputs: list[str] | None = None,
        *,
        request_id: str = "",
        label: str = "",
        routing_key: str = "",
        class_count: int = 0,
    ) -> InferResult:
        """Run model `name` on `inputs` (numpy arrays by input name); outputs by name.
        `label`: the right answer where the client knows it, kept with a capture of it.
        `routing_key`: the same key always reaches the same version of an A/B split.
        `class_count`: `outputs` answer their top N classes as "score:index:label" bytes."""
        return self.infer_prepared(
            self.prepare(
                name, inputs, version, outputs, request_id, label, routing_key, class_count
            )
        )

    def infer_prepared(self, request: pb.ModelInferRequest) -> InferResult:
        try:
            response = self._infer(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return InferResult(
            response.model_name, response.model_version, response.id, decode_outputs(response)
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _version(version: str | int | None) -> str:
    return "" if version is None else str(version)
