"""Load a verified version in ONNX Runtime and smoke-test it on its golden samples.

Nothing is published before this passes: a version that does not load, or whose outputs
differ from the manifest's golden outputs beyond the sample's tolerance, is rejected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import ArtifactRejected
from agent.runtime import LoadedModel, SessionOptions, load_model
from edgefleet.core.golden import read_sample
from edgefleet.core.manifests import golden_refs
from protos.artifact.v1 import artifact_pb2


def smoke_test(model: LoadedModel, manifest: artifact_pb2.Manifest, folder: Path) -> int:
    """Run every golden sample (files of the verified artifact in `folder`); raise
    ArtifactRejected naming the first mismatch. Returns the number of samples checked."""
    label = f"{manifest.model} v{manifest.version}"
    for index, sample in enumerate(golden_refs(manifest)):
        try:
            feeds, expected = read_sample(folder, sample)
        except Exception as err:  # a corrupt TensorSet raises protobuf's and numpy's errors too
            raise ArtifactRejected(f"{label}: golden sample {index} is malformed: {err}") from None
        try:
            outputs = model.run(feeds, list(expected))
        except Exception as err:  # ORT raises its own types for bad feeds
            raise ArtifactRejected(
                f"{label}: golden sample {index} failed to run: {type(err).__name__}: {err}"
            ) from None
        for (name, want), got in zip(expected.items(), outputs, strict=True):
            got_arr = np.asarray(got)
            if got_arr.shape != want.shape:
                raise ArtifactRejected(
                    f"{label}: golden sample {index} output {name!r} has shape "
                    f"{list(got_arr.shape)}, expected {list(want.shape)}"
                )
            rtol, atol = sample.rtol, sample.atol
            if not np.allclose(got_arr, want, rtol=rtol, atol=atol, equal_nan=True):
                diff = np.abs(got_arr.astype(np.float64) - want.astype(np.float64))
                worst = float(np.nanmax(diff)) if diff.size else 0.0
                raise ArtifactRejected(
                    f"{label}: golden sample {index} output {name!r} differs from the expected "
                    f"value by up to {worst:.6g} (rtol={rtol:g}, atol={atol:g}); not activated"
                )
    return len(manifest.golden)


def load_and_check(
    manifest: artifact_pb2.Manifest, digest: str, folder: Path, options: SessionOptions
) -> LoadedModel:
    """The version loaded in ONNX Runtime, after its golden samples pass."""
    if manifest.format and manifest.format != "onnx":
        raise ArtifactRejected(
            f"{manifest.model} v{manifest.version} has format {manifest.format!r}; this agent runs onnx"
        )
    if not manifest.entrypoint:
        raise ArtifactRejected(
            f"{manifest.model} v{manifest.version}: the manifest names no entrypoint"
        )
    path = folder / manifest.entrypoint
    if not path.is_file():
        raise ArtifactRejected(
            f"{manifest.model} v{manifest.version}: entrypoint {manifest.entrypoint} is not among its files"
        )
    model = load_model(manifest.model, manifest.version, digest, path, options)
    smoke_test(model, manifest, folder)
    return model
