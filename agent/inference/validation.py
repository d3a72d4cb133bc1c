"""Open Inference Protocol requests to ONNX Runtime feeds, and ONNX Runtime outputs back.

Transport-free: the servicer hands a parsed ``ModelInferRequest`` and the ``LoadedModel`` it
addresses to :func:`decode_request`, runs the model, and builds the answer with
:func:`encode_response`. Everything a client can get wrong raises ``InvalidRequest`` with a
message that names the tensor, what was expected and what arrived.

Per model, what the checks need (input specs by name, numpy dtypes, output names) is worked
out once in a :class:`ModelPlan` and reused by every request, so the hot path does only
dictionary look-ups, one ``np.frombuffer`` per raw input and one ``tobytes`` per output.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.errors import InvalidRequest
from agent.runtime import LoadedModel
from edgefleet.core.tensors import DATATYPE_TO_NUMPY, TYPED_CONTENTS_FIELD
from edgefleet.core.versions import TensorSpec
from protos.inference.v2 import grpc_predict_v2_pb2 as pb

Array = npt.NDArray[np.generic]
Buffer = bytes | bytearray | memoryview
# An input whose bytes come from elsewhere than the request (a shared-memory region): given
# the input's spec and checked shape, and the byte count they need (-1 for BYTES), its bytes.
ExternalInput = Callable[["InputSpec", tuple[int, ...], int], Buffer]


@dataclass(frozen=True)
class InputSpec:
    """An input's spec with the numpy dtype its bytes decode to, worked out once."""

    spec: TensorSpec
    dtype: np.dtype[np.generic]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def datatype(self) -> str:
        return self.spec.datatype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    def describe(self) -> str:
        return self.spec.describe()


@dataclass(frozen=True)
class ModelPlan:
    """What the checks of one loaded model version need, computed once."""

    model: LoadedModel
    version: str  # echoed as model_version
    inputs: dict[str, InputSpec]
    input_order: tuple[str, ...]
    output_names: tuple[str, ...]
    output_datatypes: dict[str, str]


def plan_for(model: LoadedModel) -> ModelPlan:
    inputs = {info.name: _spec(info) for info in model.inputs}
    return ModelPlan(
        model=model,
        version=str(model.version),
        inputs=inputs,
        input_order=tuple(info.name for info in model.inputs),
        output_names=tuple(o.name for o in model.outputs),
        output_datatypes={o.name: o.datatype for o in model.outputs},
    )


def _spec(spec: TensorSpec) -> InputSpec:
    return InputSpec(spec, DATATYPE_TO_NUMPY.get(spec.datatype, np.dtype(np.object_)))


@dataclass(frozen=True)
class DecodedRequest:
    feeds: dict[str, Array]
    output_names: tuple[str, ...]
    typed: bool  # the request sent typed contents, so the answer uses typed contents too


def decode_request(
    plan: ModelPlan,
    request: pb.ModelInferRequest,
    external: Mapping[int, ExternalInput] | None = None,
) -> DecodedRequest:
    """The ONNX Runtime feeds and output names a request asks for, after checking all of it.

    `external` reads the inputs (by index) whose bytes are not in the request (shared memory);
    raw_input_contents then holds one entry per other input, in order, as Triton's clients
    send it."""
    tensors = request.inputs
    raw = request.raw_input_contents
    n_raw = len(raw)
    external = external or {}
    inline = len(tensors) - len(external)
    if n_raw and n_raw != inline:
        where = " (not counting inputs in shared memory)" if external else ""
        raise InvalidRequest(
            f"raw_input_contents has {n_raw} entries but the request has {inline} inputs{where}; "
            "send one raw_input_contents entry per input, in the order of inputs"
        )
    specs = plan.inputs
    feeds: dict[str, Array] = {}
    typed = False
    raw_index = 0
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidRequest(
                f"model {plan.model.name!r} has no input named {name!r}; "
                f"its inputs are {_listing(plan.input_order)}"
            )
        if name in feeds:
            raise InvalidRequest(f"input {name!r} is given more than once; send each input once")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"input {name!r} has datatype {tensor.datatype or '(empty)'} but model "
                f"{plan.model.name!r} takes {spec.datatype}; send {spec.describe()}"
            )
        shape = _check_shape(spec, tensor.shape)
        has_typed = tensor.HasField("contents")
        read = external.get(index)
        if read is not None:
            if has_typed:
                raise InvalidRequest(
                    f"input {name!r} is in shared memory and also has typed contents; "
                    "send one or the other"
                )
            expected = -1 if spec.datatype == "BYTES" else _count(shape) * spec.dtype.itemsize
            feeds[name] = _from_raw(
                spec, shape, read(spec, shape, expected), "the shared-memory bytes"
            )
        elif n_raw:
            if has_typed:
                raise InvalidRequest(
                    f"input {name!r} has both typed contents and raw_input_contents; "
                    "send one or the other"
                )
            feeds[name] = _from_raw(spec, shape, raw[raw_index])
            raw_index += 1
        else:
            feeds[name] = _from_typed(spec, shape, tensor.contents)
            typed = True
    if len(feeds) != len(specs):
        missing = [n for n in plan.input_order if n not in feeds]
        raise InvalidRequest(
            f"model {plan.model.name!r} needs input(s) {_listing(missing)} that the request "
            f"does not give; its inputs are "
            + ", ".join(f"{n}: {specs[n].describe()}" for n in plan.input_order)
        )
    output_names = _requested_outputs(plan, request.outputs)
    return DecodedRequest(feeds, output_names, typed)


