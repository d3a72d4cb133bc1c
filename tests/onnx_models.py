"""Small real ONNX models built with onnx.helper (no torch), for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(
    path: Path, *, features: int = 8, classes: int = 3, seed: int = 0, hidden: int = 0
) -> Path:
    """`logits = relu(x @ W1) @ W2 + b` (or `x @ W + b` when hidden=0) with a dynamic batch.

    A large `hidden` makes a model of many chunks (hidden * (features + classes) * 4 bytes).
    """
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    if hidden:
        w1 = (rng.normal(size=(features, hidden)) / np.sqrt(features)).astype(np.float32)
        w2 = (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("MatMul", ["hr", "w2"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["logits"]),
        ]
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    else:
        w1 = rng.normal(size=(features, classes)).astype(np.float32)
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["logits"]),
        ]
        inits = [numpy_helper.from_array(w1, "w1")]
    b = rng.normal(size=(classes,)).astype(np.float32)
    inits.append(numpy_helper.from_array(b, "b"))
    graph = helper.make_graph(nodes, "linear", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def expected_logits(path: Path, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """What the model at `path` computes, by ONNX Runtime on CPU (the reference)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: npt.NDArray[np.float32] = session.run(["logits"], {"x": x})[0]
    return out


def custom_op_model(path: Path, features: int = 8, classes: int = 3) -> Path:
    """A well-formed ONNX graph using an operator no ONNX Runtime build has: it parses, but
    no session can load it (as a model built for another device's runtime)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    node = helper.make_node("FancyClassifier", ["x"], ["logits"], domain="com.example.edge")
    graph = helper.make_graph([node], "custom", [x], [y])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.edge", 1)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
