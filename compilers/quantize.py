"""Lower-precision variants of an ONNX model, each gated on measured accuracy.

INT8: static QDQ with calibration data and per-channel weights for CNNs (dynamic INT8 on a
CNN emits ConvInteger, which ran several times *slower* than FP32, and per-tensor weights
lost ~11 points on EfficientNet-Lite0); dynamic INT8 for MatMul-heavy (transformer-like)
graphs, where it pays without calibration. FP16: ONNX Runtime's own converter (the one
onnxconverter-common ships), keeping float32 inputs and outputs so callers do not change.

Every conversion evaluates the source and the result with the caller's `evaluate(path)` on
a validation split and refuses (AccuracyDropError, output removed) when the drop exceeds
`max_accuracy_drop`, in the units `evaluate` returns (0.01 = one point of accuracy).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from compilers.errors import AccuracyDropError, CompileError, CompileRefused

log = logging.getLogger(__name__)

Evaluate = Callable[[Path], float]
"""Score of the model at a path on a validation split; higher is better (e.g. accuracy)."""

Calibration = npt.NDArray[np.float32] | Sequence[Mapping[str, npt.NDArray[np.generic]]]
"""Representative inputs: one array (split along the batch axis) for a single-input graph,
or a sequence of feeds (input name -> array)."""

_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})


class Int8Mode(StrEnum):
    AUTO = "auto"
    STATIC = "static"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class AccuracyChange:
    baseline: float
    candidate: float

    @property
    def drop(self) -> float:
        return self.baseline - self.candidate


@dataclass(frozen=True)
class PrecisionResult:
    path: Path
    method: str  # e.g. "int8-static-qdq-per-channel", "int8-dynamic", "fp16"
    accuracy: AccuracyChange


def op_census(path: Path) -> Counter[str]:
    """How many nodes of each op type the graph (and its subgraphs) holds."""
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(model.graph)
    return counts


def choose_int8_mode(census: Mapping[str, int]) -> Int8Mode:
    """STATIC for convolutional graphs, DYNAMIC for MatMul-heavy ones (transformers, MLPs)."""
    convs = sum(census.get(op, 0) for op in _CONV_OPS)
    matmuls = sum(census.get(op, 0) for op in _MATMUL_OPS)
    if convs == 0 and matmuls == 0:
        raise CompileRefused(
            "the graph has no Conv, MatMul or Gemm nodes: INT8 would change nothing; "
            "use the onnx-cpu-fp32 target"
        )
    return Int8Mode.DYNAMIC if matmuls > convs else Int8Mode.STATIC


class ArrayCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds calibration inputs to ONNX Runtime's calibrator, batch by batch."""

    def __init__(self, feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]]) -> None:
        self._feeds = [dict(f) for f in feeds]
        self._iter: Iterator[dict[str, npt.NDArray[np.generic]]] = iter(self._feeds)

    def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def calibration_feeds(
    path: Path, calibration: Calibration, *, batch_size: int = 16
) -> list[dict[str, npt.NDArray[np.generic]]]:
    """Normalise `calibration` to a list of feeds for the graph at `path`."""
    if isinstance(calibration, np.ndarray):
        model = onnx.load(str(path), load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in initializers]
        if len(names) != 1:
            raise CompileRefused(
                f"{path.name} has inputs {names}: pass calibration as a sequence of "
                "feeds (input name -> array)"
            )
        if len(calibration) == 0:
            raise CompileRefused("calibration data is empty: pass a few hundred typical inputs")
        return [
            {names[0]: np.ascontiguousarray(calibration[i : i + batch_size])}
            for i in range(0, len(calibration), batch_size)
        ]
    feeds = [dict(f) for f in calibration]
    if not feeds:
        raise CompileRefused("calibration data is empty: pass a few hundred typical inputs")
    return feeds


