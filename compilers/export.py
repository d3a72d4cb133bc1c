"""torch -> ONNX with a dynamic batch dimension, `onnx.checker`, and a parity check of every
output against torch on sample inputs."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch

from compilers.errors import CompileError, ParityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityReport:
    """Worst absolute difference per output between ONNX Runtime and torch."""

    max_abs_diff: dict[str, float]
    rtol: float
    atol: float


def export_onnx(
    model: torch.nn.Module,
    sample: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str = "output",
    opset: int = 18,
    dynamo: bool = True,
) -> Path:
    """Export `model` to a single self-contained ONNX file whose first dim is dynamic.

    The dynamo exporter is the default (stable initializer names); node metadata carrying
    source paths is cleared so that the bytes do not depend on where the code lives.
    """
    model = model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch logs one warning per missing torchvision op at every export; nothing to act on.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # The exporters print progress and warnings on stdout/stderr; keep CLI output clean.
    quiet = io.StringIO()
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),
        ):
            warnings.simplefilter("ignore")
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    model,
                    (sample,),
                    str(path),
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    (sample,),
                    str(path),
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
    except Exception as err:
        detail = quiet.getvalue().strip().splitlines()[-3:]
        raise CompileError(
            f"torch could not export {type(model).__name__} to ONNX: {err}. {' '.join(detail)}"
        ) from err
    graph = onnx.load(str(path))
    for node in graph.graph.node:
        del node.metadata_props[:]
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as err:
        raise CompileError(f"exported ONNX graph is invalid: {err}") from err
    onnx.save(graph, str(path))
    return path


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: Sequence[npt.NDArray[np.float32]],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> ParityReport:
    """Run torch and ONNX Runtime on each input; raise ParityError naming the worst output."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    worst = dict.fromkeys(names, 0.0)
    model = model.eval()
    for x in inputs:
        with torch.no_grad():
            expected = model(torch.from_numpy(x))
        expected_list = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(names, {input_name: x})
        for name, want, have in zip(names, expected_list, got, strict=True):
            want_np = want.numpy()
            diff = float(np.max(np.abs(want_np - have))) if want_np.size else 0.0
            worst[name] = max(worst[name], diff)
            if not np.allclose(have, want_np, rtol=rtol, atol=atol):
                raise ParityError(
                    f"ONNX output {name!r} differs from torch by up to {diff:.3g} "
                    f"(allowed rtol={rtol}, atol={atol}) for an input of shape {list(x.shape)}"
                )
    return ParityReport(worst, rtol, atol)