def _listing(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) or "(none)"


def _check_shape(spec: InputSpec, shape: Sequence[int]) -> tuple[int, ...]:
    got = tuple(shape)
    if len(got) != len(spec.shape):
        raise InvalidRequest(
            f"input {spec.name!r} has shape {list(got)} (rank {len(got)}) but the model takes "
            f"rank {len(spec.shape)}: {spec.describe()}"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, got, strict=True)):
        if have < 0:
            raise InvalidRequest(
                f"input {spec.name!r} has shape {list(got)} with negative dimension {axis}; "
                "send the actual size of every dimension"
            )
        if want >= 0 and have != want:
            raise InvalidRequest(
                f"input {spec.name!r} has shape {list(got)} but dimension {axis} must be "
                f"{want}: the model takes {spec.describe()}"
            )
    return got


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _from_raw(
    spec: InputSpec, shape: tuple[int, ...], data: Buffer, where: str = "raw contents"
) -> Array:
    if spec.datatype == "BYTES":
        return _bytes_from_raw(spec, shape, bytes(data))
    count = _count(shape)
    expected = count * spec.dtype.itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"{where} of input {spec.name!r} are {len(data)} bytes but "
            f"{spec.datatype} of shape {list(shape)} needs {count} x {spec.dtype.itemsize} = "
            f"{expected} bytes (row-major, little-endian)"
        )
    # Zero-copy view over the request's bytes; ONNX Runtime only reads its inputs.
    return np.frombuffer(data, dtype=spec.dtype).reshape(shape)


def _bytes_from_raw(spec: InputSpec, shape: tuple[int, ...], data: bytes) -> Array:
    # The protocol's raw BYTES layout: each element is a 4-byte little-endian length, then bytes.
    items: list[bytes] = []
    offset = 0
    size = len(data)
    while offset < size:
        if offset + 4 > size:
            raise InvalidRequest(
                f"raw contents of BYTES input {spec.name!r} end inside a length prefix; each "
                "element is a 4-byte little-endian length followed by that many bytes"
            )
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > size:
            raise InvalidRequest(
                f"raw contents of BYTES input {spec.name!r}: element {len(items)} claims "
                f"{length} bytes but only {size - offset} remain"
            )
        items.append(data[offset : offset + length])
        offset += length
    count = _count(shape)
    if len(items) != count:
        raise InvalidRequest(
            f"raw contents of BYTES input {spec.name!r} hold {len(items)} elements but shape "
            f"{list(shape)} needs {count}"
        )
    return _string_array(items, shape)


def _string_array(items: Sequence[bytes], shape: tuple[int, ...]) -> Array:
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = [b.decode("utf-8", errors="replace") for b in items]
    return arr.reshape(shape)


def _from_typed(spec: InputSpec, shape: tuple[int, ...], contents: pb.InferTensorContents) -> Array:
    field_name = TYPED_CONTENTS_FIELD.get(spec.datatype)
    if field_name is None:
        raise InvalidRequest(
            f"input {spec.name!r} is {spec.datatype}, which the protocol carries only as raw "
            "bytes; send it in raw_input_contents"
        )
    values = getattr(contents, field_name)
    count = _count(shape)
    if len(values) != count:
        raise InvalidRequest(
            f"input {spec.name!r} has {len(values)} values in contents.{field_name} but shape "
            f"{list(shape)} needs {count}"
        )
    others = [
        f
        for f in set(TYPED_CONTENTS_FIELD.values())
        if f != field_name and len(getattr(contents, f))
    ]
    if others:
        raise InvalidRequest(
            f"input {spec.name!r} is {spec.datatype}: put its values in contents.{field_name}, "
            f"not in contents.{', contents.'.join(sorted(others))}"
        )
    if spec.datatype == "BYTES":
        return _string_array(list(values), shape)
    try:
        # list() first: numpy reads a protobuf repeated field element by element, ~30x slower.
        return np.asarray(list(values), dtype=spec.dtype).reshape(shape)
    except OverflowError:
        raise InvalidRequest(
            f"input {spec.name!r} has values outside the range of {spec.datatype}"
        ) from None


