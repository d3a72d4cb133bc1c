"""compile_target end to end on small graphs, and the checks it makes before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from compilers.compile import compile_target, source_class_names
from compilers.errors import CompileError, UnknownTargetError
from compilers.layout import external_files
from edgefleet.core.tensors import CLASS_NAMES_KEY
from tests.compilers.models import agreement, conv_model, images, run


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return conv_model(tmp_path / "src" / "model.onnx")


def test_cpu_fp32_artifact_is_optimised_laid_out_and_measured(cnn: Path, tmp_path: Path) -> None:
    x = images(40)
    artifact = compile_target(cnn, "onnx-cpu-fp32", tmp_path / "out", evaluate=agreement(cnn, x))
    assert artifact.entrypoint == tmp_path / "out" / "model.onnx"
    files = {artifact.folder / f for f in artifact.files}
    assert files == {artifact.entrypoint, *external_files(artifact.entrypoint)}
    assert {p for p in (tmp_path / "out").iterdir()} == files
    assert artifact.target == "onnx-cpu-fp32" and artifact.format == "onnx"
    np.testing.assert_allclose(run(artifact.entrypoint, x), run(cnn, x), rtol=1e-4, atol=1e-5)
    assert artifact.metrics["accuracy_drop"] == 0.0
    assert artifact.metrics["size_bytes"] > 0
    assert artifact.steps == ("optimize-extended",)


def test_cpu_int8_artifact_uses_static_qdq_for_a_cnn(cnn: Path, tmp_path: Path) -> None:
    artifact = compile_target(
        cnn,
        "onnx-cpu-int8",
        tmp_path / "out",
        calibration=images(64),
        evaluate=agreement(cnn, images(200, seed=2)),
        max_accuracy_drop=0.1,
    )
    assert artifact.steps == ("int8-static-qdq-per-channel",)
    assert artifact.metrics["accuracy_drop"] <= 0.1
    assert run(artifact.entrypoint, images(2)).shape == (2, 4)


def test_class_names_travel_in_metadata_props_deterministically(cnn: Path, tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    builds = [
        compile_target(cnn, target, tmp_path / f"{target}-{i}", class_names=names, **extra(cnn))
        for target in ("onnx-cpu-fp32", "onnx-cpu-int8")
        for i in (1, 2)
    ]
    for build in builds:
        meta = ort.InferenceSession(
            str(build.entrypoint), providers=["CPUExecutionProvider"]
        ).get_modelmeta()
        assert json.loads(meta.custom_metadata_map[CLASS_NAMES_KEY]) == names
        assert source_class_names(build.entrypoint) == names
    for first, second in (builds[0:2], builds[2:4]):  # the same weights, the same bytes
        assert first.entrypoint.read_bytes() == second.entrypoint.read_bytes()
    # recompiling a compiled model keeps the names its metadata holds
    again = compile_target(builds[0].entrypoint, "onnx-cpu-fp32", tmp_path / "again")
    assert source_class_names(again.entrypoint) == names


def extra(cnn: Path) -> dict[str, Any]:
    return {
        "calibration": images(64),
        "evaluate": agreement(cnn, images(100, seed=2)),
        "max_accuracy_drop": 1.0,
    }


def test_gpu_fp16_artifact_is_built_on_a_cpu_machine(cnn: Path, tmp_path: Path) -> None:
    artifact = compile_target(
        cnn, "onnx-gpu-fp16", tmp_path / "out", evaluate=agreement(cnn, images(40))
    )
    assert artifact.steps == ("optimize-basic", "fp16")
    assert artifact.metrics["size_bytes"] < artifact.metrics["source_size_bytes"]


def test_checks_before_any_work(cnn: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownTargetError):
        compile_target(cnn, "onnx-cpu-int4", tmp_path / "a")
    with pytest.raises(CompileError, match="evaluate="):
        compile_target(cnn, "onnx-cpu-int8", tmp_path / "b", calibration=images(8))
    with pytest.raises(CompileError, match="calibration="):
        compile_target(cnn, "onnx-cpu-int8", tmp_path / "c", evaluate=lambda _p: 1.0)
    with pytest.raises(CompileError, match="no ONNX model"):
        compile_target(tmp_path / "missing.onnx", "onnx-cpu-fp32", tmp_path / "d")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.bin").write_bytes(b"x")
    with pytest.raises(CompileError, match="not empty"):
        compile_target(cnn, "onnx-cpu-fp32", busy)
    assert not any((tmp_path / name).exists() for name in "abcd")
