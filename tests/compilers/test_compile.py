"""compile_target end to end on small graphs, and the checks it makes before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compilers.compile import compile_target
from compilers.errors import CompileError, UnknownTargetError
from compilers.layout import external_files
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
