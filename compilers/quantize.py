"""Lower-precision variants of an ONNX model, each gated on measured accuracy.

INT8: static QDQ with calibration data and per-channel weights for CNNs (dynamic INT8 on a
CNN emits ConvInteger, which ran several times *slower* than FP32, and per-tensor weights
lost ~11 points on EfficientNet-Lite0); dynamic INT8 for MatMul-heavy (transformer-like)
graphs, where it pays without calibration. FP16: ONNX Runtime's own converter (the one
onnxconverter-common ships), keeping float32 inputs and outputs so callers do not change.

Static INT8 first folds BatchNorm into the convolutions and turns computed conv biases into
constants (`compilers.fold`): without that the QDQ graph is Conv -> Q -> DQ -> BatchNorm and
ONNX Runtime builds no integer convolution (3-8x slower than FP32 on EfficientNet-Lite0).
The result is checked in ORT's own optimised graph (`integer_conv_census`): a CNN whose
quantised convolutions do not become QLinearConv/ConvInteger is refused. Layers whose
quantisation costs accuracy are found by measuring each Conv/Gemm output's error against
the float model on calibration data, and kept in FP32 while the gate fails (`keep_fp32`
names them explicitly).

Every conversion evaluates the source and the result with the caller's `evaluate(path)` on
held-out data and refuses (AccuracyDropError, output removed) when the drop exceeds
`max_accuracy_drop`, in the units `evaluate` returns (0.01 = one point of accuracy).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from compilers.errors import AccuracyDropError, CompileError, CompileRefused
from compilers.fold import fold_for_quantization, unshare_weights
from compilers.sampling import Score, paired_difference_interval, wilson_interval
from edgefleet.core.compat import StrEnum

log = logging.getLogger(__name__)


Evaluate = Callable[[Path], float | Score]
"""Score of the model at a path on held-out data; higher is better (e.g. accuracy). Return
a `Score` with per-example verdicts to get the gate's confidence intervals."""


def as_score(value: float | Score) -> Score:
    return value if isinstance(value, Score) else Score(float(value))


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
    n: int | None = None  # held-out examples both were scored on, where known
    candidate_interval: tuple[float, float] | None = None  # Wilson 95%
    drop_interval: tuple[float, float] | None = None  # paired normal 95%

    @property
    def drop(self) -> float:
        return self.baseline - self.candidate

    @classmethod
    def between(cls, baseline: float | Score, candidate: float | Score) -> AccuracyChange:
        before, after = as_score(baseline), as_score(candidate)
        if (
            before.correct is None
            or after.correct is None
            or len(before.correct) != len(after.correct)
        ):
            return cls(before.value, after.value)
        n = len(after.correct)
        return cls(
            before.value,
            after.value,
            n,
            wilson_interval(float(after.correct.sum()), n),
            paired_difference_interval(before.correct, after.correct),
        )

    def describe(self) -> str:
        """e.g. '0.8370 vs 0.8255 (drop -1.15 points, 95% CI -1.9 to -0.4; n=2000)'."""
        text = f"{self.candidate:.4f} vs {self.baseline:.4f} (drop {self.drop * 100:+.2f} points"
        if self.drop_interval is not None and self.n is not None:
            low, high = self.drop_interval
            text += f", 95% CI {low * 100:+.2f} to {high * 100:+.2f}; n={self.n}"
        return text + ")"

    def metrics(self) -> dict[str, float]:
        out = {"accuracy_baseline": self.baseline, "accuracy": self.candidate}
        out["accuracy_drop"] = self.drop
        if self.n is not None:
            out["accuracy_n"] = float(self.n)
        if self.candidate_interval is not None:
            out["accuracy_ci_low"], out["accuracy_ci_high"] = self.candidate_interval
        if self.drop_interval is not None:
            out["accuracy_drop_ci_low"], out["accuracy_drop_ci_high"] = self.drop_interval
        return out


