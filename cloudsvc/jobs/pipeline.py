"""What a worker process does for a job (needs torch): fine-tune -> export -> parity check
-> compile every target -> measure; or compile one more target of a kept source.

Every check that can fail on the user's input (data set, backbone, settings, targets) runs
in the `validating` phase, before the first forward pass. Files land in the job's folder;
the manager registers them (cloudsvc.jobs.results).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloudsvc.golden import golden_from_outputs
from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.feeds import (
    EVALUATION_FILE,
    EvaluationData,
    Feeds,
    accuracy_evaluator,
    latency_ms,
    rows,
    session,
    take,
)
from cloudsvc.jobs.results import (
    BuildResult,
    ClassScore,
    Evaluation,
    JobResult,
    Lineage,
    TargetOutcome,
    TrialResult,
)
from cloudsvc.jobs.spec import (
    UPLOAD_PREFIX,
    CompileSpec,
    DataOptions,
    FineTuneParams,
    FineTuneSpec,
    resolve_upload,
)
from cloudsvc.registry import SOURCE_TARGET
from compilers.errors import AccuracyDropError, CompileError, TargetUnavailableError
from compilers.targets import Precision, Runtime, TargetProfile, resolve_target
from edgefleet.core.errors import EdgefleetError
from protos.artifact.v1 import artifact_pb2
from transfer.datasets import Dataset, Split, load_dataset, load_fashion_mnist, sample_dataset

OUTPUT_NAME = "logits"
IMAGE_INPUT = "image"
TEXT_INPUTS = ("input_ids", "attention_mask")
# Kept with the source for later compiles: enough to score INT8 within a fraction of a
# point, small enough to store with every version.
MAX_EVALUATION_EXAMPLES = 1000
MAX_CALIBRATION_EXAMPLES = 256
# Golden samples ride inside the manifest, which a device downloads whole for every version
# (unlike weights, which are content-addressed chunks): up to 4 held-out examples, within
# 0.5% of the artifact's size (16 KiB at least), but always one.
GOLDEN_COUNT = 4
GOLDEN_SHARE = 0.005
GOLDEN_MIN_BYTES = 16 << 10
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class WorkerEnv:
    """Where a worker finds and puts things; written by the manager into the job folder."""

    job_id: str
    job_dir: Path
    uploads_dir: Path
    cache_dir: Path
    fashion_mnist_dir: Path
    threads: int = 0


class JobFailed(EdgefleetError):
    """A job that cannot go on; the message says what to change."""


# ---------------------------------------------------------------- data


def load_job_data(reference: str, options: DataOptions, env: WorkerEnv, seed: int) -> Dataset:
    """The data set a job names, sampled down to `options.limit` examples when set."""
    if reference.startswith("fashion-mnist"):
        dataset = load_fashion_mnist(
            "test" if reference.endswith(":test") else "train", root=env.fashion_mnist_dir
        )
    else:
        path: str | Path = reference
        if reference.startswith(UPLOAD_PREFIX):
            path = resolve_upload(reference, env.uploads_dir)
        table = str(path).lower().endswith((".csv", ".parquet", ".pq"))
        table_options: dict[str, Any] = (
            {"label_column": options.label_column, "text_column": options.text_column}
            if table
            else {}
        )
        dataset = load_dataset(path, **table_options)
    return sample_dataset(dataset, options.limit, seed) if options.limit else dataset


# ---------------------------------------------------------------- fine-tune


def run_finetune(spec: FineTuneSpec, env: WorkerEnv, report: Reporter) -> JobResult:
    import torch

    from transfer.backbones import Backbone, load_backbone
    from transfer.datasets import split_dataset
    from transfer.finetune import check_config

    if env.threads:
        torch.set_num_threads(env.threads)
    trials = spec.trials()
    first = trials[0]
    report.phase("validating", f"loading data set {spec.data}")
    dataset = load_job_data(spec.data, spec.data_options, env, first.seed)
    counts = ", ".join(f"{k} {v}" for k, v in dataset.class_counts().items())
    report.log(f"data set {dataset.source}: {len(dataset)} examples; {counts}")

    def backbone_for(params: FineTuneParams) -> Backbone:
        base: str | Path = spec.base
        if spec.base.startswith(UPLOAD_PREFIX):
            base = resolve_upload(spec.base, env.uploads_dir)
        shape = dataset.input_shape if dataset.kind == "image" else None
        return load_backbone(base, input_shape=shape, image_size=params.image_size)

    report.log(f"loading backbone {spec.base}")
    from transfer.backbones import default_small_cnn_path

    if spec.base == "small-cnn" and not default_small_cnn_path().exists():
        report.log("pretraining the built-in small-cnn on generated images (once per machine)")
    backbone = backbone_for(first)
    backbone.check_inputs(dataset.kind, dataset.input_shape)
    configs = [_config(p, env) for p in trials]
    for config in configs:
        check_config(config, backbone)
    profiles = [_buildable(resolve_target(t)) for t in spec.targets]
    split = split_dataset(dataset, first.validation_fraction, first.seed)
    report.log(
        f"split: {len(split.train)} training, {len(split.validation)} validation examples "
        f"(stratified, seed {first.seed}); backbone {backbone.name} "
        f"({backbone.feature_dim} features); {len(trials)} trial(s); targets "
        f"{', '.join(spec.targets)}"
    )

    report.phase("training")
    best: tuple[Any, Any, int] | None = None
    outcomes: list[TrialResult] = []
    dirty = False
    started = time.perf_counter()
    for number, (params, config) in enumerate(zip(trials, configs, strict=True), 1):
        if number > 1 and (config.strategy != "head" or dirty):
            # last-n / full train the backbone in place; every such trial starts from the
            # pretrained weights, and a kept head-only winner keeps its own.
            backbone = backbone_for(params)
        report.update(trial=number, trials=len(trials), epoch=0, epochs=config.epochs)
        trial_started = time.perf_counter()
        done_before = number - 1

        def on_epoch(p: Any, done_before: int = done_before, t0: float = trial_started) -> None:
            per_trial = (time.perf_counter() - started) / max(done_before, 1)
            later = (len(trials) - done_before - 1) * (
                per_trial if done_before else time.perf_counter() - t0 + p.eta_seconds
            )
            report.update(
                epoch=p.epoch,
                epochs=p.epochs,
                loss=p.loss,
                train_accuracy=p.train_accuracy,
                val_accuracy=p.val_accuracy,
                eta_seconds=p.eta_seconds + later,
            )

        try:
            model, result = _fine_tune(backbone, dataset, config, split, on_epoch)
        except EdgefleetError as err:
            if len(trials) == 1:
                raise
            outcomes.append(TrialResult(number=number, params=params.as_strings(), error=str(err)))
            report.log(f"trial {number} failed: {err}")
            dirty = True
            continue
        dirty = config.strategy != "head"
        accuracy = result.metrics.accuracy
        outcomes.append(
            TrialResult(
                number=number,
                params=params.as_strings(),
                val_accuracy=accuracy,
                epochs_run=result.epochs_run,
                seconds=time.perf_counter() - trial_started,
            )
        )
        report.log(
            f"trial {number}/{len(trials)} ({_describe(params, spec)}): validation accuracy "
            f"{accuracy:.2%} after {result.epochs_run} epoch(s), best at epoch "
            f"{result.best_epoch}, {result.training_seconds:.1f}s on {result.device}"
        )
        if best is None or accuracy > best[1].metrics.accuracy:
            best = (model, result, number)
    if best is None:
        raise JobFailed("every trial of the search failed; see the log for each one's error")
    model, result, best_number = best
    outcomes = [t.model_copy(update={"best": t.number == best_number}) for t in outcomes]
    best_params = trials[best_number - 1]

    report.phase("exporting", "ONNX with a dynamic batch, one file per weight tensor")
    feeds = _feed_maker(backbone, dataset.kind)
    source_dir = env.job_dir / "source"
    validation = split.validation
    # Seeded samples across the whole split: data sets are often stored class by class,
    # and the first examples alone would calibrate INT8 and score it on a few classes.
    rng = np.random.default_rng(best_params.seed)
    kept = np.sort(rng.permutation(len(validation))[:MAX_EVALUATION_EXAMPLES])
    val_feeds = feeds(validation.inputs[kept])
    typical = np.sort(rng.permutation(len(split.train))[:MAX_CALIBRATION_EXAMPLES])
    cal_feeds = feeds(split.train.inputs[typical])
    source_files = _export(model, val_feeds, source_dir, dataset.kind, report)
    evaluation_data = EvaluationData(
        validation=val_feeds,
        labels=validation.labels[kept],
        calibration=cal_feeds,
        class_names=dataset.class_names,
    )
    evaluation_data.save(source_dir / EVALUATION_FILE)
    shipped = _tokenizer_files(backbone, source_dir)
    preprocessing = _preprocessing(backbone, dataset.class_names, shipped)
    source = BuildResult(
        target=SOURCE_TARGET,
        folder=SOURCE_TARGET,
        files=[*source_files, *shipped, EVALUATION_FILE],
        steps=["export-dynamo-per-tensor", "parity-checked"],
        preprocessing=preprocessing,
    )

    report.phase("compiling", ", ".join(spec.targets))
    builds, target_outcomes = _compile_all(
        profiles,
        source_dir / "model.onnx",
        evaluation_data,
        spec.max_accuracy_drop,
        env,
        report,
        preprocessing,
        shipped,
    )
    lineage = Lineage(
        base_model=spec.base if spec.base.startswith(UPLOAD_PREFIX) else backbone.name,
        base_digest=result.backbone_digest,
        dataset=spec.data
        + (f" (limit {spec.data_options.limit})" if spec.data_options.limit else ""),
        dataset_digest=result.dataset_digest,
        hyperparameters=best_params.as_strings(),
        seed=best_params.seed,
        strategy=best_params.strategy,
        device=result.device,
        training_seconds=time.perf_counter() - started,
        job_id=env.job_id,
        class_names=list(dataset.class_names),
        train_examples=result.train_examples,
        validation_examples=result.validation_examples,
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
    )
    metrics = result.metrics
    evaluation = Evaluation(
        accuracy=metrics.accuracy,
        count=metrics.count,
        per_class=[
            ClassScore(name=c.name, precision=c.precision, recall=c.recall, support=c.support)
            for c in metrics.per_class
        ],
        confusion=[list(row) for row in metrics.confusion],
        split=(
            f"validation {best_params.validation_fraction:.0%}, stratified, seed {best_params.seed}"
        ),
    )
    return JobResult(
        builds=builds,
        source=source,
        outcomes=target_outcomes,
        trials=outcomes if len(trials) > 1 else [],
        lineage=lineage,
        evaluation=evaluation,
    )


def _describe(params: FineTuneParams, spec: FineTuneSpec) -> str:
    searched = [name for name, _ in spec.search] or ["strategy", "lr"]
    values = params.model_dump()
    return ", ".join(f"{k}={values[k]}" for k in searched)


def _config(params: FineTuneParams, env: WorkerEnv) -> Any:
    from transfer.finetune import FineTuneConfig

    return FineTuneConfig(
        strategy=params.strategy,
        epochs=params.epochs,
        lr=params.lr,
        batch_size=params.batch_size,
        weight_decay=params.weight_decay,
        unfreeze_blocks=params.unfreeze_blocks,
        backbone_lr_scale=params.backbone_lr_scale,
        patience=params.patience or None,
        seed=params.seed,
        validation_fraction=params.validation_fraction,
        device=params.device,
        cache_dir=env.cache_dir if params.strategy == "head" else None,
    )


def _fine_tune(
    backbone: Any, dataset: Dataset, config: Any, split: Split, on_epoch: Callable[[Any], None]
) -> tuple[Any, Any]:
    from transfer.finetune import fine_tune

    return fine_tune(backbone, dataset, config, on_epoch=on_epoch, split=split)


def _buildable(profile: TargetProfile) -> TargetProfile:
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


def _feed_maker(backbone: Any, kind: str) -> Callable[[npt.NDArray[Any]], Feeds]:
    """Raw examples (pixels or strings) -> the exported graph's named inputs."""
    if kind == "text":

        def text_feeds(texts: npt.NDArray[Any]) -> Feeds:
            ids, mask = backbone.prepare(texts)
            return {
                TEXT_INPUTS[0]: ids.numpy().astype(np.int64),
                TEXT_INPUTS[1]: mask.numpy().astype(np.int64),
            }

        return text_feeds

    def image_feeds(images: npt.NDArray[Any]) -> Feeds:
        return {IMAGE_INPUT: np.ascontiguousarray(images, dtype=np.float32)}

    return image_feeds


