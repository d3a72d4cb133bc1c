"""Static INT8 of a CNN with BatchNorm as torch exports it: BN folded, integer convolutions
in the graph ONNX Runtime runs, sensitive layers kept in FP32, stratified samples, and a
gate that states its held-out n and confidence interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch
from torch import nn

from compilers.errors import AccuracyDropError
from compilers.export import export_onnx
from compilers.fold import fold_file
from compilers.quantize import (
    AccuracyChange,
    integer_conv_census,
    op_census,
    quantize_int8,
)
from compilers.sampling import Score, stratified_sample, wilson_interval
from tests.compilers.models import run


class BNNet(nn.Module):
    """Conv(no bias) -> BN -> ReLU6 blocks, the EfficientNet-Lite pattern, and a head."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out, stride in ((width, 2), (width, 1), (2 * width, 2)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU6(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x).mean(dim=(2, 3)))
        return out


def images(count: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(count, 3, 24, 24)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[BNNet, Path]:
    torch.manual_seed(0)
    model = BNNet()
    with torch.no_grad():  # BN statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    path = tmp_path_factory.mktemp("bnnet") / "src" / "model.onnx"
    export_onnx(model, torch.from_numpy(images(1, 0)), path, external_data=True)
    return model, path


def test_export_keeps_batchnorm_and_the_fold_removes_it_within_tolerance(
    exported: tuple[BNNet, Path], tmp_path: Path
) -> None:
    model, source = exported
    assert op_census(source)["BatchNormalization"] == 3  # what the exporter leaves
    report = fold_file(source, tmp_path / "folded.onnx")
    assert (report.batchnorms_folded, report.batchnorms_left) == (3, 0)
    census = op_census(tmp_path / "folded.onnx")
    assert census["BatchNormalization"] == 0 and census["Conv"] == 3
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    inits = {t.name for t in folded.graph.initializer}
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert all(len(n.input) == 3 and n.input[2] in inits for n in convs)  # constant biases
    x = images(8, 1)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(tmp_path / "folded.onnx", x), want, rtol=1e-4, atol=1e-4)


def _agreement(model: BNNet, x: npt.NDArray[np.float32]) -> object:
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy().argmax(1)

    def evaluate(path: Path) -> Score:
        correct = run(path, x).argmax(1) == want
        return Score(float(correct.mean()), correct)

    return evaluate


def test_static_int8_runs_integer_convolutions_and_states_its_interval(
    exported: tuple[BNNet, Path], tmp_path: Path
) -> None:
    model, source = exported
    held_out = images(300, 7)  # never used for calibration
    with torch.no_grad():
        want = model(torch.from_numpy(held_out)).numpy().argmax(1)

    def evaluate(path: Path) -> Score:
        correct = run(path, held_out).argmax(1) == want
        return Score(float(correct.mean()), correct)

    result = quantize_int8(
        source, tmp_path / "int8.onnx", evaluate=evaluate, calibration=images(64, 3)
    )
    assert result.batchnorms_folded == 3
    assert "BatchNormalization" not in op_census(result.path)
    assert integer_conv_census(result.path) == (3, 0)
    assert (result.integer_convs, result.float_convs) == (3, 0)
    assert result.calibration_examples == 64
    change = result.accuracy
    assert change.baseline == 1.0 and change.n == 300
    assert change.candidate_interval is not None and change.drop_interval is not None
    low, high = change.candidate_interval
    assert low <= change.candidate <= high
    assert "n=300" in change.describe()


def test_layers_are_kept_in_fp32_by_measured_error_until_the_gate_passes(
    exported: tuple[BNNet, Path], tmp_path: Path
) -> None:
    _, source = exported

    def evaluate(path: Path) -> float:
        # a stand-in accuracy: the gate passes only with a float convolution left
        if path == source:
            return 0.9
        return 0.9 if integer_conv_census(path)[1] else 0.8

    result = quantize_int8(
        source, tmp_path / "int8.onnx", evaluate=evaluate, calibration=images(32, 3)
    )
    # kept most sensitive first (here the head, then a convolution), until the gate passed
    assert 1 <= len(result.kept_fp32) <= 4
    assert result.method.endswith(f"-fp32-{len(result.kept_fp32)}")
    assert integer_conv_census(result.path) == (2, 1)
    assert result.accuracy.drop == 0.0

    with pytest.raises(AccuracyDropError, match=r"95% CI of the drop .* on n=4"):
        quantize_int8(
            source,
            tmp_path / "refused.onnx",
            evaluate=lambda p: (
                Score(1.0, np.ones(4, bool)) if p == source else Score(0.5, np.arange(4) < 2)
            ),
            calibration=images(16, 3),
            keep_fp32=[],
        )
    assert not (tmp_path / "refused.onnx").exists()


def test_stratified_samples_take_every_class_from_class_sorted_data() -> None:
    labels = np.repeat(np.arange(10), 100)  # stored class by class, like image folders
    scored = stratified_sample(labels, 200, seed=0)
    assert scored.per_class == dict.fromkeys(range(10), 20)
    assert len(set(labels[scored.indices])) == 10
    assert scored.describe() == "200 examples, 20 per class for 10 classes"
    calibration = stratified_sample(labels, 50, seed=1, exclude=scored.indices)
    assert not set(calibration.indices) & set(scored.indices)
    assert set(labels[calibration.indices]) == set(range(10))
    uneven = stratified_sample(np.array([0] * 90 + [1] * 10), 20)
    assert uneven.per_class == {0: 18, 1: 2}
    tiny = stratified_sample(np.array([0, 0, 1, 2]), 100)
    assert len(tiny.indices) == 4


def test_intervals() -> None:
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    before = np.ones(1000, bool)
    after = np.arange(1000) >= 10  # 10 examples lost
    change = AccuracyChange.between(Score(1.0, before), Score(0.99, after))
    assert change.n == 1000 and change.drop == pytest.approx(0.01)
    assert change.drop_interval is not None
    assert change.drop_interval[0] < 0.01 < change.drop_interval[1]
    assert AccuracyChange.between(0.9, 0.8).drop_interval is None