def _gate(
    kind: str,
    dst: Path,
    evaluate: Evaluate,
    baseline: float,
    max_accuracy_drop: float,
    written: Sequence[Path],
) -> AccuracyChange:
    change = AccuracyChange(baseline, evaluate(dst))
    if change.drop > max_accuracy_drop:
        for file in written:
            file.unlink(missing_ok=True)
        raise AccuracyDropError(
            f"{kind} scored {change.candidate:.4f} against {baseline:.4f} for the source "
            f"model, a drop of {change.drop:.4f} (allowed {max_accuracy_drop:.4f}): ship the "
            "fp32 target instead, calibrate with more representative data, or allow a larger "
            "drop"
        )
    log.info("%s: accuracy %.4f -> %.4f", kind, baseline, change.candidate)
    return change


def _pre_process(src: Path, dst: Path) -> None:
    # In memory: quant_pre_process copies a path to a scratch folder without its
    # external-data files.
    model = onnx.load(str(src))
    try:
        quant_pre_process(model, str(dst))
    except Exception as err:
        # ORT's symbolic shape inference trips over some valid graphs (e.g. Constant nodes
        # holding value_ints); ONNX's own shape inference is enough outside transformers.
        log.info("symbolic shape inference failed (%s); using ONNX shape inference only", err)
        quant_pre_process(model, str(dst), skip_symbolic_shape=True)


def quantize_int8(
    src: Path,
    dst: Path,
    *,
    evaluate: Evaluate,
    calibration: Calibration | None = None,
    mode: Int8Mode = Int8Mode.AUTO,
    per_channel: bool = True,
    max_accuracy_drop: float = 0.01,
    baseline: float | None = None,
) -> PrecisionResult:
    """INT8-quantise `src` into the self-contained file `dst`, gated on accuracy.

    `mode=AUTO` picks STATIC for CNNs and DYNAMIC for MatMul-heavy graphs (see
    `choose_int8_mode`); STATIC needs `calibration`. `baseline` is the source's score if
    the caller already has it.
    """
    mode = Int8Mode(mode)
    if mode is Int8Mode.AUTO:
        mode = choose_int8_mode(op_census(src))
    if mode is Int8Mode.STATIC and calibration is None:
        raise CompileRefused(
            f"static INT8 of {src.name} needs calibration data (typical inputs, e.g. a few "
            "hundred training images); pass calibration=, or mode='dynamic' for "
            "transformer-like models"
        )
    reference = evaluate(src) if baseline is None else baseline
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            # shape inference + basic optimisation (e.g. folding BatchNorm into Conv) first,
            # as ONNX Runtime's quantisation guide recommends
            _pre_process(src, prepared)
            if mode is Int8Mode.STATIC:
                assert calibration is not None
                reader = ArrayCalibrationReader(calibration_feeds(src, calibration))
                quantize_static(
                    str(prepared),
                    str(dst),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
                method = "int8-static-qdq" + ("-per-channel" if per_channel else "")
            else:
                quantize_dynamic(
                    str(prepared), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8
                )
                method = "int8-dynamic" + ("-per-channel" if per_channel else "")
        except CompileError:
            raise
        except Exception as err:
            raise CompileRefused(f"ONNX Runtime could not quantise {src.name}: {err}") from err
    change = _gate(method, dst, evaluate, reference, max_accuracy_drop, [dst])
    return PrecisionResult(dst, method, change)


def convert_fp16(
    src: Path,
    dst: Path,
    *,
    evaluate: Evaluate,
    max_accuracy_drop: float = 0.01,
    baseline: float | None = None,
    keep_io_types: bool = True,
) -> PrecisionResult:
    """Convert `src` to float16 inside, float32 at its inputs and outputs, into `dst`."""
    # ORT ships onnxconverter-common's float16 converter: no extra dependency needed.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    reference = evaluate(src) if baseline is None else baseline
    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=keep_io_types)
    except Exception as err:
        raise CompileRefused(f"could not convert {src.name} to float16: {err}") from err
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    change = _gate("fp16", dst, evaluate, reference, max_accuracy_drop, [dst])
    return PrecisionResult(dst, "fp16", change)