def _export(model: Any, val_feeds: Feeds, folder: Path, kind: str, report: Reporter) -> list[str]:
    """The classifier as ONNX in `folder` (graph first, then one file per tensor), checked
    against torch on held-out inputs at batch 1 and at batch 8."""
    import torch

    from compilers.export import check_parity, export_onnx

    sample = {k: torch.from_numpy(v[:2]) for k, v in val_feeds.items()}
    dynamic = {name: {1: "sequence"} for name in TEXT_INPUTS} if kind == "text" else None
    path = export_onnx(
        _exportable(model, sample, report),
        sample,
        folder / "model.onnx",
        output_name=OUTPUT_NAME,
        external_data=True,
        dynamic_dims=dynamic,
    )
    checks = [take(val_feeds, 0, 1), take(val_feeds, 0, min(8, rows(val_feeds)))]
    parity = check_parity(model, path, checks, rtol=1e-3, atol=1e-4)
    worst = max(parity.max_abs_diff.values())
    report.log(f"ONNX matches torch within {worst:.2g} on {len(checks)} held-out batches")
    from compilers.layout import external_files

    return ["model.onnx", *sorted(p.name for p in external_files(path))]


def _exportable(model: Any, sample: dict[str, Any], report: Reporter) -> Any:
    """The classifier as torch.export can trace it. A TorchScript backbone (fine-tuned as
    it is) is converted to an exported program with its trained weights first; the parity
    check then compares the export with the TorchScript model itself."""
    import torch

    if not any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return model
    from torch._export.converter import TS2EPConverter

    from transfer.backbones import ExportedModule
    from transfer.finetune import Classifier

    report.log("converting the TorchScript backbone to torch.export for the ONNX export")
    try:
        program = TS2EPConverter(model.backbone, tuple(sample.values())).convert()
    except Exception as err:
        raise JobFailed(
            f"the TorchScript backbone could not be converted for export ({type(err).__name__}: "
            f"{err}); save it with torch.export.export(...) and torch.export.save(...) instead"
        ) from None
    return Classifier(
        ExportedModule(program.module()), model.head, model.class_names, model.preprocessing
    ).eval()


