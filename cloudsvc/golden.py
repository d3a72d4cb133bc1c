"""Golden samples made by running the model: the device's smoke test compares its own
outputs on these inputs against the cloud's, within tolerances. They are written as files
of the artifact (edgefleet.core.golden)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from cloudsvc.errors import BadModel
from edgefleet.core.golden import Arrays
from edgefleet.core.tensors import ORT_TO_DATATYPE, numpy_dtype

# Every device downloads the golden samples of each version it installs: samples beyond
# this many bytes in all are left out.
GOLDEN_BYTES_BUDGET = 3 << 20


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


def pair_bytes(inputs: Arrays, outputs: Arrays) -> int:
    return sum(a.nbytes for a in (*inputs.values(), *outputs.values()))


def make_golden_samples(
    session: ort.InferenceSession, seed: int = 0
) -> list[tuple[Arrays, Arrays]]:
    """(inputs, outputs) of seeded random inputs and what this session gives for them.

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
    if any(ORT_TO_DATATYPE.get(o.type, "") in ("", "BYTES") for o in outputs_meta):
        return []
    samples: list[tuple[Arrays, Arrays]] = []
    used = 0
    for batch in batches:
        feed: Arrays = {}
        for meta, datatype, shape in zip(inputs, datatypes, shapes, strict=True):
            concrete = [
                batch if (n == 0 and d == -1) else (1 if d == -1 else d)
                for n, d in enumerate(shape)
            ]
            feed[meta.name] = _random_input(rng, datatype, concrete)
        # A sample's inputs alone over budget: do not even run the model on them.
        if used + sum(a.nbytes for a in feed.values()) > GOLDEN_BYTES_BUDGET:
            break
        try:
            results = session.run(None, feed)
        except Exception as err:
            raise BadModel(
                f"the model failed on random inputs of its declared shapes ({err}); "
                "push golden samples made from real inputs"
            ) from None
        outputs = {m.name: np.asarray(v) for m, v in zip(outputs_meta, results, strict=True)}
        used += pair_bytes(feed, outputs)
        if used > GOLDEN_BYTES_BUDGET:
            break
        samples.append((feed, outputs))
    return samples
