"""torch -> ONNX with a dynamic batch dimension and `onnx.checker`; optionally laid out with
one external-data file per initializer so that unchanged weights give unchanged bytes.

`check_parity` (numerical parity against torch, in a spawned subprocess) lives in
`compilers.parity` and is re-exported here for callers that import it from this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from compilers.errors import CompileError
from compilers.layout import save_per_tensor
from compilers.parity import OutputParity, ParityReport, Tolerance, check_parity

__all__ = ["OutputParity", "ParityReport", "Tolerance", "check_parity", "export_onnx"]

log = logging.getLogger(__name__)


def export_onnx(
    model: torch.nn.Module,
    sample: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str = "output",
    opset: int = 18,
    dynamo: bool = True,
    external_data: bool = False,
    max_batch: int = 4096,
) -> Path:
    """Export `model` to ONNX at `path` with a dynamic first (batch) dimension.

    With `external_data=False` the file is self-contained (weights inside, so under 2 GB).
    With `external_data=True` each initializer goes to its own file beside `path`, named
    after its state_dict name (see `compilers.layout`): two exports of the same weights are
    byte-identical, and a head-only change rewrites only the head's files.

    The dynamo exporter is the default; `optimize=False` keeps state_dict names as
    initializer names, and node metadata carrying source paths is cleared so that the bytes
    do not depend on where the code lives. The TorchScript exporter (`dynamo=False`) names
    tensors after ops, so it cannot give byte-stable external data.
    """
    if external_data and not dynamo:
        raise CompileError(
            "external_data=True needs the dynamo exporter (dynamo=True): the TorchScript "
            "exporter names weights like 'onnx::Conv_39', so their files would not be stable"
        )
    model = model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch logs one warning per missing torchvision op at every export; nothing to act on.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgefleet-export-") as scratch:
        raw = Path(scratch) / "exported.onnx"
        _torch_export(
            model,
            sample,
            raw,
            input_name=input_name,
            output_name=output_name,
            opset=opset,
            dynamo=dynamo,
            max_batch=max_batch,
        )
        graph = onnx.load(str(raw))  # pulls in torch's external data file, if it wrote one
    for node in graph.graph.node:
        del node.metadata_props[:]
    if external_data:
        save_per_tensor(graph, path)
    else:
        try:
            onnx.save(graph, str(path))
        except ValueError as err:
            raise CompileError(
                f"{type(model).__name__} is too large for one ONNX file ({err}): "
                "export with external_data=True"
            ) from err
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise CompileError(f"exported ONNX graph is invalid: {err}") from err
    return path


def _torch_export(
    model: torch.nn.Module,
    sample: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    opset: int,
    dynamo: bool,
    max_batch: int,
) -> None:
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
                batch = torch.export.Dim("batch", min=1, max=max_batch)
                torch.onnx.export(
                    model,
                    (sample,),
                    str(path),
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    dynamo=True,
                    optimize=False,
                    external_data=True,
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
