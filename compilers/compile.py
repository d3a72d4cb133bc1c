"""Compile a source ONNX model for one target profile into a folder of deployable files.

Everything that can be checked cheaply (target known and buildable here, source present,
output folder empty, evaluation and calibration supplied where the target needs them) is
checked before any long work starts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from compilers.build import Build
from compilers.errors import CompileRefused
from compilers.fold import fold_file
from compilers.layout import save_per_tensor
from compilers.optimize import OptimizationLevel, optimize_graph
from compilers.quantize import (
    AccuracyChange,
    Calibration,
    Evaluate,
    Int8Mode,
    as_score,
    choose_int8_mode,
    convert_fp16,
    op_census,
    quantize_int8,
)
from compilers.targets import Runtime, Step, TargetProfile, resolve_target
from compilers.tensorrt import BatchProfile, build_engine, require_tensorrt
from edgefleet.core.tensors import CLASS_NAMES_KEY, parse_class_names


def default_timing_cache() -> Path:
    """Where TensorRT kernel timings persist between builds on this machine."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgefleet" / "tensorrt-timing.cache"


def compile_target(
    onnx_path: Path,
    target: str | TargetProfile,
    out_dir: Path,
    *,
    calibration: Calibration | None = None,
    evaluate: Evaluate | None = None,
    max_accuracy_drop: float = 0.01,
    int8_mode: Int8Mode = Int8Mode.AUTO,
    timing_cache: Path | None = None,
    tensorrt_batch: BatchProfile = BatchProfile(),  # noqa: B008 - frozen
    class_names: Sequence[str] = (),
) -> Build:
    """Build the artifact for `target` from `onnx_path` into the empty folder `out_dir`.

    `evaluate(path) -> score` (higher is better, e.g. accuracy on held-out data; a
    `compilers.quantize.Score` with per-example verdicts adds 95% intervals) is required for targets that change numerics (INT8, FP16); the build is refused when the
    score falls by more than `max_accuracy_drop` (in evaluate's units; 0.01 = one point).
    For tensorrt-fp16 `evaluate` receives the engine file, so it must run TensorRT.
    `calibration` (typical inputs) is required for static INT8, the mode chosen for CNNs.
    `class_names` (or, without them, those the source model's metadata holds) are written to
    an ONNX artifact's `metadata_props` under CLASS_NAMES_KEY, as a JSON list.
    """
    profile = resolve_target(target) if isinstance(target, str) else target
    _preflight(onnx_path, profile, out_dir, calibration, evaluate, int8_mode)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = out_dir / profile.artifact_file
    baseline = as_score(evaluate(onnx_path)) if evaluate is not None else None
    change: AccuracyChange | None = None
    extra: dict[str, float] = {}
    steps: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as scratch:
        work = Path(scratch)
        current = onnx_path
        for step in profile.steps:
            if step is Step.OPTIMIZE:
                if Step.QUANTIZE_INT8 not in profile.steps:  # INT8 folds as it quantises
                    # The export computes conv biases through CastLike/Expand on the
                    # activation, so ORT's optimiser folds no BatchNorm: EfficientNet-Lite0's
                    # FP32 graph ran 3.9x slower than folded (32 vs 8.3 ms at 224 px).
                    folded = work / "folded" / "model.onnx"
                    report = fold_file(current, folded)
                    current = folded
                    if report.batchnorms_folded:
                        steps.append("fold-batchnorm")
                        extra["batchnorms_folded"] = float(report.batchnorms_folded)
                # CPU targets get ORT's fusions; others only portable rewrites, because a
                # fusion chosen for the CPU provider may not exist for the device's provider.
                level = (
                    OptimizationLevel.EXTENDED
                    if profile.providers == ("CPUExecutionProvider",)
                    else OptimizationLevel.BASIC
                )
                current = optimize_graph(current, work / "optimized" / "model.onnx", level=level)
                steps.append(f"optimize-{level}")
            elif step is Step.QUANTIZE_INT8:
                assert evaluate is not None and baseline is not None
                result = quantize_int8(
                    current,
                    work / "int8.onnx",
                    evaluate=evaluate,
                    calibration=calibration,
                    mode=int8_mode,
                    max_accuracy_drop=max_accuracy_drop,
                    baseline=baseline,
                )
                current, change = result.path, result.accuracy
                steps.append(result.method)
                if result.integer_convs or result.float_convs:
                    extra |= {
                        "integer_convs": float(result.integer_convs),
                        "float_convs": float(result.float_convs),
                        "batchnorms_folded": float(result.batchnorms_folded),
                        "fp32_layers_kept": float(len(result.kept_fp32)),
                        "calibration_examples": float(result.calibration_examples),
                    }
            elif step is Step.CONVERT_FP16:
                assert evaluate is not None and baseline is not None
                result = convert_fp16(
                    current,
                    work / "fp16.onnx",
                    evaluate=evaluate,
                    max_accuracy_drop=max_accuracy_drop,
                    baseline=baseline,
                )
                current, change = result.path, result.accuracy
                steps.append(result.method)
            elif step is Step.BUILD_TENSORRT_ENGINE:
                current = build_engine(
                    current,
                    primary,
                    timing_cache=timing_cache or default_timing_cache(),
                    batch=tensorrt_batch,
                )
                steps.append("tensorrt-engine-fp16")
        if profile.runtime is Runtime.ONNXRUNTIME:
            model = onnx.load(str(current))
            names = list(class_names) or source_class_names(onnx_path)
            if names:
                set_class_names(model, names)
            files = save_per_tensor(model, primary)
            _check_loads(primary)
        else:
            files = [primary]
    if evaluate is not None and baseline is not None and change is None:
        # fp32 and TensorRT: measure the final artifact itself
        change = AccuracyChange.between(baseline, evaluate(primary))
        if change.drop > max_accuracy_drop:
            for file in files:
                file.unlink(missing_ok=True)
            raise CompileRefused(
                f"the {profile.name} artifact scored {change.candidate:.4f} against "
                f"{baseline.value:.4f} for the source (allowed drop {max_accuracy_drop:.4f}): "
                "the compile step changed the model's behaviour; check the source with "
                "check_parity"
            )
    metrics: dict[str, float] = {
        "size_bytes": float(sum(f.stat().st_size for f in files)),
        "source_size_bytes": float(_model_bytes(onnx_path)),
        "compile_seconds": time.perf_counter() - started,
    }
    if change is not None:
        metrics |= change.metrics()
    metrics |= extra
    return Build(
        target=profile.name,
        folder=out_dir,
        files=tuple(f.relative_to(out_dir).as_posix() for f in files),
        format="onnx" if profile.runtime is Runtime.ONNXRUNTIME else "tensorrt-plan",
        metrics=metrics,
        steps=tuple(steps),
    )


