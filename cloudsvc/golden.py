"""Golden samples made by running the model: the device's smoke test compares its own
outputs on these inputs against the cloud's, within tolerances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from cloudsvc.errors import BadModel
from edgefleet.core.tensors import ORT_TO_DATATYPE, datatype_of, numpy_dtype, to_raw
from protos.artifact.v1 import artifact_pb2

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
# Golden samples travel inside the manifest, which devices fetch in one message (gRPC's
# default receive limit is 4 MiB): samples beyond this many bytes in all are left out.
GOLDEN_BYTES_BUDGET = 3 << 20


def sample_bytes(sample: artifact_pb2.GoldenSample) -> int:
    return sum(len(t.data) for t in [*sample.inputs, *sample.outputs])


def cpu_session(path: Path) -> ort.InferenceSession:
    """A one-thread CPU session; BadModel naming ONNX Runtime's reason if it does not load."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises several private types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadModel(
            f"ONNX Runtime cannot load the uploaded model: {reason}. Check that the file is a "
            "complete ONNX model, or push with skip_verify if only the device can load it"
        ) from None


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _random_input(
    rng: np.random.Generator, datatype: str, shape: list[int]
) -> npt.NDArray[np.generic]:
    dtype = numpy_dtype(datatype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raise BadModel(f"cannot make golden inputs of type {datatype}; push golden samples with it")


def _tensor(name: str, array: npt.NDArray[np.generic], datatype: str) -> artifact_pb2.TensorValue:
    return artifact_pb2.TensorValue(
        name=name, datatype=datatype, shape=list(array.shape), data=to_raw(array)
    )


def make_golden_samples(
    session: ort.InferenceSession,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> list[artifact_pb2.GoldenSample]:
    """Samples of seeded random inputs with the outputs this session gives for them.

    Dynamic dimensions become 1; when every input's first dimension is dynamic a second
    sample with batch 2 checks that batching works on the device too. Models whose inputs
    include strings get no samples (nothing sensible to invent), and samples are kept only
    while their bytes fit GOLDEN_BYTES_BUDGET.
    """
    inputs = session.get_inputs()
    datatypes = [ORT_TO_DATATYPE.get(i.type, "") for i in inputs]
    if any(dt in ("", "BYTES") for dt in datatypes):
        return []
    shapes = [_dims(list(i.shape)) for i in inputs]
    batches = [1]
    if shapes and all(s and s[0] == -1 for s in shapes):
        batches.append(2)
    rng = np.random.default_rng(seed)
    outputs_meta = session.get_outputs()
    samples: list[artifact_pb2.GoldenSample] = []
    for batch in batches:
        # A sample's inputs alone over budget: do not even run the model on them.
        feed_bytes = sum(
            numpy_dtype(dt).itemsize
            * int(np.prod([batch if (n == 0 and d == -1) else max(d, 1) for n, d in enumerate(sh)]))
            for dt, sh in zip(datatypes, shapes, strict=True)
        )
        if feed_bytes > GOLDEN_BYTES_BUDGET:
            break
        feed: dict[str, npt.NDArray[np.generic]] = {}
        for meta, datatype, shape in zip(inputs, datatypes, shapes, strict=True):
            concrete = [
                batch if (n == 0 and d == -1) else (1 if d == -1 else d)
                for n, d in enumerate(shape)
            ]
            feed[meta.name] = _random_input(rng, datatype, concrete)
        try:
            results = session.run(None, feed)
        except Exception as err:
            raise BadModel(
                f"the model failed on random inputs of its declared shapes ({err}); "
                "push golden samples made from real inputs"
            ) from None
        sample = artifact_pb2.GoldenSample(rtol=rtol, atol=atol)
        for meta, datatype in zip(inputs, datatypes, strict=True):
            sample.inputs.append(_tensor(meta.name, feed[meta.name], datatype))
        for meta, value in zip(outputs_meta, results, strict=True):
            array = np.asarray(value)
            datatype = ORT_TO_DATATYPE.get(meta.type, "")
            if datatype in ("", "BYTES"):
                return []
            sample.outputs.append(_tensor(meta.name, array, datatype))
        if sum(map(sample_bytes, samples)) + sample_bytes(sample) > GOLDEN_BYTES_BUDGET:
            break
        samples.append(sample)
    return samples


def golden_from_outputs(
    feeds: list[dict[str, npt.NDArray[np.generic]]],
    outputs: list[dict[str, npt.NDArray[np.generic]]],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> list[artifact_pb2.GoldenSample]:
    """Samples from real inputs and the outputs a model gave for them (one per feed),
    kept while they fit GOLDEN_BYTES_BUDGET."""
    samples: list[artifact_pb2.GoldenSample] = []
    used = 0
    for feed, result in zip(feeds, outputs, strict=True):
        sample = artifact_pb2.GoldenSample(rtol=rtol, atol=atol)
        for name, array in feed.items():
            sample.inputs.append(_tensor(name, np.ascontiguousarray(array), datatype_of(array)))
        for name, array in result.items():
            sample.outputs.append(_tensor(name, np.ascontiguousarray(array), datatype_of(array)))
        used += sample_bytes(sample)
        if used > GOLDEN_BYTES_BUDGET:
            break
        samples.append(sample)
    return samples