@dataclass(frozen=True)
class PrecisionResult:
    path: Path
    method: str  # e.g. "int8-static-qdq-per-channel", "int8-dynamic", "fp16"
    accuracy: AccuracyChange
    kept_fp32: tuple[str, ...] = ()  # nodes left unquantised (sensitive layers)
    integer_convs: int = 0  # convolutions ORT runs as QLinearConv/ConvInteger
    float_convs: int = 0  # convolutions ORT still runs in float
    calibration_examples: int = 0
    batchnorms_folded: int = 0


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
    baseline: Score,
    max_accuracy_drop: float,
    written: Sequence[Path],
    change: AccuracyChange | None = None,
) -> AccuracyChange:
    """The point estimate of the drop on the held-out data decides; its interval is stated."""
    change = change or AccuracyChange.between(baseline, evaluate(dst))
    if change.drop > max_accuracy_drop:
        for file in written:
            file.unlink(missing_ok=True)
        interval = ""
        if change.drop_interval is not None:
            low, high = change.drop_interval
            interval = f"; 95% CI of the drop {low:.4f} to {high:.4f} on n={change.n}"
        raise AccuracyDropError(
            f"{kind} scored {change.candidate:.4f} against {change.baseline:.4f} for the "
            f"source model, a drop of {change.drop:.4f} (allowed {max_accuracy_drop:.4f}"
            f"{interval}): ship the fp32 target instead, calibrate with more representative "
            "data, or allow a larger drop"
        )
    log.info("%s: accuracy %s", kind, change.describe())
    return change


def _pre_process(src: Path, dst: Path, *, fold: bool = False) -> int:
    """Shape inference and ORT's basic optimisation into `dst`; with `fold`, constant conv
    biases and BatchNorm folded first. Returns how many BatchNorm nodes were folded."""
    # In memory: quant_pre_process copies a path to a scratch folder without its
    # external-data files.
    model = onnx.load(str(src))
    folded = 0
    if fold:
        model, report = fold_for_quantization(model)
        folded = report.batchnorms_folded
        if report.batchnorms_left:
            log.warning(
                "%d BatchNormalization node(s) of %s could not be folded into a convolution",
                report.batchnorms_left,
                src.name,
            )
    try:
        quant_pre_process(model, str(dst))
    except Exception as err:
        # ORT's symbolic shape inference trips over some valid graphs (e.g. Constant nodes
        # holding value_ints); ONNX's own shape inference is enough outside transformers.
        log.info("symbolic shape inference failed (%s); using ONNX shape inference only", err)
        quant_pre_process(model, str(dst), skip_symbolic_shape=True)
    if fold:
        prepared = onnx.load(str(dst))
        if unshare_weights(prepared):
            onnx.save(prepared, str(dst))
    return folded


