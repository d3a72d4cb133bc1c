"""torch -> ONNX with a dynamic batch dimension (and any other dynamic dims the caller names)
and `onnx.checker`; optionally laid out with one external-data file per initializer so that
unchanged weights give unchanged bytes.

`check_parity` (numerical parity against torch, in a spawned subprocess) lives in
`compilers.parity` and is re-exported here for callers that import it from this module.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx
import torch

from compilers.errors import CompileRefused
from compilers.layout import save_per_tensor
from compilers.parity import OutputParity, ParityReport, Tolerance, check_parity

__all__ = [
    "BATCH",
    "DynamicDims",
    "OutputParity",
    "ParityReport",
    "Sample",
    "Tolerance",
    "check_parity",
    "export_onnx",
]

log = logging.getLogger(__name__)

Sample = torch.Tensor | Mapping[str, torch.Tensor]
"""One example input (a single-input model), or input name -> example tensor, in the order
the model's forward takes them positionally."""

DynamicDims = Mapping[str, Mapping[int, str]]
"""Input name -> {axis: dim name} for dynamic axes beyond the batch (axis 0)."""

BATCH = "batch"
"""The name of axis 0 of every input and output: one dynamic dim shared by all of them."""

DEFAULT_DIM_MAX = 512  # BERT-like encoders' position table; pass dim_max for larger dims

_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch.fx.experimental.symbolic_shapes")


