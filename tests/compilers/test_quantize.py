"""INT8 (static and dynamic), FP16 and offline optimisation on small onnx.helper graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compilers.errors import AccuracyDropError, CompileError
from compilers.optimize import OptimizationLevel, optimize_graph
from compilers.quantize import (
    Int8Mode,
    choose_int8_mode,
    convert_fp16,
    op_census,
    quantize_int8,
)
from tests.compilers.models import agreement, conv_model, images, run, session
from tests.onnx_models import linear_model


def ops(path: Path) -> set[str]:
    return set(op_census(path))


def test_op_census_picks_static_for_cnns_and_dynamic_for_matmul_heavy_graphs(
    tmp_path: Path,
) -> None:
    cnn = conv_model(tmp_path / "cnn.onnx")
    mlp = linear_model(tmp_path / "mlp.onnx", hidden=16)
    assert op_census(cnn)["Conv"] == 2
    assert choose_int8_mode(op_census(cnn)) is Int8Mode.STATIC
    assert choose_int8_mode(op_census(mlp)) is Int8Mode.DYNAMIC
    with pytest.raises(CompileError, match="onnx-cpu-fp32"):
        choose_int8_mode({"Relu": 3})


def test_static_int8_quantises_a_cnn_with_calibration_and_keeps_its_answers(
    tmp_path: Path,
) -> None:
    source = conv_model(tmp_path / "cnn.onnx")
    evaluate = agreement(source, images(200, seed=2))
    result = quantize_int8(
        source,
        tmp_path / "int8.onnx",
        evaluate=evaluate,
        calibration=images(64),
        max_accuracy_drop=0.1,
    )
    assert result.method == "int8-static-qdq-per-channel"
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(result.path)
    assert result.accuracy.baseline == 1.0
    assert result.accuracy.drop <= 0.1
    assert run(result.path, images(3)).shape == (3, 4)


def test_static_int8_without_calibration_says_what_to_pass(tmp_path: Path) -> None:
    source = conv_model(tmp_path / "cnn.onnx")
    with pytest.raises(CompileError, match="calibration"):
        quantize_int8(source, tmp_path / "int8.onnx", evaluate=lambda _p: 1.0)


def test_dynamic_int8_for_a_matmul_model_needs_no_calibration(tmp_path: Path) -> None:
    source = linear_model(tmp_path / "mlp.onnx", features=32, hidden=64, classes=5)
    x = np.random.default_rng(3).normal(size=(100, 32)).astype(np.float32)
    result = quantize_int8(
        source, tmp_path / "int8.onnx", evaluate=agreement(source, x), max_accuracy_drop=0.1
    )
    assert result.method.startswith("int8-dynamic")
    assert "MatMulInteger" in ops(result.path) or "DynamicQuantizeMatMul" in ops(result.path)
    assert result.accuracy.drop <= 0.1


def test_an_accuracy_drop_beyond_the_threshold_is_refused_and_nothing_is_left(
    tmp_path: Path,
) -> None:
    source = conv_model(tmp_path / "cnn.onnx")
    dst = tmp_path / "int8.onnx"
    scores = {source: 0.91}
    with pytest.raises(AccuracyDropError, match=r"drop of 0\.0300 \(allowed 0\.0100\)"):
        quantize_int8(source, dst, evaluate=lambda p: scores.get(p, 0.88), calibration=images(16))
    assert not dst.exists()


def test_fp16_keeps_float32_inputs_and_outputs(tmp_path: Path) -> None:
    source = conv_model(tmp_path / "cnn.onnx")
    x = images(50, seed=4)
    result = convert_fp16(source, tmp_path / "fp16.onnx", evaluate=agreement(source, x))
    model = onnx.load(str(result.path))
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    np.testing.assert_allclose(run(result.path, x), run(source, x), atol=2e-2)
    assert result.accuracy.drop <= 0.01


@pytest.mark.parametrize("level", list(OptimizationLevel))
def test_offline_optimisation_keeps_the_outputs_and_lays_weights_out_per_tensor(
    tmp_path: Path, level: OptimizationLevel
) -> None:
    source = conv_model(tmp_path / "cnn.onnx")
    dst = optimize_graph(source, tmp_path / "opt" / "model.onnx", level=level)
    x = images(4)
    np.testing.assert_allclose(run(dst, x), run(source, x), rtol=1e-4, atol=1e-5)
    assert len(list(dst.parent.glob("*.bin"))) >= 3
    session(dst)


def test_optimising_for_a_provider_this_build_lacks_is_refused(tmp_path: Path) -> None:
    source = conv_model(tmp_path / "cnn.onnx")
    with pytest.raises(CompileError, match="TensorrtExecutionProvider"):
        optimize_graph(source, tmp_path / "o.onnx", providers=["TensorrtExecutionProvider"])
