"""Save an ONNX model with every initializer in its own external-data file.

File names derive from the tensor names (state_dict names after a dynamo export), so two
saves of the same weights are byte-identical and a fine-tune that changes only some tensors
changes only their files: content-addressed chunking then ships just those.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

from compilers.errors import CompileRefused

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 120
TENSOR_SUFFIX = ".bin"
_INLINE_INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})
_INLINE_INT_BYTES = 4096


def tensor_file_name(tensor_name: str) -> str:
    """A portable file name for a tensor: its own name when safe, else a sanitised name
    with a short digest of the original so that distinct tensors never share a file."""
    safe = _UNSAFE.sub("_", tensor_name).lstrip(".") or "tensor"
    if safe != tensor_name or len(safe) > _MAX_STEM:
        digest = hashlib.sha256(tensor_name.encode()).hexdigest()[:10]
        safe = f"{safe[:_MAX_STEM]}-{digest}"
    return safe + TENSOR_SUFFIX


def _stays_inline(tensor: onnx.TensorProto, dequantized: set[str]) -> bool:
    """Empty tensors, and small integer tensors (shapes, axes, indices) that shape
    inference must read while loading: ORT refuses to load a graph whose shape-defining
    inputs live in external files. Neither is weights a fine-tune changes. Integer
    tensors that a DequantizeLinear reads are weights (INT8 biases are INT32, recalibrated
    with every version): inline, they would change the graph file itself."""
    if not tensor.raw_data:
        return True
    if tensor.name in dequantized:
        return False
    return tensor.data_type in _INLINE_INT_TYPES and len(tensor.raw_data) <= _INLINE_INT_BYTES


def _dequantized(graph: onnx.GraphProto) -> set[str]:
    return {
        name
        for sub in _graphs(graph)
        for node in sub.node
        if node.op_type == "DequantizeLinear"
        for name in node.input
    }


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)


def save_per_tensor(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `model` to `path` with each initializer in its own file beside it (except
    empty tensors and small integer ones, see `_stays_inline`).

    `model` must hold its weights in memory (as `onnx.load` returns it); it is not
    modified. Returns the files written, the graph first. Tensor files are overwritten,
    never appended to, so re-saving into the same folder is safe.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = [path]
    used: set[str] = set()
    dequantized = _dequantized(model.graph)
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise CompileRefused(
                    f"initializer {tensor.name!r} still points at external data: load the "
                    "model with its weights (onnx.load with load_external_data=True) first"
                )
            if not tensor.HasField("raw_data"):
                # typed fields (float_data, ...) -> raw bytes, so every tensor is a file
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            data = tensor.raw_data
            if _stays_inline(tensor, dequantized):
                continue
            location = tensor_file_name(tensor.name)
            if location.lower() in used:  # e.g. "a.w" vs "A.w" on a case-insensitive disk
                digest = hashlib.sha256(tensor.name.encode()).hexdigest()[:10]
                location = f"{location.removesuffix(TENSOR_SUFFIX)}-{digest}{TENSOR_SUFFIX}"
            used.add(location.lower())
            target = directory / location
            target.write_bytes(data)
            # set_external_data insists the bytes are still there; drop them afterwards.
            set_external_data(tensor, location, offset=0, length=len(data))
            tensor.ClearField("raw_data")
            written.append(target)
    try:
        onnx.save_model(model, str(path))
    except ValueError as err:  # the graph itself (without weights) is over protobuf's 2 GB
        raise CompileRefused(f"could not save the ONNX graph to {path}: {err}") from err
    return written


def external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model at `path` references (sorted, unique)."""
    model = onnx.load(str(path), load_external_data=False)
    found: set[Path] = set()
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        found.add(path.parent / entry.value)
    return sorted(found)