def export_onnx(
    model: torch.nn.Module,
    sample: Sample,
    path: Path,
    *,
    input_name: str | None = None,
    output_name: str = "output",
    dynamic_dims: DynamicDims | None = None,
    dim_max: Mapping[str, int] | None = None,
    opset: int = 18,
    dynamo: bool = True,
    external_data: bool = False,
    max_batch: int = 4096,
) -> Path:
    """Export `model` to ONNX at `path` with a dynamic first (batch) dimension.

    `sample` is either one example tensor, which becomes the graph input `input_name`
    (default "input"), or a mapping of input name -> example tensor for a model that takes
    several inputs (e.g. a text classifier's `input_ids` and `attention_mask`): the tensors
    go to `forward` positionally in mapping order and the keys become the graph's input
    names. Axis 0 of every input and of the output is one shared dynamic dim, "batch"
    (1..`max_batch`).

    `dynamic_dims` makes further axes dynamic, per input: `{"input_ids": {1: "sequence"},
    "attention_mask": {1: "sequence"}}`. Axes that share a name are one dim (one
    `torch.export.Dim`, one ONNX dim_param: the graph assumes they are equal); each ranges
    over 1..`dim_max[name]` (default 512, the position table of BERT-like encoders). Give
    each such axis an example size of at least 2: torch.export specialises sizes 0 and 1
    into constants (and transformers' attention fails to trace a one-token sequence), so a
    length-1 example is refused up front. A dim the model's code fixes (e.g. a Linear over
    the sequence axis) is refused too, where torch would silently bake in the example size.

    With `external_data=False` the file is self-contained (weights inside, so under 2 GB).
    With `external_data=True` each initializer goes to its own file beside `path`, named
    after its state_dict name (see `compilers.layout`): two exports of the same weights are
    byte-identical, and a head-only change rewrites only the head's files.

    The dynamo exporter is the default; `optimize=False` keeps state_dict names as
    initializer names, and node metadata carrying source paths is cleared so that the bytes
    do not depend on where the code lives. The TorchScript exporter (`dynamo=False`) names
    tensors after ops, so it cannot give byte-stable external data.

    Raises CompileError naming the model class and the cause when torch cannot export it.
    """
    if external_data and not dynamo:
        raise CompileRefused(
            "external_data=True needs the dynamo exporter (dynamo=True): the TorchScript "
            "exporter names weights like 'onnx::Conv_39', so their files would not be stable"
        )
    inputs = _named_inputs(sample, input_name)
    _check_forward_takes(model, inputs)
    axes, ranges = _dynamic_axes(inputs, dynamic_dims or {}, dim_max or {}, max_batch)
    if output_name in inputs:
        raise CompileRefused(
            f"output_name {output_name!r} is also an input's name: ONNX needs distinct names"
        )
    model = model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_torch_logs(), tempfile.TemporaryDirectory(prefix="edgefleet-export-") as scratch:
        raw = Path(scratch) / "exported.onnx"
        _torch_export(
            model,
            inputs,
            raw,
            axes=axes,
            ranges=ranges,
            output_name=output_name,
            opset=opset,
            dynamo=dynamo,
        )
        graph = onnx.load(str(raw))  # pulls in torch's external data file, if it wrote one
    _check_dims_stayed_dynamic(model, graph, inputs, axes)
    _strip_unstable_metadata(graph)
    if external_data:
        save_per_tensor(graph, path)
    else:
        try:
            onnx.save(graph, str(path))
        except ValueError as err:
            raise CompileRefused(
                f"{type(model).__name__} is too large for one ONNX file ({err}): "
                "export with external_data=True"
            ) from err
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise CompileRefused(f"exported ONNX graph is invalid: {err}") from err
    return path


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    # torch logs a warning per missing torchvision op, and symbolic-shape notes on a failed
    # trace, straight to the original stderr; the CompileError already says what matters.
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _named_inputs(sample: Sample, input_name: str | None) -> dict[str, torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        return {input_name or "input": sample}
    if not isinstance(sample, Mapping):
        raise CompileRefused(
            f"sample must be a torch.Tensor or a mapping of input name -> tensor, "
            f"not {type(sample).__name__}"
        )
    if input_name is not None:
        raise CompileRefused(
            "input_name names the input of a single-tensor sample; with a mapping sample its "
            f"keys ({list(sample)}) are the input names"
        )
    if not sample:
        raise CompileRefused("sample is an empty mapping: give one example tensor per input")
    inputs: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in sample.items():
        if not isinstance(name, str) or not name:
            raise CompileRefused(f"input names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CompileRefused(
                f"sample[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor"
            )
        # Dynamic shapes are keyed by tensor identity, so one tensor fed as two inputs
        # would get a single spec: give each input its own tensor.
        inputs[name] = tensor.clone() if id(tensor) in seen else tensor
        seen.add(id(tensor))
    return inputs


def _check_forward_takes(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # compiled or C++ modules may expose no signature
        return
    try:
        signature.bind(*inputs.values())
    except TypeError as err:
        params = ", ".join(_spelled(p) for p in signature.parameters.values())
        raise CompileRefused(
            f"{type(model).__name__}.forward({params}) cannot take the sample's "
            f"{len(inputs)} input(s) {list(inputs)} positionally ({err}): give the sample "
            "one tensor per positional parameter, in forward's order"
        ) from err


def _spelled(parameter: inspect.Parameter) -> str:
    if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
        return f"*{parameter.name}"
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
        return f"**{parameter.name}"
    return parameter.name


def _dynamic_axes(
    inputs: Mapping[str, torch.Tensor],
    dynamic_dims: DynamicDims,
    dim_max: Mapping[str, int],
    max_batch: int,
) -> tuple[dict[str, dict[int, str]], dict[str, tuple[int, int]]]:
    """Per input {axis: dim name}, batch included, and each dim's (min, max); every
    mistake in `dynamic_dims` is reported here, before the slow export starts."""
    unknown = sorted(set(dynamic_dims) - set(inputs))
    if unknown:
        raise CompileRefused(
            f"dynamic_dims names inputs the sample lacks: {unknown}; the inputs are {list(inputs)}"
        )
    if max_batch < 1:
        raise CompileRefused(f"max_batch must be >= 1, got {max_batch}")
    axes: dict[str, dict[int, str]] = {}
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (example size, where it was seen)
    for name, tensor in inputs.items():
        if tensor.dim() == 0:
            raise CompileRefused(
                f"input {name!r} is a scalar: every input needs a batch axis (axis 0)"
            )
        named = {0: BATCH}
        for axis, dim in dynamic_dims.get(name, {}).items():
            if not isinstance(axis, int) or not 1 <= axis < tensor.dim():
                raise CompileRefused(
                    f"dynamic_dims[{name!r}] names axis {axis!r}, but {name!r} has shape "
                    f"{list(tensor.shape)}: name axes 1..{tensor.dim() - 1} (axis 0 is "
                    f"always the shared {BATCH!r} dim)"
                )
            if not isinstance(dim, str) or not dim.isidentifier() or dim == BATCH:
                raise CompileRefused(
                    f"dynamic_dims[{name!r}][{axis}] is {dim!r}: dim names must be Python "
                    f"identifiers other than {BATCH!r} (reserved for axis 0)"
                )
            named[axis] = dim
        for axis, dim in named.items():
            size, where = int(tensor.shape[axis]), f"{name!r} axis {axis}"
            if dim in sizes and sizes[dim][0] != size:
                raise CompileRefused(
                    f"dim {dim!r} is {sizes[dim][0]} at {sizes[dim][1]} but {size} at {where} "
                    "in the sample: inputs that share a dim need the same example size"
                )
            sizes.setdefault(dim, (size, where))
        axes[name] = named
    stray = sorted(set(dim_max) - (set(sizes) - {BATCH}))
    if stray:
        raise CompileRefused(
            f"dim_max names dims that dynamic_dims does not define: {stray}"
            + ("; the batch dim's limit is max_batch" if BATCH in stray else "")
        )
    ranges: dict[str, tuple[int, int]] = {}
    for dim, (size, where) in sizes.items():
        top = max_batch if dim == BATCH else dim_max.get(dim, DEFAULT_DIM_MAX)
        if dim != BATCH and size < 2:
            raise CompileRefused(
                f"the example size of dynamic dim {dim!r} ({where}) is {size}: use an "
                "example of size >= 2 (e.g. a longer sentence); torch.export turns sizes 0 "
                "and 1 into constants, so the graph would not accept other sizes"
            )
        if not 1 <= size <= top:
            raise CompileRefused(
                f"the example size of dim {dim!r} ({where}) is {size}, outside 1..{top}: "
                + ("raise max_batch" if dim == BATCH else f"raise dim_max[{dim!r}]")
            )
        ranges[dim] = (1, top)
    return axes, ranges


def _check_dims_stayed_dynamic(
    model: torch.nn.Module,
    graph: onnx.ModelProto,
    inputs: Mapping[str, torch.Tensor],
    axes: Mapping[str, Mapping[int, str]],
) -> None:
    # torch.export (2.13) silently specialises a Dim the model's code fixes (e.g. a Linear
    # over the sequence axis) instead of refusing: the graph would then reject other sizes.
    declared = {i.name: i for i in graph.graph.input}
    for name, named in axes.items():
        value = declared.get(name)
        if value is None:
            raise CompileRefused(
                f"the exported graph of {type(model).__name__} has no input {name!r} (its "
                f"inputs are {list(declared)}): does forward use every input in the sample?"
            )
        dims = value.type.tensor_type.shape.dim
        for axis, dim in named.items():
            if axis < len(dims) and not dims[axis].dim_param:
                raise CompileRefused(
                    f"{type(model).__name__} fixes axis {axis} ({dim!r}) of input {name!r} to "
                    f"{dims[axis].dim_value}, the example's size: torch.export specialised it, "
                    "so the graph would accept no other size. "
                    + (
                        "Make forward independent of the batch size (no reshapes to the "
                        "example's batch)"
                        if dim == BATCH
                        else f"Drop axis {axis} of {name!r} from dynamic_dims, or make forward "
                        "accept any size along it"
                    )
                )


def _strip_unstable_metadata(model: onnx.ModelProto) -> None:
    # Node metadata holds stack traces with absolute source paths: the bytes would change
    # with the checkout's location.
    for node in model.graph.node:
        del node.metadata_props[:]


def _torch_export(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: Path,
    *,
    axes: Mapping[str, Mapping[int, str]],
    ranges: Mapping[str, tuple[int, int]],
    output_name: str,
    opset: int,
    dynamo: bool,
) -> None:
    args = tuple(inputs.values())
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
                # One Dim object per name is what makes same-named axes one dim.
                dims = {
                    name: torch.export.Dim(name, min=low, max=high)
                    for name, (low, high) in ranges.items()
                }
                # Keyed by tensor rather than by position, so forward(*inputs) and
                # forward(input_ids, attention_mask) both get the structure torch expects.
                shapes = torch.export.ShapesCollection()  # type: ignore[no-untyped-call]
                for name, tensor in inputs.items():
                    shapes[tensor] = {axis: dims[dim] for axis, dim in axes[name].items()}
                torch.onnx.export(
                    model,
                    args,
                    str(path),
                    input_names=list(inputs),
                    output_names=[output_name],
                    dynamic_shapes=shapes.dynamic_shapes(model, args),  # type: ignore[no-untyped-call]
                    opset_version=opset,
                    dynamo=True,
                    optimize=False,
                    external_data=True,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    args,
                    str(path),
                    input_names=list(inputs),
                    output_names=[output_name],
                    dynamic_axes={
                        **{name: dict(named) for name, named in axes.items()},
                        output_name: {0: BATCH},
                    },
                    opset_version=opset,
                    dynamo=False,
                )
    except Exception as err:
        raise CompileRefused(_export_failure(model, inputs, err, quiet.getvalue(), dynamo)) from err


def _export_failure(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    err: Exception,
    printed: str,
    dynamo: bool,
) -> str:
    # torch wraps the real cause in a page of generic advice: report the innermost error.
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    reason = " ".join(lines[:3])[:600] or "\n".join(printed.strip().splitlines()[-3:])
    fed = ", ".join(
        f"{name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        for name, t in inputs.items()
    )
    advice = (
        "forward must be traceable by torch.export: no Python branches on tensor values, "
        "tensors as positional arguments in the sample's order, and every axis named as "
        "dynamic free to vary (drop from dynamic_dims any the model fixes); "
        "torch.export.export(model, args, dynamic_shapes=...) shows the full trace"
        if dynamo
        else "forward must be traceable by torch.jit.trace with these positional inputs"
    )
    return (
        f"torch could not export {type(model).__name__} (fed {fed}) to ONNX: "
        f"{type(cause).__name__}: {reason}. To fix: {advice}"
    )
