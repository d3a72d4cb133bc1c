"""Small models for the compiler tests: ONNX graphs built with onnx.helper, a tiny torch CNN,
and an `evaluate` that scores agreement with a reference model (a stand-in for accuracy on a
validation split that needs no training)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path: Path, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    s = session(path)
    out: npt.NDArray[np.float32] = s.run(None, {s.get_inputs()[0].name: x})[0]
    return out


def conv_model(path: Path, *, channels: int = 8, classes: int = 4, seed: int = 0) -> Path:
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm on 3x16x16 images."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])

    def weights(*shape: int) -> npt.NDArray[np.float32]:
        fan_in = int(np.prod(shape[1:]))
        scaled: npt.NDArray[np.float64] = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        return scaled.astype(np.float32)

    inits = [
        numpy_helper.from_array(weights(channels, 3, 3, 3), "conv1.weight"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "conv1.bias"),
        numpy_helper.from_array(weights(channels, channels, 3, 3), "conv2.weight"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "conv2.bias"),
        numpy_helper.from_array(weights(classes, channels), "head.weight"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "head.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def images(count: int, seed: int = 1) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(count, 3, 16, 16)).astype(np.float32)


def agreement(reference: Path, x: npt.NDArray[np.float32]) -> Callable[[Path], float]:
    """evaluate(path): share of inputs where the model's top class matches `reference`'s."""
    want: npt.NDArray[np.intp] = run(reference, x).argmax(1)

    def evaluate(path: Path) -> float:
        got: npt.NDArray[np.intp] = run(path, x).argmax(1)
        return float(np.mean(got == want))

    return evaluate
