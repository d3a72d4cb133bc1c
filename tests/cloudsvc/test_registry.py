from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloudsvc.errors import BadModel, InvalidRequest, UnknownResource
from cloudsvc.registry import Registry
from cloudsvc.signing import RootKeys
from edgefleet.core.golden import read_sample
from edgefleet.core.manifests import all_chunks, file_chunks, golden_refs, verify_manifest
from protos.artifact.v1 import artifact_pb2

from .conftest import write_linear_model


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def test_push_records_a_signed_manifest_whose_chunks_rebuild_the_file(
    registry: Registry, keys: RootKeys, model_path: Path
) -> None:
    version = registry.push("clf", model_path, description="first", metadata={"lr": "0.1"})
    assert (version.model, version.version, version.description) == ("clf", 1, "first")
    assert version.source_sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert [(s.name, s.datatype, s.shape) for s in version.inputs] == [("x", "FP32", (-1, 4))]
    assert [(s.name, s.shape) for s in version.outputs] == [("probs", (-1, 3))]
    [artifact] = version.artifacts
    assert artifact.target == "onnx-cpu-fp32"

    signed = registry.signed_manifest(artifact.manifest_digest)
    manifest = verify_manifest(signed, keys.public_keys, artifact.manifest_digest)
    assert (manifest.model, manifest.version, manifest.format, manifest.entrypoint) == (
        "clf",
        1,
        "onnx",
        "model.onnx",
    )
    assert dict(manifest.metadata) == {"lr": "0.1"}
    chunks = all_chunks(manifest)
    assert len(chunks) > 1  # the fixture's chunk size is 64 bytes
    rebuilt = b"".join(registry.blobs.get(c.sha256) for c in file_chunks(manifest.files[0]))
    assert rebuilt == model_path.read_bytes()
    assert artifact.chunk_count == len(chunks)
    assert artifact.size_bytes == sum(f.size for f in manifest.files)  # the golden files too
    assert artifact.file_count == len(manifest.files) == 1 + 2 * len(manifest.golden)


def test_golden_samples_are_made_and_match_onnx_runtime(
    registry: Registry, model_path: Path, tmp_path: Path
) -> None:
    version = registry.push("clf", model_path)
    manifest = artifact_pb2.Manifest()
    manifest.ParseFromString(
        registry.signed_manifest(version.artifacts[0].manifest_digest).manifest
    )
    # The samples are files of the artifact, fetched like any other, inputs apart from
    # expected outputs.
    folder = tmp_path / "artifact"
    registry.materialize(version.artifacts[0].manifest_digest, folder)
    samples = [read_sample(folder, ref) for ref in golden_refs(manifest)]
    # Dynamic batch: one sample of batch 1 and one of batch 2.
    assert [inputs["x"].shape for inputs, _ in samples] == [(1, 4), (2, 4)]
    assert version.golden_sample_count == 2
    session = _session(model_path)
    for (inputs, expected), ref in zip(samples, golden_refs(manifest), strict=True):
        [got] = session.run(None, inputs)
        np.testing.assert_allclose(
            got, np.asarray(expected["probs"], np.float32), rtol=ref.rtol, atol=ref.atol
        )
        assert (ref.rtol, ref.atol) == (1e-3, 1e-4)


def test_given_golden_samples_are_kept(
    registry: Registry, model_path: Path, tmp_path: Path
) -> None:
    x = np.ones((1, 4), np.float32)
    [y] = _session(model_path).run(None, {"x": x})
    sample = artifact_pb2.GoldenSample(rtol=0.01, atol=0.001)
    sample.inputs.add(name="x", datatype="FP32", shape=[1, 4], data=x.tobytes())
    sample.outputs.add(name="probs", datatype="FP32", shape=[1, 3], data=y.tobytes())
    version = registry.push("clf", model_path, golden_samples=[sample])
    manifest = artifact_pb2.Manifest()
    manifest.ParseFromString(
        registry.signed_manifest(version.artifacts[0].manifest_digest).manifest
    )
    [ref] = golden_refs(manifest)
    assert (ref.rtol, ref.atol) == (0.01, 0.001)
    registry.materialize(version.artifacts[0].manifest_digest, tmp_path / "a")
    inputs, outputs = read_sample(tmp_path / "a", ref)
    assert np.array_equal(inputs["x"], x) and np.array_equal(outputs["probs"], y)

    broken = artifact_pb2.GoldenSample()
    broken.CopyFrom(sample)
    broken.inputs[0].data = b"short"
    with pytest.raises(InvalidRequest, match="golden sample 0"):
        registry.push("clf", model_path, golden_samples=[broken])


def test_versions_count_up_with_lineage_and_share_chunks(
    registry: Registry, model_path: Path, tmp_path: Path
) -> None:
    v1 = registry.push("clf", model_path)
    stored_after_v1 = len(registry.blobs._blobs)  # type: ignore[attr-defined]
    v2 = registry.push("clf", model_path, parent_version=1, description="same bytes")
    v3 = registry.push("clf", write_linear_model(tmp_path / "b.onnx", scale=2.0), parent_version=2)
    assert [v.version for v in registry.list_versions("clf")] == [1, 2, 3]
    assert (v2.parent_version, v3.parent_version) == (1, 2)
    assert registry.get_version("clf", 2) == v2
    # v2 has the same bytes as v1: only its manifest is new.
    assert v2.source_sha256 == v1.source_sha256
    assert len(registry.blobs._blobs) >= stored_after_v1 + 1  # type: ignore[attr-defined]
    model = registry.list_models()[0]
    assert (model.name, model.latest_version, model.version_count) == ("clf", 3, 3)


def test_unloadable_file_is_rejected_with_ort_reason(registry: Registry, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(BadModel, match="ONNX Runtime cannot load"):
        registry.push("clf", bad)
    assert registry.list_models() == []


def test_skip_verify_reads_the_signature_from_the_graph(
    registry: Registry, model_path: Path
) -> None:
    version = registry.push("clf", model_path, skip_verify=True, target="tensorrt-fp16")
    assert version.golden_sample_count == 0
    assert [(s.name, s.shape) for s in version.inputs] == [("x", (-1, 4))]
    assert version.artifacts[0].target == "tensorrt-fp16"


def test_bad_names_and_missing_things(registry: Registry, model_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="model name"):
        registry.push("Bad Name!", model_path)
    with pytest.raises(UnknownResource, match="parent version 4"):
        registry.push("clf", model_path, parent_version=4)
    with pytest.raises(UnknownResource, match="no model is named"):
        registry.list_versions("nope")
    registry.push("clf", model_path)
    with pytest.raises(UnknownResource, match="no version 9"):
        registry.get_version("clf", 9)
    with pytest.raises(UnknownResource):
        registry.signed_manifest("0" * 64)


def test_golden_samples_too_big_for_a_manifest_are_left_out(
    registry: Registry, tmp_path: Path
) -> None:
    from .test_services import _model_with_big_weights

    # 1M floats in and out: 8 MB per sample, over the 3 MiB budget.
    registry.chunk_size = 1 << 20
    version = registry.push("big", _model_with_big_weights(tmp_path / "big.onnx", 1 << 20))
    assert version.golden_sample_count == 0
    signed = registry.signed_manifest(version.artifacts[0].manifest_digest)
    assert len(signed.manifest) < 4 << 10