def _requested_outputs(
    plan: ModelPlan,
    requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> tuple[str, ...]:
    if not requested:
        return plan.output_names
    names: list[str] = []
    for out in requested:
        if out.name not in plan.output_datatypes:
            raise InvalidRequest(
                f"model {plan.model.name!r} has no output named {out.name!r}; "
                f"its outputs are {_listing(plan.output_names)}"
            )
        if out.name in names:
            raise InvalidRequest(f"output {out.name!r} is requested more than once")
        names.append(out.name)
    return tuple(names)


# Parameters of an output placed in shared memory: echoed on its tensor in the answer.
Placed = Mapping[str, Mapping[str, str | int]]


def encode_response(
    plan: ModelPlan,
    request: pb.ModelInferRequest,
    decoded: DecodedRequest,
    results: Sequence[Array],
    datatypes: Mapping[str, str] | None = None,
    placed: Placed | None = None,
) -> pb.ModelInferResponse:
    """The answer to `request`: raw_output_contents (as Triton answers), or typed contents
    when the request sent typed contents. `datatypes` overrides the model's datatype of some
    outputs (BYTES for classification results). Outputs in `placed` were written to shared
    memory: their tensors carry its parameters and no contents (an empty raw entry keeps the
    others at their index, as Triton answers)."""
    response = pb.ModelInferResponse(
        model_name=plan.model.name, model_version=plan.version, id=request.id
    )
    outputs = response.outputs
    datatypes = {**plan.output_datatypes, **(datatypes or {})}
    placed = placed or {}
    if decoded.typed:
        for name, array in zip(decoded.output_names, results, strict=True):
            datatype = datatypes[name]
            tensor = outputs.add(name=name, datatype=datatype, shape=array.shape)
            where = placed.get(name)
            if where is None:
                _fill_typed(tensor.contents, datatype, array)
            else:
                _echo(tensor.parameters, where)
    else:
        raw = response.raw_output_contents
        for name, array in zip(decoded.output_names, results, strict=True):
            datatype = datatypes[name]
            tensor = outputs.add(name=name, datatype=datatype, shape=array.shape)
            where = placed.get(name)
            if where is None:
                raw.append(to_raw(datatype, array))
            else:
                _echo(tensor.parameters, where)
                raw.append(b"")
    return response


def _echo(parameters: Mapping[str, pb.InferParameter], values: Mapping[str, str | int]) -> None:
    for key, value in values.items():
        if isinstance(value, str):
            parameters[key].string_param = value
        else:
            parameters[key].int64_param = value


def to_raw(datatype: str, array: Array) -> bytes:
    """An output's bytes as the protocol carries them raw (BYTES: length-prefixed)."""
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if array.dtype != dtype:
        array = array.astype(dtype)
    return array.tobytes()


def raw_view(datatype: str, array: Array) -> bytes | memoryview:
    """An output's raw bytes without a copy where it can (BYTES: length-prefixed)."""
    if datatype == "BYTES":
        return to_raw(datatype, array)
    return np.ascontiguousarray(array, dtype=DATATYPE_TO_NUMPY[datatype]).data.cast("B")


def _fill_typed(contents: pb.InferTensorContents, datatype: str, array: Array) -> None:
    field_name = TYPED_CONTENTS_FIELD.get(datatype)
    if field_name is None:
        # FP16 outputs have no typed field; widen to FP32 would change the datatype, so the
        # protocol leaves raw as the only way: refuse with a message that says so.
        raise InvalidRequest(
            f"the model answers {datatype}, which the protocol carries only as raw bytes; "
            "send the inputs in raw_input_contents to get raw outputs"
        )
    values = getattr(contents, field_name)
    flat = array.reshape(-1)
    if datatype == "BYTES":
        values.extend(
            item if isinstance(item, bytes) else str(item).encode("utf-8") for item in flat
        )
    else:
        values.extend(flat.tolist())
