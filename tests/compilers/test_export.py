"""Byte-stable export and the parity check, on a tiny torch CNN (one thread)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compilers.errors import CompileError, ParityError
from compilers.export import export_onnx
from compilers.layout import external_files
from compilers.parity import Tolerance, check_parity
from transfer.models import SmallCNN

torch.set_num_threads(1)


def tiny_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(num_classes=4, width=4).eval()


def sample() -> torch.Tensor:
    return torch.zeros(1, 3, 32, 32)


def files_by_name(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights exported twice, and once more after a change to the head only."""
    root = tmp_path_factory.mktemp("exports")
    model = tiny_cnn()
    first = export_onnx(model, sample(), root / "a" / "model.onnx", external_data=True)
    second = export_onnx(model, sample(), root / "b" / "model.onnx", external_data=True)
    with torch.no_grad():
        model.head.weight.mul_(1.5)
        model.head.bias.add_(0.25)
    head_only = export_onnx(model, sample(), root / "c" / "model.onnx", external_data=True)
    return {"first": first, "second": second, "head_only": head_only}


def test_two_exports_of_the_same_weights_are_byte_identical(exports: dict[str, Path]) -> None:
    first, second = files_by_name(exports["first"].parent), files_by_name(exports["second"].parent)
    assert first == second
    # one file per state_dict tensor, named after it, beside the graph
    assert set(first) == {"model.onnx"} | {f"{k}.bin" for k in tiny_cnn().state_dict()}


def test_a_head_only_change_rewrites_only_the_head_files(exports: dict[str, Path]) -> None:
    before, after = (
        files_by_name(exports["first"].parent),
        files_by_name(exports["head_only"].parent),
    )
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"head.weight.bin", "head.bias.bin"}


def test_external_data_export_is_valid_and_references_every_tensor_file(
    exports: dict[str, Path],
) -> None:
    path = exports["first"]
    onnx.checker.check_model(str(path), full_check=True)
    assert {p.name for p in external_files(path)} == {
        p.name for p in path.parent.iterdir() if p.suffix == ".bin"
    }
    graph = onnx.load(str(path), load_external_data=False).graph
    assert all(not node.metadata_props for node in graph.node)  # no checkout paths inside


def test_external_data_export_matches_torch(exports: dict[str, Path]) -> None:
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    report = check_parity(tiny_cnn(), exports["first"], [x[:1], x])
    assert set(report.max_abs_diff) == {"output"}
    assert report.max_abs_diff["output"] < 1e-4
    (output,) = report.outputs
    assert output.mismatched == 0 and output.total == 6 * 4


def test_parity_failure_names_the_output_and_the_worst_difference(
    exports: dict[str, Path],
) -> None:
    changed = tiny_cnn()
    with torch.no_grad():
        changed.head.bias[2] += 0.5
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(ParityError) as err:
        check_parity(changed, exports["first"], [x])
    message = str(err.value)
    assert "'output'" in message
    assert "up to 0.5" in message
    assert "2 of 8 values" in message


def test_a_per_output_tolerance_can_accept_a_known_difference(exports: dict[str, Path]) -> None:
    changed = tiny_cnn()
    with torch.no_grad():
        changed.head.bias[2] += 0.5
    x = np.zeros((2, 3, 32, 32), np.float32)
    report = check_parity(
        changed, exports["first"], [x], tolerances={"output": Tolerance(rtol=0.0, atol=0.6)}
    )
    assert report.outputs[0].tolerance == Tolerance(0.0, 0.6)
    assert report.max_abs_diff["output"] == pytest.approx(0.5, abs=1e-5)


def test_tolerances_for_an_output_the_graph_lacks_are_refused(exports: dict[str, Path]) -> None:
    with pytest.raises(CompileError, match="'logits'"):
        check_parity(
            tiny_cnn(),
            exports["first"],
            [np.zeros((1, 3, 32, 32), np.float32)],
            tolerances={"logits": Tolerance(1e-3, 1e-3)},
        )


def test_a_graph_the_runtime_cannot_load_is_a_compile_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not an onnx graph")
    with pytest.raises(CompileError, match="could not run"):
        check_parity(tiny_cnn(), bogus, [{"input": np.zeros((1, 3, 32, 32), np.float32)}])


def test_torchscript_exporter_cannot_give_stable_external_data(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="dynamo"):
        export_onnx(tiny_cnn(), sample(), tmp_path / "m.onnx", external_data=True, dynamo=False)


def test_a_model_torch_cannot_export_is_a_compile_error(tmp_path: Path) -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on values: no static graph exists
                return x * 2
            return x

    with pytest.raises(CompileError, match="could not export DataDependent"):
        export_onnx(DataDependent(), sample(), tmp_path / "m.onnx")
