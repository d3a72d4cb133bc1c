"""Tensor element types as the Open Inference Protocol names them, and numpy conversions.

Shared by the agent's inference server, the cloud's golden samples and the clients.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from edgefleet.core.errors import InvalidArgument

# OIP datatype name -> numpy dtype (little-endian, as the protocol's raw contents are).
DATATYPE_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_DATATYPE: dict[np.dtype[np.generic], str] = {
    v: k for k, v in DATATYPE_TO_NUMPY.items() if k != "BYTES"
}

# OIP datatype -> the field of InferTensorContents that carries it when sent typed. FP16
# has no typed field in the protocol: it travels only as raw bytes.
TYPED_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# ONNX Runtime's type strings ("tensor(float)") -> OIP datatype.
ORT_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(DATATYPE_TO_NUMPY)
        raise InvalidArgument(f"unknown datatype {datatype!r}; use one of {known}") from None


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[np.dtype(dtype)]
    except KeyError:
        raise InvalidArgument(
            f"numpy dtype {array.dtype} has no Open Inference Protocol type"
        ) from None


def to_raw(array: npt.NDArray[np.generic]) -> bytes:
    """Row-major little-endian bytes of a numeric array."""
    dtype = numpy_dtype(datatype_of(array))
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_raw(
    data: bytes, datatype: str, shape: list[int] | tuple[int, ...]
) -> npt.NDArray[np.generic]:
    """The array that raw bytes hold, checking their size against datatype and shape."""
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        raise InvalidArgument("BYTES tensors cannot be decoded from raw bytes here")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"shape {list(shape)} has a negative dimension")
    # Python's ints: numpy's int64 product wraps ([2**32, 2**32] counted 0 elements).
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as err:  # no elements, but a dimension numpy cannot index
        raise InvalidArgument(f"shape {list(shape)} cannot be made: {err}") from None


# Where an ONNX artifact carries its class names (index i names output class i): a JSON list
# in the model's metadata_props, written by the compiler and read by the agent.
CLASS_NAMES_KEY = "edgefleet.class_names"


def parse_class_names(value: str) -> tuple[str, ...]:
    """The class names a CLASS_NAMES_KEY value holds; () when it is not a JSON list."""
    import json

    try:
        names = json.loads(value)
    except ValueError:
        return ()
    return tuple(str(n) for n in names) if isinstance(names, list) else ()
