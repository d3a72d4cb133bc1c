"""What a worker does for a fine-tune job (needs torch): validate -> train (each trial of a
search) -> export to ONNX with a parity check -> compile every target -> hand the files to
the manager. Every check that can fail on the user's input (data set, backbone, settings,
targets) runs in the `validating` phase, before the first forward pass."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cloudsvc.errors import JobFailed
from cloudsvc.jobs.compile import buildable, compile_all
from cloudsvc.jobs.data import (
    MAX_CALIBRATION_EXAMPLES,
    MAX_EVALUATION_EXAMPLES,
    OUTPUT_NAME,
    TEXT_INPUTS,
    feed_maker,
    load_all_data,
)
from cloudsvc.jobs.env import CLASS_NAMES_FILE, PARENT_SOURCE, WorkerEnv
from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.feeds import EVALUATION_FILE, EvaluationData, Feeds, rows, take
from cloudsvc.jobs.results import JobResult
from cloudsvc.jobs.spec import UPLOAD_PREFIX, FineTuneParams, FineTuneSpec, resolve_upload
from cloudsvc.registry import SOURCE_TARGET
from compilers.build import Build
from compilers.targets import resolve_target
from edgefleet.core.data import baseline_stats
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.jobs import Trial
from edgefleet.core.versions import Lineage
from transfer.datasets import Dataset, Split

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


# Training examples summarised into the version's input baseline.
MAX_BASELINE_EXAMPLES = 2000


def run_finetune(spec: FineTuneSpec, env: WorkerEnv, report: Reporter) -> JobResult:
    import torch

    from transfer.backbones import Backbone, load_backbone
    from transfer.datasets import split_dataset
    from transfer.finetune import check_config

    if env.threads:
        torch.set_num_threads(env.threads)
    trials = spec.trials()
    first = trials[0]
    report.phase("validating", f"loading data set {' + '.join(spec.data_references)}")
    dataset = load_all_data(spec.data_references, spec.data_options, env, first.seed)
    counts = ", ".join(f"{k} {v}" for k, v in dataset.class_counts().items())
    report.log(f"data set {dataset.source}: {len(dataset)} examples; {counts}")
    warm = WarmStart.read(env.job_dir / PARENT_SOURCE, spec) if spec.warm_start else None

    def backbone_for(params: FineTuneParams) -> Backbone:
        base: str | Path = spec.base
        if spec.base.startswith(UPLOAD_PREFIX):
            base = resolve_upload(spec.base, env.uploads_dir)
        shape = dataset.input_shape if dataset.kind == "image" else None
        loaded = load_backbone(base, input_shape=shape, image_size=params.image_size)
        if warm is not None:
            warm.load_backbone(loaded)  # before anything reads its digest (the feature cache)
        return loaded

    report.log(f"loading backbone {spec.base}")
    from transfer.backbones import default_small_cnn_path

    if spec.base == "small-cnn" and not default_small_cnn_path().exists():
        report.log("pretraining the built-in small-cnn on generated images (once per machine)")
    backbone = backbone_for(first)
    backbone.check_inputs(dataset.kind, dataset.input_shape)
    if warm is not None:
        report.log(warm.describe(dataset.class_names))
    configs = [_config(p, env) for p in trials]
    for config in configs:
        check_config(config, backbone)
    profiles = [buildable(resolve_target(t)) for t in spec.targets]
    split = split_dataset(dataset, first.validation_fraction, first.seed)
    report.log(
        f"split: {len(split.train)} training, {len(split.validation)} validation examples "
        f"(stratified, seed {first.seed}); backbone {backbone.name} "
        f"({backbone.feature_dim} features); {len(trials)} trial(s); targets "
        f"{', '.join(spec.targets)}"
    )

    report.phase("training")
    best: tuple[Any, Any, int] | None = None
    outcomes: list[Trial] = []
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
            model, result = _fine_tune(
                backbone, dataset, config, split, on_epoch, warm.load_head if warm else None
            )
        except EdgefleetError as err:
            if len(trials) == 1:
                raise
            outcomes.append(Trial(number=number, params=params.as_strings(), error=str(err)))
            report.log(f"trial {number} failed: {err}")
            dirty = True
            continue
        dirty = config.strategy != "head"
        accuracy = result.metrics.accuracy
        outcomes.append(
            Trial(
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
    outcomes = [replace(t, best=t.number == best_number) for t in outcomes]
    best_params = trials[best_number - 1]

    report.phase("exporting", "ONNX with a dynamic batch, one file per weight tensor")
    feeds = feed_maker(backbone, dataset.kind)
    source_dir = env.job_dir / "source"
    validation = split.validation
    # Seeded samples across the whole split: data sets are often stored class by class,
    # and the first examples alone would calibrate INT8 and score it on a few classes.
    rng = np.random.default_rng(best_params.seed)
    kept = np.sort(rng.permutation(len(validation))[:MAX_EVALUATION_EXAMPLES])
    val_feeds = feeds(validation.inputs[kept])
    typical = np.sort(rng.permutation(len(split.train))[:MAX_CALIBRATION_EXAMPLES])
    cal_feeds = feeds(split.train.inputs[typical])
    # What devices' inputs are compared with: the training split as the graph takes it.
    sample = np.sort(rng.permutation(len(split.train))[:MAX_BASELINE_EXAMPLES])
    baseline = tuple(
        baseline_stats(name, array) for name, array in feeds(split.train.inputs[sample]).items()
    )
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
    source = Build(
        target=SOURCE_TARGET,
        folder=source_dir,
        files=(*source_files, *shipped, EVALUATION_FILE),
        steps=("export-dynamo-per-tensor", "parity-checked"),
        preprocessing=preprocessing,
    )

    report.phase("compiling", ", ".join(spec.targets))
    builds, target_outcomes = compile_all(
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
        dataset=" + ".join(spec.data_references)
        + (f" (limit {spec.data_options.limit} each)" if spec.data_options.limit else ""),
        dataset_digest=result.dataset_digest,
        hyperparameters=best_params.as_strings(),
        seed=best_params.seed,
        strategy=best_params.strategy,
        device=result.device,
        training_seconds=time.perf_counter() - started,
        job_id=env.job_id,
        class_names=tuple(dataset.class_names),
        train_examples=result.train_examples,
        validation_examples=result.validation_examples,
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
        warm_start_from=spec.parent_version if warm is not None else 0,
    )
    evaluation = replace(
        result.metrics,
        split=f"validation {best_params.validation_fraction:.0%}, stratified, seed {best_params.seed}",
    )
    return JobResult(
        builds=tuple(builds),
        source=source,
        outcomes=tuple(target_outcomes),
        trials=tuple(outcomes) if len(trials) > 1 else (),
        lineage=lineage,
        evaluation=evaluation,
        baseline=baseline,
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
    backbone: Any,
    dataset: Dataset,
    config: Any,
    split: Split,
    on_epoch: Callable[[Any], None],
    init: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    from transfer.finetune import fine_tune

    return fine_tune(backbone, dataset, config, on_epoch=on_epoch, split=split, init=init)


class WarmStart:
    """The parent version's trained weights, read from its kept FP32 export (the exporter
    names each initializer as the torch module's state_dict does: `head.weight`,
    `backbone.features.0.weight`, ...). The head's rows are taken by class name, so a class
    the parent did not know starts fresh and a reordered class keeps its own row; backbone
    tensors are taken where name and shape match (the ones a last-n or full parent trained;
    a head-only parent's equal the pretrained ones)."""

    def __init__(self, version: int, weights: dict[str, Any], class_names: tuple[str, ...]):
        self.version = version
        self.weights = weights
        self.class_names = class_names
        self.backbone_tensors = 0

    @classmethod
    def read(cls, folder: Path, spec: FineTuneSpec) -> WarmStart:
        import onnx
        from onnx import numpy_helper

        graph = folder / "model.onnx"
        if not graph.is_file():
            raise JobFailed(
                f"the warm start's weights (v{spec.parent_version}'s kept export) were not "
                "handed to the worker; retry the job"
            )
        model = onnx.load(str(graph), load_external_data=True)
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        try:
            names = tuple(json.loads((folder / CLASS_NAMES_FILE).read_text()))
        except (OSError, ValueError):
            names = ()
        for key in ("head.weight", "head.bias"):
            if key not in weights:
                raise JobFailed(
                    f"{spec.model} v{spec.parent_version}'s export has no {key!r} tensor (it "
                    "was not fine-tuned here, or exported otherwise): it cannot be warm-started "
                    "from; fine-tune without --warm-start"
                )
        if not names or len(names) != len(weights["head.bias"]):
            raise JobFailed(
                f"{spec.model} v{spec.parent_version} does not say which class each of its "
                f"{len(weights['head.bias'])} outputs is: it cannot be warm-started from"
            )
        return cls(spec.parent_version, weights, names)

    def load_backbone(self, backbone: Any) -> None:
        import torch

        state = backbone.module.state_dict()
        found = {}
        for key, tensor in state.items():
            value = self.weights.get(f"backbone.{key}")
            if value is not None and tuple(value.shape) == tuple(tensor.shape):
                found[key] = torch.from_numpy(np.array(value, dtype=np.float32)).to(tensor.dtype)
        backbone.module.load_state_dict(found, strict=False)
        self.backbone_tensors = len(found)

    def load_head(self, model: Any) -> None:
        import torch

        weight, bias = self.weights["head.weight"], self.weights["head.bias"]
        head = model.head
        if tuple(weight.shape[1:]) != tuple(head.weight.shape[1:]):
            raise JobFailed(
                f"v{self.version}'s head reads {weight.shape[1]} features and this backbone "
                f"gives {head.weight.shape[1]}: warm start needs the parent's backbone"
            )
        parent = {name: i for i, name in enumerate(self.class_names)}
        for i, name in enumerate(model.class_names):
            j = parent.get(name)
            if j is not None:
                head.weight[i] = torch.from_numpy(np.array(weight[j], dtype=np.float32))
                head.bias[i] = float(bias[j])

    def describe(self, class_names: tuple[str, ...]) -> str:
        kept = [c for c in class_names if c in self.class_names]
        new = ", ".join(c for c in class_names if c not in self.class_names)
        fresh = f" (new: {new})" if new else ""
        return (
            f"warm start from v{self.version}: head rows of {len(kept)} of {len(class_names)} "
            f"classes from it{fresh}, {self.backbone_tensors} backbone tensors"
        )


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