def _tokenizer_files(backbone: Any, dest: Path) -> list[str]:
    """Copy the tokenizer a text backbone needs next to the model; their relative paths."""
    folder = backbone.preprocessing.tokenizer_path
    if not folder:
        return []
    shipped = []
    for name in TOKENIZER_FILES:
        src = Path(folder) / name
        if src.is_file():
            (dest / "tokenizer").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / "tokenizer" / name)
            shipped.append(f"tokenizer/{name}")
    return shipped


def _preprocessing(
    backbone: Any, class_names: tuple[str, ...], shipped: list[str]
) -> dict[str, str]:
    pre = backbone.preprocessing
    params = {
        "kind": pre.kind,
        "inputs": pre.description,
        "in_graph": "; ".join(pre.in_graph),
        "output": f"{OUTPUT_NAME}: one score per class, argmax is the prediction",
        "class_names": json.dumps(list(class_names)),
    }
    if pre.input_shape:
        params["input_shape"] = json.dumps(list(pre.input_shape))
    if pre.pixel_range:
        params["pixel_range"] = json.dumps(list(pre.pixel_range))
    if shipped:
        params["tokenizer"] = "tokenizer/ (Hugging Face tokenizers files shipped in the artifact)"
        params["max_length"] = str(pre.max_length or "")
    return params