def quantize_int8(
    src: Path,
    dst: Path,
    *,
    evaluate: Evaluate,
    calibration: Calibration | None = None,
    mode: Int8Mode = Int8Mode.AUTO,
    per_channel: bool = True,
    max_accuracy_drop: float = 0.01,
    baseline: float | Score | None = None,
    keep_fp32: Sequence[str] | None = None,
    max_fp32_layers: int = 4,
) -> PrecisionResult:
    """INT8-quantise `src` into the self-contained file `dst`, gated on accuracy.

    `mode=AUTO` picks STATIC for CNNs and DYNAMIC for MatMul-heavy graphs (see
    `choose_int8_mode`); STATIC needs `calibration`. `baseline` is the source's score if
    the caller already has it.

    STATIC folds BatchNorm first, refuses a graph where ORT would run no convolution in
    integers, and, while the gate fails, keeps up to `max_fp32_layers` Conv/Gemm nodes in
    FP32, the ones whose quantisation adds the most output error on the calibration data
    (measured per layer), re-quantising after each. `keep_fp32` names nodes (of the folded
    graph) to keep in FP32 from the start and turns that search off.
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
    reference = as_score(evaluate(src) if baseline is None else baseline)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode is Int8Mode.DYNAMIC:
        with tempfile.TemporaryDirectory(prefix="edgefleet-quantize-") as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            try:
                _pre_process(src, prepared)
                quantize_dynamic(
                    str(prepared), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8
                )
            except CompileError:
                raise
            except Exception as err:
                raise CompileRefused(f"ONNX Runtime could not quantise {src.name}: {err}") from err
        method = "int8-dynamic" + ("-per-channel" if per_channel else "")
        change = _gate(method, dst, evaluate, reference, max_accuracy_drop, [dst])
        return PrecisionResult(dst, method, change)
    assert calibration is not None
    feeds = calibration_feeds(src, calibration)
    method = "int8-static-qdq" + ("-per-channel" if per_channel else "")
    with tempfile.TemporaryDirectory(prefix="edgefleet-quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            # constant biases and BatchNorm folded, then shape inference + ORT's basic
            # optimisation, as ORT's quantisation guide recommends
            folded = _pre_process(src, prepared, fold=True)
            kept = list(keep_fp32 or ())
            _quantize_static(prepared, dst, feeds, per_channel, kept)
        except CompileError:
            raise
        except Exception as err:
            raise CompileRefused(f"ONNX Runtime could not quantise {src.name}: {err}") from err
        integer, floating = _require_integer_convs(dst, src.name, strict=not kept)
        change = AccuracyChange.between(reference, evaluate(dst))
        ranked: list[str] | None = None
        while keep_fp32 is None and change.drop > max_accuracy_drop and len(kept) < max_fp32_layers:
            if ranked is None:
                ranked = [n for n in layer_sensitivity(prepared, dst, feeds) if n not in kept]
            if not ranked:
                break
            kept.append(ranked.pop(0))
            log.info("%s: %s, keeping %s in fp32", method, change.describe(), kept)
            _quantize_static(prepared, dst, feeds, per_channel, kept)
            integer, floating = integer_conv_census(dst)
            change = AccuracyChange.between(reference, evaluate(dst))
            if not integer:
                break  # nothing left in integers: the gate decides, then the check below
    if kept:
        method += f"-fp32-{len(kept)}"
    change = _gate(method, dst, evaluate, reference, max_accuracy_drop, [dst], change)
    if floating and not integer:
        _require_integer_convs(dst, src.name, strict=False)  # refuses, saying why
    return PrecisionResult(
        dst,
        method,
        change,
        kept_fp32=tuple(kept),
        integer_convs=integer,
        float_convs=floating,
        calibration_examples=sum(_rows(f) for f in feeds),
        batchnorms_folded=folded,
    )


def _rows(feed: Mapping[str, npt.NDArray[np.generic]]) -> int:
    return len(next(iter(feed.values()))) if feed else 0


def _quantize_static(
    prepared: Path,
    dst: Path,
    feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    per_channel: bool,
    keep_fp32: Sequence[str],
) -> None:
    quantize_static(
        str(prepared),
        str(dst),
        ArrayCalibrationReader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(keep_fp32),
    )


_INTEGER_CONVS = frozenset({"QLinearConv", "ConvInteger", "NhwcQLinearConv"})


def integer_conv_census(path: Path) -> tuple[int, int]:
    """(integer, float) convolutions in the graph ONNX Runtime actually runs for `path`:
    ORT fuses DQ -> Conv -> Q into QLinearConv at its extended level, which is where a
    QDQ model's speed comes from; a Conv left in float there runs at FP32 speed or worse
    (with the Q/DQ pairs around it)."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-ortopt-") as scratch:
        optimised = Path(scratch) / "optimised.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimised)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        census = op_census(optimised)
    integer = sum(census.get(op, 0) for op in _INTEGER_CONVS)
    floating = sum(census.get(op, 0) for op in ("Conv", "FusedConv"))
    return integer, floating


