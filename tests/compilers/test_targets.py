from __future__ import annotations

import pytest

from compilers.errors import TargetUnavailableError, UnknownTargetError
from compilers.targets import Precision, Runtime, Step, known_targets, resolve_target
from compilers.tensorrt import require_tensorrt, tensorrt_available


def test_the_four_targets_of_issue_3_are_known() -> None:
    assert set(known_targets()) == {
        "onnx-cpu-fp32",
        "onnx-cpu-int8",
        "onnx-gpu-fp16",
        "tensorrt-fp16",
    }


def test_profiles_say_runtime_precision_providers_and_steps() -> None:
    int8 = resolve_target("onnx-cpu-int8")
    assert (int8.runtime, int8.precision) == (Runtime.ONNXRUNTIME, Precision.INT8)
    assert int8.providers == ("CPUExecutionProvider",)
    assert Step.QUANTIZE_INT8 in int8.steps and int8.changes_numerics
    gpu = resolve_target("onnx-gpu-fp16")
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.needs_gpu
    trt = resolve_target("tensorrt-fp16")
    assert trt.runtime is Runtime.TENSORRT and trt.requires_module == "tensorrt"
    assert trt.artifact_file == "model.plan"
    assert not resolve_target("onnx-cpu-fp32").changes_numerics


def test_names_are_matched_case_insensitively() -> None:
    assert resolve_target(" ONNX-CPU-FP32 ").name == "onnx-cpu-fp32"


def test_an_unknown_target_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTargetError) as err:
        resolve_target("onnx-npu-int4")
    assert "onnx-npu-int4" in str(err.value)
    for name in known_targets():
        assert name in str(err.value)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_tensorrt_target_says_what_to_use_instead_where_tensorrt_is_missing() -> None:
    with pytest.raises(TargetUnavailableError) as err:
        require_tensorrt()
    message = str(err.value)
    assert "tensorrt-fp16 needs TensorRT" in message
    assert "onnx-gpu-fp16" in message and "onnx-cpu-fp32" in message