# ---------------------------------------------------------------- compile


def _compile_all(
    profiles: list[TargetProfile],
    source: Path,
    data: EvaluationData,
    max_accuracy_drop: float,
    env: WorkerEnv,
    report: Reporter,
    preprocessing: dict[str, str],
    extra_files: list[str],
) -> tuple[list[BuildResult], list[TargetOutcome]]:
    builds: list[BuildResult] = []
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


def _metrics_line(metrics: dict[str, float]) -> str:
    parts = [f"{metrics['size_bytes'] / 1e6:.2f} MB"]
    if "latency_p50_ms" in metrics:
        parts.append(f"p50 {metrics['latency_p50_ms']:.3f} ms at batch 1")
    if "accuracy" in metrics:
        parts.append(
            f"accuracy {metrics['accuracy']:.2%} ({-metrics['accuracy_drop'] * 100:+.2f} points)"
        )
    return ", ".join(parts)


def _providers(profile: TargetProfile) -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    wanted = [p for p in profile.providers if p in have]
    return wanted or ["CPUExecutionProvider"]


def _compile_one(
    profile: TargetProfile,
    source: Path,
    data: EvaluationData,
    max_accuracy_drop: float,
    env: WorkerEnv,
    preprocessing: dict[str, str],
    extra_files: list[str],
) -> BuildResult:
    from compilers.compile import compile_target
    from compilers.tensorrt import engine_evaluator

    out = env.job_dir / "builds" / profile.name
    shutil.rmtree(out, ignore_errors=True)
    evaluate: Callable[[Path], float] | None = None
    if len(data.labels):
        if profile.runtime is Runtime.TENSORRT:
            source_score = accuracy_evaluator(data.validation, data.labels)
            engine_score = engine_evaluator(data.validation, data.labels)

            def evaluate(path: Path) -> float:
                return engine_score(path) if path.suffix == ".plan" else source_score(path)
        else:
            evaluate = accuracy_evaluator(data.validation, data.labels, _providers(profile))
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
    )
    files = [p.relative_to(out).as_posix() for p in compiled.files]
    for name in extra_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / name, out / name)
        files.append(name)
    metrics = dict(compiled.metrics)
    one = take(data.validation, 0, 1)
    if profile.runtime is Runtime.ONNXRUNTIME and not profile.needs_gpu:
        p50, p99 = latency_ms(compiled.primary, one)
        metrics |= {"latency_p50_ms": p50, "latency_p99_ms": p99}
    budget = max(GOLDEN_MIN_BYTES, int(GOLDEN_SHARE * metrics["size_bytes"]))
    golden = _golden(profile, compiled.primary, source, data.validation, budget)
    golden_file = f"builds/{profile.name}.golden.pb"
    (env.job_dir / golden_file).write_bytes(
        artifact_pb2.Manifest(golden_samples=golden).SerializeToString()
    )
    return BuildResult(
        target=profile.name,
        folder=f"builds/{profile.name}",
        files=files,
        format="onnx" if profile.runtime is Runtime.ONNXRUNTIME else "tensorrt-plan",
        metrics=metrics,
        steps=list(compiled.steps),
        golden_file=golden_file,
        preprocessing=preprocessing,
        metadata={"class_names": preprocessing.get("class_names", "[]")},
    )