def set_class_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Write `names` into `model.metadata_props` (replacing any earlier list). The JSON is
    compact and ordered, so the same names give the same bytes."""
    kept = [p for p in model.metadata_props if p.key != CLASS_NAMES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = CLASS_NAMES_KEY
    entry.value = json.dumps([str(n) for n in names], separators=(",", ":"), ensure_ascii=False)


def source_class_names(path: Path) -> list[str]:
    """The class names an ONNX model's metadata holds ([] without them)."""
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == CLASS_NAMES_KEY:
            return list(parse_class_names(prop.value))
    return []


def _preflight(
    onnx_path: Path,
    profile: TargetProfile,
    out_dir: Path,
    calibration: Calibration | None,
    evaluate: Evaluate | None,
    int8_mode: Int8Mode,
) -> None:
    if profile.requires_module == "tensorrt":
        require_tensorrt(profile.name)
    if not onnx_path.is_file():
        raise CompileRefused(f"no ONNX model at {onnx_path}: export the model first")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CompileRefused(
            f"output folder {out_dir} is not empty: compile each target into a fresh folder "
            "so its file list is exactly the artifact"
        )
    if profile.changes_numerics and evaluate is None:
        raise CompileRefused(
            f"target {profile.name} changes the model's numerics ({profile.precision}): pass "
            "evaluate= (score on a validation split) so the accuracy change is measured"
        )
    if Step.QUANTIZE_INT8 in profile.steps:
        mode = Int8Mode(int8_mode)
        if mode is Int8Mode.AUTO:
            mode = choose_int8_mode(op_census(onnx_path))
        if mode is Int8Mode.STATIC and calibration is None:
            raise CompileRefused(
                f"{onnx_path.name} is convolutional, so {profile.name} uses static INT8, which "
                "needs calibration= (a few hundred typical inputs); or pass "
                "int8_mode='dynamic' (slower on CNNs)"
            )


def _check_loads(path: Path) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise CompileRefused(f"the compiled model {path} does not load: {err}") from err


def _model_bytes(path: Path) -> int:
    from compilers.layout import external_files

    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))
