"""Numerical parity of an exported ONNX graph against the torch model it came from.

torch runs here; ONNX Runtime runs in a spawned child (see `compilers._parity_worker`), so a
crash or a runaway allocation inside the runtime fails the check with a clear error instead
of taking the caller (a cloud worker) down with it. Every output is compared on every input
with its own stated tolerance.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from compilers import _parity_worker
from compilers._parity_worker import OutputVerdict
from compilers.errors import CompileRefused, ParityError

Feed = npt.NDArray[np.generic] | Mapping[str, npt.NDArray[np.generic]]
"""One input batch: an array for a single-input graph, or input name -> array (e.g. a text
classifier's int64 `input_ids` and `attention_mask`)."""


@dataclass(frozen=True)
class Tolerance:
    """Allowed |onnx - torch| <= atol + rtol * |torch|, elementwise (numpy.allclose)."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class OutputParity:
    """How one output compared over all inputs."""

    name: str
    max_abs_diff: float
    mismatched: int
    total: int
    tolerance: Tolerance


@dataclass(frozen=True)
class ParityReport:
    """Worst absolute difference per output between ONNX Runtime and torch."""

    max_abs_diff: dict[str, float]
    rtol: float
    atol: float
    outputs: tuple[OutputParity, ...] = ()


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: Sequence[Feed],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    tolerances: Mapping[str, Tolerance] | None = None,
    timeout_s: float = 600.0,
) -> ParityReport:
    """Run torch here and ONNX Runtime in a spawned child on each input; compare per output.

    Each input is an array (for a single-input graph) or a mapping of input name to array,
    passed to torch positionally in mapping order. `rtol`/`atol` apply to every output
    unless `tolerances` names a different one for it. Raises ParityError naming the output
    with the worst difference and where it occurred; CompileError if the child fails.
    """
    if not inputs:
        raise CompileRefused("check_parity needs at least one sample input to compare on")
    overrides = dict(tolerances or {})
    declared = _graph_inputs(onnx_path)
    feeds = [_as_feed(x, onnx_path, declared) for x in inputs]
    for index, feed in enumerate(feeds):
        _check_feed(feed, index, onnx_path, declared)
    expected = _torch_outputs(model, feeds)
    verdicts = _run_child(
        onnx_path,
        feeds,
        expected,
        (rtol, atol),
        {k: (t.rtol, t.atol) for k, t in overrides.items()},
        timeout_s,
    )
    unknown = sorted(set(overrides) - {v.name for v in verdicts})
    if unknown:
        raise CompileRefused(
            f"tolerances name outputs the graph does not have: {unknown}; "
            f"its outputs are {[v.name for v in verdicts]}"
        )
    _raise_on_failure(verdicts, feeds)
    return ParityReport(
        max_abs_diff={v.name: v.max_abs_diff for v in verdicts},
        rtol=rtol,
        atol=atol,
        outputs=tuple(
            OutputParity(v.name, v.max_abs_diff, v.mismatched, v.total, Tolerance(v.rtol, v.atol))
            for v in verdicts
        ),
    )


def _graph_inputs(onnx_path: Path) -> dict[str, tuple[int, int]]:
    """The graph's inputs as name -> (ONNX element type, rank), read without the weights."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # unreadable: let ONNX Runtime in the child say why
        return {}
    initializers = {t.name for t in graph.initializer}
    return {
        i.name: (i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim))
        for i in graph.input
        if i.name not in initializers
    }


def _as_feed(
    x: Feed, onnx_path: Path, declared: Mapping[str, tuple[int, int]]
) -> dict[str, npt.NDArray[np.generic]]:
    if isinstance(x, Mapping):
        return {str(k): np.asarray(v) for k, v in x.items()}
    names = list(declared)
    if len(names) != 1:
        raise CompileRefused(
            f"{onnx_path.name} has inputs {names}: pass each sample as a mapping of input "
            "name to array"
        )
    return {names[0]: np.asarray(x)}