def _golden(
    profile: TargetProfile, built: Path, source: Path, validation: Feeds, budget: int
) -> list[Any]:
    """Held-out examples at batch 1 and the outputs the device must reproduce.

    CPU artifacts: the artifact's own outputs on this CPU. Others (GPU, TensorRT), which
    the cloud may not run exactly as the device will: the FP32 source's outputs, with
    tolerances wide enough for FP16.
    """
    per_example = sum(v[:1].nbytes for v in validation.values())
    count = max(1, min(GOLDEN_COUNT, rows(validation), budget // max(per_example, 1)))
    feeds = [take(validation, i, i + 1) for i in range(count)]
    cpu_exact = profile.runtime is Runtime.ONNXRUNTIME and not profile.needs_gpu
    run = session(built if cpu_exact else source)
    names = [o.name for o in run.get_outputs()]
    outputs = [dict(zip(names, run.run(None, f), strict=True)) for f in feeds]
    scale = max(float(np.abs(o[names[0]]).max()) for o in outputs)
    if cpu_exact and profile.precision is Precision.FP32:
        rtol, atol = 1e-3, 1e-4 + 1e-4 * scale
    else:
        # INT8 kernels differ between CPUs (VNNI or not); FP16 rounds at every layer.
        rtol, atol = 5e-2, 5e-2 * scale
    return golden_from_outputs(feeds, outputs, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- compile job


def run_compile(spec: CompileSpec, env: WorkerEnv, report: Reporter) -> JobResult:
    """One more target for an existing version, from its source in `job_dir/source` (the
    manager writes it there, with `source.manifest`, before the worker starts)."""
    report.phase("validating", f"{spec.model} v{spec.version} -> {spec.target}")
    profile = _buildable(resolve_target(spec.target))
    source_dir = env.job_dir / "source"
    manifest = artifact_pb2.Manifest()
    manifest.ParseFromString((env.job_dir / "source.manifest").read_bytes())
    entry = source_dir / manifest.entrypoint
    kept = source_dir / EVALUATION_FILE
    if spec.data:
        data = _evaluation_from(spec, entry, env)
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
    builds, outcomes = _compile_all(
        [profile], entry, data, spec.max_accuracy_drop, env, report, preprocessing, shipped
    )
    return JobResult(builds=builds, outcomes=outcomes)


def _evaluation_from(spec: CompileSpec, entry: Path, env: WorkerEnv) -> EvaluationData:
    dataset = load_job_data(spec.data, spec.data_options, env, seed=0)
    run = session(entry)
    inputs = run.get_inputs()
    if len(inputs) != 1 or dataset.kind == "text":
        raise JobFailed(
            f"--data can score models with one numeric input; {spec.model} takes "
            f"{[i.name for i in inputs]}: fine-tune it here so its evaluation data is kept"
        )
    x = dataset.inputs[:MAX_EVALUATION_EXAMPLES].astype(np.float32)
    feeds: Feeds = {inputs[0].name: x}
    try:
        run.run(None, take(feeds, 0, 1))
    except Exception as err:
        raise JobFailed(
            f"{spec.model} v{spec.version} cannot run on the examples of {spec.data} "
            f"(shape {list(x.shape[1:])}): {err}"
        ) from None
    calibration: Feeds = {inputs[0].name: x[:MAX_CALIBRATION_EXAMPLES]}
    return EvaluationData(feeds, dataset.labels[: len(x)], calibration, dataset.class_names)


def _example_feed(entry: Path) -> Feeds:
    """Zeros of the graph's input shapes at batch 1: enough to time and smoke-test a model
    compiled without data (FP32 targets only)."""
    from edgefleet.core.tensors import ORT_TO_DATATYPE, numpy_dtype

    feed: Feeds = {}
    for i in session(entry).get_inputs():
        shape = [1 if not isinstance(d, int) or d < 0 else d for d in i.shape]
        feed[i.name] = np.zeros(shape, dtype=numpy_dtype(ORT_TO_DATATYPE[i.type]))
    return feed
