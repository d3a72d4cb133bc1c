"""Compile steps of a job (fine-tune or compile): build each target from the parity-checked
source, measure its accuracy change and latency, and write the golden samples the device's
smoke test runs. A compile job builds one more target of a version from its kept source."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from cloudsvc.errors import JobFailed
from cloudsvc.jobs.data import MAX_CALIBRATION_EXAMPLES, MAX_EVALUATION_EXAMPLES, load_job_data
from cloudsvc.jobs.env import PARENT_GOLDEN, WorkerEnv
from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.feeds import (
    EVALUATION_FILE,
    EvaluationData,
    Feeds,
    accuracy_evaluator,
    latency_ms,
    rows,
    take,
)
from cloudsvc.jobs.results import JobResult
from cloudsvc.jobs.spec import CompileSpec
from cloudsvc.sessions import open_session, providers_for
from compilers.build import Build
from compilers.errors import AccuracyDropError, CompileError, TargetUnavailableError
from compilers.sampling import Score, stratified_sample
from compilers.targets import Precision, Runtime, TargetProfile, resolve_target
from edgefleet.core.golden import GoldenRef, tensors_from_bytes, write_samples
from edgefleet.core.jobs import TargetOutcome
from protos.artifact.v1 import artifact_pb2

# Golden samples: up to 4 held-out examples, within 0.5% of the artifact's size (16 KiB at
# least), but always one. Their inputs are files of their own: a child version re-uses its
# parent's inputs (PARENT_GOLDEN in the job folder), so devices fetch only new outputs.
GOLDEN_COUNT = 4
GOLDEN_SHARE = 0.005
GOLDEN_MIN_BYTES = 16 << 10


def buildable(profile: TargetProfile) -> TargetProfile:
    """The profile, if this worker can build it: TensorRT importable, CUDA visible."""
    import torch

    from compilers.tensorrt import require_tensorrt

    if profile.requires_module == "tensorrt":
        require_tensorrt(profile.name)
    if profile.needs_gpu and not torch.cuda.is_available():
        raise TargetUnavailableError(
            f"target {profile.name} is built and checked on a GPU, and this worker sees none "
            "(CUDA_VISIBLE_DEVICES, driver); use onnx-cpu-fp32 or onnx-cpu-int8"
        )
    return profile


def compile_all(
    profiles: list[TargetProfile],
    source: Path,
    data: EvaluationData,
    max_accuracy_drop: float,
    env: WorkerEnv,
    report: Reporter,
    preprocessing: dict[str, str],
    extra_files: list[str],
) -> tuple[list[Build], list[TargetOutcome]]:
    builds: list[Build] = []
    outcomes: list[TargetOutcome] = []
    for profile in profiles:
        report.update(message=f"building {profile.name}")
        try:
            build = _compile_one(
                profile, source, data, max_accuracy_drop, env, preprocessing, extra_files
            )
        except AccuracyDropError as err:
            outcomes.append(TargetOutcome(target=profile.name, status="refused", reason=str(err)))
            report.log(f"{profile.name}: refused: {err}")
            continue
        except CompileError as err:
            outcomes.append(TargetOutcome(target=profile.name, status="failed", reason=str(err)))
            report.log(f"{profile.name}: failed: {err}")
            continue
        builds.append(build)
        outcomes.append(TargetOutcome(target=profile.name, status="built", metrics=build.metrics))
        report.log(f"{profile.name}: built ({_metrics_line(build.metrics)})")
    if not builds:
        reasons = "; ".join(f"{o.target}: {o.reason}" for o in outcomes)
        raise JobFailed(f"no target could be built: {reasons}")
    return builds, outcomes


def _metrics_line(metrics: Mapping[str, float]) -> str:
    parts = [f"{metrics['size_bytes'] / 1e6:.2f} MB"]
    if "latency_p50_ms" in metrics:
        parts.append(f"p50 {metrics['latency_p50_ms']:.3f} ms at batch 1")
    if "accuracy" in metrics:
        change = f"{-metrics['accuracy_drop'] * 100:+.2f} points"
        if "accuracy_drop_ci_low" in metrics and "accuracy_n" in metrics:
            # the change's interval: minus the drop's
            change += (
                f", 95% CI {-metrics['accuracy_drop_ci_high'] * 100:+.2f} to "
                f"{-metrics['accuracy_drop_ci_low'] * 100:+.2f} on n={metrics['accuracy_n']:.0f}"
            )
        parts.append(f"accuracy {metrics['accuracy']:.2%} ({change})")
    if "integer_convs" in metrics:
        parts.append(
            f"{metrics['integer_convs']:.0f} integer / {metrics['float_convs']:.0f} float convs, "
            f"{metrics['batchnorms_folded']:.0f} BatchNorm folded, calibrated on "
            f"{metrics['calibration_examples']:.0f} examples"
        )
    return ", ".join(parts)


def _compile_one(
    profile: TargetProfile,
    source: Path,
    data: EvaluationData,
    max_accuracy_drop: float,
    env: WorkerEnv,
    preprocessing: dict[str, str],
    extra_files: list[str],
) -> Build:
    from compilers.compile import compile_target
    from compilers.tensorrt import engine_evaluator

    out = env.job_dir / "builds" / profile.name
    shutil.rmtree(out, ignore_errors=True)
    evaluate: Callable[[Path], float | Score] | None = None
    if len(data.labels):
        if profile.runtime is Runtime.TENSORRT:
            source_score = accuracy_evaluator(data.validation, data.labels)
            engine_score = engine_evaluator(data.validation, data.labels)

            def evaluate(path: Path) -> float | Score:
                return engine_score(path) if path.suffix == ".plan" else source_score(path)
        else:
            evaluate = accuracy_evaluator(
                data.validation, data.labels, providers_for(profile.providers)
            )
    calibration = (
        [take(data.calibration, i, i + 16) for i in range(0, rows(data.calibration), 16)]
        if data.calibration
        else None
    )
    compiled = compile_target(
        source,
        profile,
        out,
        calibration=calibration,
        evaluate=evaluate,
        max_accuracy_drop=max_accuracy_drop,
        class_names=data.class_names,
    )
    files = list(compiled.files)
    for name in extra_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / name, out / name)
        files.append(name)
    metrics = dict(compiled.metrics)
    one = take(data.validation, 0, 1)
    if profile.runtime is Runtime.ONNXRUNTIME and not profile.needs_gpu:
        p50, p99 = latency_ms(compiled.entrypoint, one)
        metrics |= {"latency_p50_ms": p50, "latency_p99_ms": p99}
    budget = max(GOLDEN_MIN_BYTES, int(GOLDEN_SHARE * metrics["size_bytes"]))
    feeds = golden_feeds(data.validation, budget, env.job_dir / PARENT_GOLDEN)
    golden, golden_files = _golden(profile, compiled.entrypoint, source, feeds, out)
    return replace(
        compiled,
        files=(*files, *golden_files),
        metrics=metrics,
        golden=golden,
        preprocessing=preprocessing,
    )


def golden_feeds(validation: Feeds, budget: int, parent: Path) -> list[Feeds]:
    """The examples (batch 1 each) golden samples are made of: the parent version's golden
    inputs when they fit this model's inputs (devices hold those bytes already), else the
    first held-out examples that fit `budget`."""
    inherited = sorted(parent.glob("*.pb")) if parent.is_dir() else []
    if inherited:
        feeds = [tensors_from_bytes(p.read_bytes()) for p in inherited[:GOLDEN_COUNT]]
        wanted = {name: (array.dtype, array.shape[1:]) for name, array in validation.items()}
        if all(
            {n: (a.dtype, a.shape[1:]) for n, a in feed.items()} == wanted
            and all(len(a) == 1 for a in feed.values())
            for feed in feeds
        ):
            return feeds
    per_example = sum(v[:1].nbytes for v in validation.values())
    count = max(1, min(GOLDEN_COUNT, rows(validation), budget // max(per_example, 1)))
    return [take(validation, i, i + 1) for i in range(count)]


def _golden(
    profile: TargetProfile, built: Path, source: Path, feeds: list[Feeds], out: Path
) -> tuple[tuple[GoldenRef, ...], tuple[str, ...]]:
    """Golden sample files in `out`: the inputs, and the outputs the device must reproduce.

    CPU artifacts: the artifact's own outputs on this CPU. Others (GPU, TensorRT), which
    the cloud may not run exactly as the device will: the FP32 source's outputs, with
    tolerances wide enough for FP16.
    """
    cpu_exact = profile.runtime is Runtime.ONNXRUNTIME and not profile.needs_gpu
    run = open_session(built if cpu_exact else source)
    names = [o.name for o in run.get_outputs()]
    outputs = [dict(zip(names, run.run(None, f), strict=True)) for f in feeds]
    scale = max(float(np.abs(o[names[0]]).max()) for o in outputs)
    if cpu_exact and profile.precision is Precision.FP32:
        rtol, atol = 1e-3, 1e-4 + 1e-4 * scale
    else:
        # INT8 kernels differ between CPUs (VNNI or not); FP16 rounds at every layer.
        rtol, atol = 5e-2, 5e-2 * scale
    return write_samples(out, list(zip(feeds, outputs, strict=True)), rtol=rtol, atol=atol)


def run_compile(spec: CompileSpec, env: WorkerEnv, report: Reporter) -> JobResult:
    """One more target for an existing version, from its source in `job_dir/source` (the
    manager writes it there, with `source.manifest`, before the worker starts)."""
    report.phase("validating", f"{spec.model} v{spec.version} -> {spec.target}")
    profile = buildable(resolve_target(spec.target))
    source_dir = env.job_dir / "source"
    manifest = artifact_pb2.Manifest()
    manifest.ParseFromString((env.job_dir / "source.manifest").read_bytes())
    entry = source_dir / manifest.entrypoint
    kept = source_dir / EVALUATION_FILE
    if spec.data:
        data = _evaluation_from(spec, entry, env, report)
    elif kept.is_file():
        data = EvaluationData.load(kept)
        report.log(f"scoring on the {len(data.labels)} held-out examples kept with the version")
    elif profile.changes_numerics:
        raise JobFailed(
            f"{spec.target} changes the model's numerics, and {spec.model} v{spec.version} was "
            "pushed without validation data: pass --data with labelled examples so the "
            "accuracy change is measured"
        )
    else:
        data = EvaluationData({}, np.zeros(0, dtype=np.int64), {}, ())
    if not data.validation:
        data = EvaluationData(_example_feed(entry), data.labels, {}, data.class_names)
    preprocessing = dict(manifest.preprocessing.params)
    shipped = [f.path for f in manifest.files if f.path.startswith("tokenizer/")]
    report.phase("compiling", spec.target)
    builds, outcomes = compile_all(
        [profile], entry, data, spec.max_accuracy_drop, env, report, preprocessing, shipped
    )
    return JobResult(builds=tuple(builds), outcomes=tuple(outcomes))


def _evaluation_from(
    spec: CompileSpec, entry: Path, env: WorkerEnv, report: Reporter
) -> EvaluationData:
    """Scoring and calibration samples of `spec.data`, each stratified by class (data sets
    are often stored class by class) and disjoint, their sizes stated in the job's log."""
    dataset = load_job_data(spec.data, spec.data_options, env, seed=0)
    run = open_session(entry)
    inputs = run.get_inputs()
    if len(inputs) != 1 or dataset.kind == "text":
        raise JobFailed(
            f"--data can score models with one numeric input; {spec.model} takes "
            f"{[i.name for i in inputs]}: fine-tune it here so its evaluation data is kept"
        )
    scored = stratified_sample(dataset.labels, MAX_EVALUATION_EXAMPLES, seed=0)
    x = dataset.inputs[scored.indices].astype(np.float32)
    feeds: Feeds = {inputs[0].name: x}
    try:
        run.run(None, take(feeds, 0, 1))
    except Exception as err:
        raise JobFailed(
            f"{spec.model} v{spec.version} cannot run on the examples of {spec.data} "
            f"(shape {list(x.shape[1:])}): {err}"
        ) from None
    report.log(
        f"scoring on {scored.describe(dataset.class_names)} of {len(dataset.labels)} in "
        f"{spec.data} (stratified, seed 0)"
    )
    calibrating = stratified_sample(
        dataset.labels, MAX_CALIBRATION_EXAMPLES, seed=1, exclude=scored.indices
    )
    overlap = ""
    if len(calibrating.indices) == 0:
        # every example is scored: calibrate on scored ones rather than not at all
        calibrating = stratified_sample(dataset.labels, MAX_CALIBRATION_EXAMPLES, seed=1)
        overlap = ", overlapping the scored examples (the data has no others)"
    report.log(
        f"INT8 calibration sample: {calibrating.describe(dataset.class_names)} "
        f"(stratified, seed 1{overlap})"
    )
    calibration: Feeds = {inputs[0].name: dataset.inputs[calibrating.indices].astype(np.float32)}
    return EvaluationData(feeds, dataset.labels[scored.indices], calibration, dataset.class_names)


def _example_feed(entry: Path) -> Feeds:
    """Zeros of the graph's input shapes at batch 1: enough to time and smoke-test a model
    compiled without data (FP32 targets only)."""
    from edgefleet.core.tensors import ORT_TO_DATATYPE, numpy_dtype

    feed: Feeds = {}
    for i in open_session(entry).get_inputs():
        shape = [1 if not isinstance(d, int) or d < 0 else d for d in i.shape]
        feed[i.name] = np.zeros(shape, dtype=numpy_dtype(ORT_TO_DATATYPE[i.type]))
    return feed
