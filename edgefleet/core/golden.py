"""Golden samples as files of an artifact: what the cloud writes and the device's smoke test
reads (torch-free, ONNX Runtime-free).

A sample is two files, `golden/<n>.inputs.pb` and `golden/<n>.outputs.pb` (a serialized
TensorSet each), named in the manifest by a GoldenRef with its tolerances. Inputs and
expected outputs are apart so a version whose golden inputs are the same examples as its
parent's re-uses the parent's inputs chunk: only the new outputs travel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.core.tensors import datatype_of, from_raw, to_raw
from protos.artifact.v1 import artifact_pb2

GOLDEN_DIR = "golden"
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4

Arrays = dict[str, npt.NDArray[np.generic]]


@dataclass(frozen=True)
class GoldenRef:
    """One sample: the manifest paths of its inputs and expected outputs, and tolerances."""

    inputs: str
    outputs: str
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


def tensor_set_bytes(arrays: Mapping[str, npt.NDArray[np.generic]]) -> bytes:
    """Deterministic bytes of named arrays: equal arrays, equal bytes (so equal chunks)."""
    message = artifact_pb2.TensorSet()
    for name, array in arrays.items():
        contiguous = np.ascontiguousarray(array)
        message.tensors.add(
            name=name,
            datatype=datatype_of(contiguous),
            shape=list(contiguous.shape),
            data=to_raw(contiguous),
        )
    return message.SerializeToString(deterministic=True)


def tensors_from_bytes(data: bytes) -> Arrays:
    """The arrays :func:`tensor_set_bytes` wrote; InvalidArgument if they do not add up."""
    message = artifact_pb2.TensorSet()
    message.ParseFromString(data)
    return {t.name: from_raw(t.data, t.datatype, list(t.shape)) for t in message.tensors}


def sample_paths(index: int) -> tuple[str, str]:
    return f"{GOLDEN_DIR}/{index}.inputs.pb", f"{GOLDEN_DIR}/{index}.outputs.pb"


def write_samples(
    folder: Path,
    samples: list[
        tuple[Mapping[str, npt.NDArray[np.generic]], Mapping[str, npt.NDArray[np.generic]]]
    ],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> tuple[tuple[GoldenRef, ...], tuple[str, ...]]:
    """Write (inputs, outputs) pairs under folder/golden/; their refs and file paths."""
    refs: list[GoldenRef] = []
    files: list[str] = []
    (folder / GOLDEN_DIR).mkdir(parents=True, exist_ok=True)
    for index, (inputs, outputs) in enumerate(samples):
        inputs_path, outputs_path = sample_paths(index)
        (folder / inputs_path).write_bytes(tensor_set_bytes(inputs))
        (folder / outputs_path).write_bytes(tensor_set_bytes(outputs))
        refs.append(GoldenRef(inputs_path, outputs_path, rtol, atol))
        files += [inputs_path, outputs_path]
    return tuple(refs), tuple(files)


def read_sample(folder: Path, ref: GoldenRef) -> tuple[Arrays, Arrays]:
    """The inputs and expected outputs of one sample, from a verified artifact folder."""
    return (
        tensors_from_bytes((folder / ref.inputs).read_bytes()),
        tensors_from_bytes((folder / ref.outputs).read_bytes()),
    )


def inline_arrays(sample: artifact_pb2.GoldenSample) -> tuple[Arrays, Arrays]:
    """An inline sample (as a push carries it) as input and output arrays."""
    inputs = {t.name: from_raw(t.data, t.datatype, list(t.shape)) for t in sample.inputs}
    outputs = {t.name: from_raw(t.data, t.datatype, list(t.shape)) for t in sample.outputs}
    return inputs, outputs
