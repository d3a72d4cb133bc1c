"""torch -> ONNX: byte-stable per-tensor layout, and parity checked in a subprocess."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from compilers.errors import CompileError, ParityError
from compilers.export import check_parity, export_onnx
from transfer.models import SmallCNN

torch.set_num_threads(1)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(4, width=8).eval()


SAMPLE = torch.zeros(1, 3, 32, 32)


def test_same_weights_give_identical_bytes_and_a_head_change_touches_only_the_head(
    model: SmallCNN, tmp_path: Path
) -> None:
    first = export_onnx(model, SAMPLE, tmp_path / "a" / "model.onnx", external_data=True)
    again = export_onnx(model, SAMPLE, tmp_path / "b" / "model.onnx", external_data=True)
    assert _digests(first.parent) == _digests(again.parent)
    assert len(_digests(first.parent)) > 2, "each initializer should have its own file"

    with torch.no_grad():
        model.head.weight.add_(0.5)
    try:
        changed = export_onnx(model, SAMPLE, tmp_path / "c" / "model.onnx", external_data=True)
    finally:
        with torch.no_grad():
            model.head.weight.sub_(0.5)
    before, after = _digests(first.parent), _digests(changed.parent)
    assert before.keys() == after.keys()
    differ = sorted(name for name in before if before[name] != after[name])
    assert differ and all("head" in name for name in differ), differ


def test_exported_model_matches_torch_with_a_dynamic_batch(model: SmallCNN, tmp_path: Path) -> None:
    path = export_onnx(model, SAMPLE, tmp_path / "model.onnx", external_data=True)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    report = check_parity(model, path, [x[:1], x])
    assert max(report.max_abs_diff.values()) < 1e-3


def test_parity_failure_names_the_output_and_the_difference(
    model: SmallCNN, tmp_path: Path
) -> None:
    path = export_onnx(model, SAMPLE, tmp_path / "model.onnx")
    other = SmallCNN(4, width=8).eval()  # different random weights than the export
    x = np.ones((1, 3, 32, 32), np.float32)
    with pytest.raises(ParityError) as err:
        check_parity(other, path, [x])
    assert "output" in str(err.value)


def test_torchscript_exporter_cannot_give_stable_external_data(
    model: SmallCNN, tmp_path: Path
) -> None:
    with pytest.raises(CompileError, match="dynamo"):
        export_onnx(model, SAMPLE, tmp_path / "m.onnx", external_data=True, dynamo=False)