def _require_integer_convs(path: Path, name: str, *, strict: bool) -> tuple[int, int]:
    """(integer, float) convolutions ORT runs for `path`; refused when none is integer, or,
    with `strict` (nothing kept in fp32 on purpose), when any is float."""
    integer, floating = integer_conv_census(path)
    if (strict and floating) or (floating and not integer):
        path.unlink(missing_ok=True)
        raise CompileRefused(
            f"static INT8 of {name}: ONNX Runtime runs {floating} convolution(s) in float and "
            f"{integer} in integers, so INT8 would not pay (Q/DQ around float convolutions "
            "is slower than FP32); a convolution whose weight, bias or following BatchNorm "
            "is computed at run time blocks the fusion: ship the onnx-cpu-fp32 target"
        )
    return integer, floating


def layer_sensitivity(
    float_model: Path,
    qdq_model: Path,
    feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    *,
    max_batches: int = 4,
) -> list[str]:
    """Conv/Gemm node names of `float_model`, most quantisation-sensitive first.

    Each node's output is compared between the float and the quantised model on a few
    calibration batches (relative L2 error); a node's sensitivity is the error it adds
    over the worst error of its inputs, so early layers are not blamed for what they pass
    on. The measurement `onnxruntime.quantization.qdq_loss_debug` makes, narrowed to the
    layers that can be kept in FP32.
    """
    model = onnx.load(str(float_model))
    producer = {o: n for n in model.graph.node for o in n.output}
    layers = [n for n in model.graph.node if n.op_type in _CONV_OPS | _MATMUL_OPS]
    watched: list[str] = []
    for node in layers:
        watched.append(node.output[0])
        watched.extend(i for i in node.input[:1] if i in producer)
    watched = list(dict.fromkeys(watched))
    float_out = _activations(float_model, watched, feeds[:max_batches])
    qdq_out = _activations(qdq_model, watched, feeds[:max_batches])
    error = {
        name: float(np.linalg.norm(qdq_out[name] - float_out[name]))
        / max(float(np.linalg.norm(float_out[name])), 1e-12)
        for name in watched
        if name in float_out and name in qdq_out
    }
    added = {
        node.name: error.get(node.output[0], 0.0)
        - max((error.get(i, 0.0) for i in node.input[:1]), default=0.0)
        for node in layers
    }
    return sorted(added, key=lambda n: added[n], reverse=True)


def _activations(
    path: Path,
    names: Sequence[str],
    feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]],
) -> dict[str, npt.NDArray[np.float32]]:
    model = onnx.load(str(path))
    present = {o for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name in present and name not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # fusions would hide the intermediate tensors being compared
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    wanted = [o.name for o in session.get_outputs() if o.name in names]
    collected: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in wanted}
    for feed in feeds:
        for name, value in zip(wanted, session.run(wanted, dict(feed)), strict=True):
            collected[name].append(np.asarray(value, dtype=np.float32))
    return {n: np.concatenate([v.reshape(len(v), -1) for v in vs]) for n, vs in collected.items()}


def convert_fp16(
    src: Path,
    dst: Path,
    *,
    evaluate: Evaluate,
    max_accuracy_drop: float = 0.01,
    baseline: float | Score | None = None,
    keep_io_types: bool = True,
) -> PrecisionResult:
    """Convert `src` to float16 inside, float32 at its inputs and outputs, into `dst`."""
    # ORT ships onnxconverter-common's float16 converter: no extra dependency needed.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    reference = as_score(evaluate(src) if baseline is None else baseline)
    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=keep_io_types)
    except Exception as err:
        raise CompileRefused(f"could not convert {src.name} to float16: {err}") from err
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    change = _gate("fp16", dst, evaluate, reference, max_accuracy_drop, [dst])
    return PrecisionResult(dst, "fp16", change)