def _check_feed(
    feed: Mapping[str, npt.NDArray[np.generic]],
    index: int,
    onnx_path: Path,
    declared: Mapping[str, tuple[int, int]],
) -> None:
    # ONNX Runtime's own errors for these name no input sample; a wrong dtype (int32 token
    # ids from a tokenizer, float64 pixels) is the usual slip.
    if not declared:
        return
    if set(feed) != set(declared):
        raise CompileRefused(
            f"input #{index} feeds {sorted(feed)} but {onnx_path.name} takes "
            f"{sorted(declared)}: pass a mapping with exactly the graph's input names"
        )
    import onnx.helper

    for name, array in feed.items():
        elem_type, rank = declared[name]
        want = onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else None
        if want is not None and array.dtype != want:
            raise CompileRefused(
                f"input #{index} gives {name!r} as {array.dtype} but {onnx_path.name} takes "
                f"{np.dtype(want)}: convert it (e.g. .astype(np.{np.dtype(want)}))"
            )
        if rank and array.ndim != rank:
            raise CompileRefused(
                f"input #{index} gives {name!r} with shape {list(array.shape)} but "
                f"{onnx_path.name} takes {rank} dimensions"
            )


def _torch_outputs(
    model: torch.nn.Module, feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]]
) -> list[list[npt.NDArray[np.generic]]]:
    model = model.eval()
    results: list[list[npt.NDArray[np.generic]]] = []
    with torch.no_grad():
        for feed in feeds:
            out = model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values()))
            tensors = [out] if isinstance(out, torch.Tensor) else list(out)
            results.append([t.detach().cpu().numpy() for t in tensors])
    return results


def _run_child(
    onnx_path: Path,
    feeds: list[dict[str, npt.NDArray[np.generic]]],
    expected: list[list[npt.NDArray[np.generic]]],
    default: tuple[float, float],
    overrides: dict[str, tuple[float, float]],
    timeout_s: float,
) -> list[OutputVerdict]:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_parity_worker.run,
        args=(send, str(onnx_path), feeds, expected, default, overrides),
        name="edgefleet-parity",
        daemon=True,
    )
    child.start()
    send.close()  # so that recv() sees EOF if the child dies without answering
    try:
        if not receive.poll(timeout_s):
            raise CompileRefused(
                f"the parity check of {onnx_path.name} did not finish within {timeout_s:.0f} s: "
                "compare on fewer or smaller inputs, or raise timeout_s"
            )
        try:
            status, payload = receive.recv()
        except EOFError:
            child.join(5)
            raise CompileRefused(
                f"ONNX Runtime died (exit code {child.exitcode}) while checking "
                f"{onnx_path.name}: the graph may be unsupported or too large for this "
                "machine (or, from a script, the child could not start: the check spawns a "
                "process, so guard the script's entry point with if __name__ == '__main__')"
            ) from None
    finally:
        receive.close()
        if child.is_alive():
            child.join(5)
        if child.is_alive():
            child.terminate()
            child.join()
    if status != "ok":
        raise CompileRefused(f"ONNX Runtime could not run {onnx_path.name}: {payload}")
    verdicts: list[OutputVerdict] = payload
    return verdicts


def _raise_on_failure(
    verdicts: Sequence[OutputVerdict], feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]]
) -> None:
    def shape_of(index: int) -> str:
        return ", ".join(f"{k} {list(v.shape)}" for k, v in feeds[index].items())

    for v in verdicts:
        if v.shape_problem:
            raise ParityError(
                f"ONNX output {v.name!r} does not match torch: {v.shape_problem} "
                f"(input #{v.sample}: {shape_of(v.sample)})"
            )
    failing = [v for v in verdicts if v.mismatched]
    if not failing:
        return
    worst = max(failing, key=lambda v: (np.isnan(v.max_abs_diff), v.max_abs_diff))
    raise ParityError(
        f"ONNX output {worst.name!r} differs from torch by up to {worst.max_abs_diff:.3g} "
        f"(allowed rtol={worst.rtol:g}, atol={worst.atol:g}); {worst.mismatched} of "
        f"{worst.total} values are outside the tolerance, the worst on input #{worst.sample} "
        f"({shape_of(worst.sample)})"
        + (
            f"; also failing: {[v.name for v in failing if v is not worst]}"
            if len(failing) > 1
            else ""
        )
    )
