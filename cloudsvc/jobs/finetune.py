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
from compilers.sampling import stratified_sample
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
    dataset, test = _test_set(spec, dataset, env, first.seed, report)
    warm = WarmStart.read(env.job_dir / PARENT_SOURCE, spec) if spec.warm_start else None
    base_digest = ""

    def backbone_for(params: FineTuneParams) -> Backbone:
        nonlocal base_digest
        base: str | Path = spec.base
        if spec.base.startswith(UPLOAD_PREFIX):
            base = resolve_upload(spec.base, env.uploads_dir)
        shape = dataset.input_shape if dataset.kind == "image" else None
        loaded = load_backbone(base, input_shape=shape, image_size=params.image_size)
        # The base as loaded, before a warm start or training changes its weights: one
        # base, one digest, whatever the strategy.
        base_digest = base_digest or loaded.weights_digest()
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
    seeds = f", {spec.seeds} seeds each" if spec.seeds > 1 else ""
    report.log(
        f"split: {len(split.train)} training, {len(split.validation)} validation examples "
        f"(stratified, seed {first.seed}); backbone {backbone.name} "
        f"({backbone.feature_dim} features); {len(trials)} trial(s){seeds}; targets "
        f"{', '.join(spec.targets)}"
    )

    report.phase("training")
    search = _Search(spec, trials, report)
    dirty = False
    runs = [
        (n, p, c, s)
        for n, (p, c) in enumerate(zip(trials, configs, strict=True), 1)
        for s in range(spec.seeds)
    ]
    for index, (number, params, config, offset) in enumerate(runs):
        if index and (config.strategy != "head" or dirty):
            # last-n / full train the backbone in place; every such run starts from the
            # pretrained weights, and a kept head-only winner keeps its own.
            backbone = backbone_for(params)
        config = replace(config, seed=params.seed + offset)
        report.update(trial=number, trials=len(trials), epoch=0, epochs=config.epochs)
        run_started = time.perf_counter()
        try:
            model, result = _fine_tune(
                backbone,
                dataset,
                config,
                split,
                search.on_epoch(index, len(runs)),
                warm.load_head if warm else None,
            )
        except EdgefleetError as err:
            if len(runs) == 1:
                raise
            search.failed(number, params, err)
            dirty = True
            continue
        dirty = config.strategy != "head"
        search.add(number, params, config.seed, model, result, time.perf_counter() - run_started)
    model, result, best_number = search.winner()
    best_params = trials[best_number - 1]
    validation_metrics = result.metrics
    if spec.final:
        model, result = _final_run(
            spec,
            best_params,
            configs[best_number - 1],
            result,
            dataset,
            split,
            backbone_for,
            warm,
            report,
        )

    test_evaluation = None
    if test is not None:
        from transfer.finetune import predict_logits, score

        report.update(message=f"scoring the chosen model on the {len(test)} test examples")
        test_evaluation = replace(
            score(predict_logits(model, backbone, test.inputs), test.labels, test.class_names),
            split=f"test: {test.source}",
            sample=f"{len(test)} examples, all of the test set",
        )
        low, high = test_evaluation.interval()
        report.log(
            f"test accuracy of the chosen model: {test_evaluation.accuracy:.2%} (95% CI "
            f"{low:.1%}-{high:.1%} on {len(test)} examples; one example is "
            f"{test_evaluation.example_points:.2g} points), loss {test_evaluation.loss:.4f}"
        )

    report.phase("exporting", "ONNX with a dynamic batch, one file per weight tensor")
    feeds = feed_maker(backbone, dataset.kind)
    source_dir = env.job_dir / "source"
    # Stratified samples: data sets are often stored class by class, and the first
    # examples alone would calibrate INT8 and score it on a few classes. With a test set,
    # the accuracy gate of INT8/FP16 is judged on it (on more than the validation rows).
    scored_set = test if test is not None else split.validation
    scored = stratified_sample(scored_set.labels, MAX_EVALUATION_EXAMPLES, seed=best_params.seed)
    gate_feeds = feeds(scored_set.inputs[scored.indices])
    calibrating = stratified_sample(
        split.train.labels, MAX_CALIBRATION_EXAMPLES, seed=best_params.seed + 1
    )
    cal_feeds = feeds(split.train.inputs[calibrating.indices])
    report.log(
        f"accuracy gate of lower-precision targets: {scored.describe(dataset.class_names)} of "
        f"the {'test' if test is not None else 'validation'} set; INT8 calibration: "
        f"{calibrating.describe(dataset.class_names)} of the training split (stratified)"
    )
    # What devices' inputs are compared with: the training split as the graph takes it.
    rng = np.random.default_rng(best_params.seed)
    sample = np.sort(rng.permutation(len(split.train))[:MAX_BASELINE_EXAMPLES])
    baseline = tuple(
        baseline_stats(name, array) for name, array in feeds(split.train.inputs[sample]).items()
    )
    source_files = _export(model, gate_feeds, source_dir, dataset.kind, report)
    evaluation_data = EvaluationData(
        validation=gate_feeds,
        labels=scored_set.labels[scored.indices],
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
        base_digest=base_digest,
        dataset=" + ".join(spec.data_references)
        + (f" (limit {spec.data_options.limit} each)" if spec.data_options.limit else ""),
        dataset_digest=result.dataset_digest,
        hyperparameters=best_params.as_strings(),
        seed=best_params.seed,
        strategy=best_params.strategy,
        device=result.device,
        training_seconds=time.perf_counter() - search.started,
        job_id=env.job_id,
        class_names=tuple(dataset.class_names),
        train_examples=result.train_examples,
        validation_examples=len(split.validation),
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
        warm_start_from=spec.parent_version if warm is not None else 0,
        test_examples=len(test) if test is not None else 0,
        final=spec.final,
    )
    evaluation = replace(
        validation_metrics,
        split=f"validation {best_params.validation_fraction:.0%}, stratified, seed {best_params.seed}",
        sample=f"{validation_metrics.count} examples, the whole validation split",
    )
    return JobResult(
        builds=tuple(builds),
        source=source,
        outcomes=tuple(target_outcomes),
        trials=search.trials() if len(runs) > 1 else (),
        lineage=lineage,
        evaluation=evaluation,
        baseline=baseline,
        test=test_evaluation,
    )


def _test_set(
    spec: FineTuneSpec, dataset: Dataset, env: WorkerEnv, seed: int, report: Reporter
) -> tuple[Dataset, Dataset | None]:
    """The data left to train and validate on, and the test set kept apart from it (None
    without one). A test set's classes are mapped onto the training classes by name."""
    from transfer.datasets import split_dataset

    if spec.test_fraction:
        parts = split_dataset(dataset, spec.test_fraction, seed + 7919)
        test = replace(parts.validation, source=f"{spec.test_fraction:.0%} of {dataset.source}")
        report.log(
            f"test set: {len(test)} examples ({spec.test_fraction:.0%} of the data, stratified)"
            " kept apart: no training, early stopping or search reads them"
        )
        return parts.train, test
    if not spec.test_data:
        return dataset, None
    loaded = load_all_data((spec.test_data,), spec.data_options, env, seed)
    unknown = [c for c in loaded.class_names if c not in dataset.class_names]
    if unknown:
        raise JobFailed(
            f"the test set {spec.test_data} has classes the training data lacks: "
            f"{', '.join(unknown)}; a model cannot predict a class it never saw"
        )
    if loaded.kind != dataset.kind or loaded.input_shape != dataset.input_shape:
        raise JobFailed(
            f"the test set {spec.test_data} holds {loaded.kind} examples of shape "
            f"{list(loaded.input_shape)} and the training data {dataset.kind} of "
            f"{list(dataset.input_shape)}"
        )
    index = {c: i for i, c in enumerate(dataset.class_names)}
    labels = np.asarray([index[loaded.class_names[i]] for i in loaded.labels], dtype=np.int64)
    test = Dataset(loaded.kind, loaded.inputs, labels, dataset.class_names, source=spec.test_data)
    if test.digest == dataset.digest:
        raise JobFailed(f"the test set {spec.test_data} is the training data itself")
    report.log(f"test set {spec.test_data}: {len(test)} examples, kept apart until the end")
    return dataset, test


def _final_run(
    spec: FineTuneSpec,
    params: FineTuneParams,
    config: Any,
    chosen: Any,
    dataset: Dataset,
    split: Split,
    backbone_for: Callable[[FineTuneParams], Any],
    warm: WarmStart | None,
    report: Reporter,
) -> tuple[Any, Any]:
    """Train the chosen settings again on training + validation data for the epochs the
    validation run chose, keeping the last epoch."""
    from transfer.finetune import final_split

    epochs = max(1, chosen.best_epoch)
    report.log(
        f"final run: the chosen settings on training + validation data "
        f"({len(split.train) + len(split.validation)} examples) for {epochs} epoch(s), the "
        "validation run's best; the last epoch is kept"
    )
    report.update(message="final run", epoch=0, epochs=epochs)
    backbone = backbone_for(params)
    final_config = replace(config, epochs=epochs, patience=None, keep="last")

    def on_epoch(p: Any) -> None:
        report.update(epoch=p.epoch, epochs=p.epochs, loss=p.loss, eta_seconds=p.eta_seconds)

    return _fine_tune(
        backbone,
        dataset,
        final_config,
        final_split(split),
        on_epoch,
        warm.load_head if warm else None,
    )


class _Search:
    """Runs of a search (each trial with one or more seeds), ranked by mean validation
    accuracy, ties broken by lower mean validation loss, then by the earlier trial. Keeps
    the model of the best seed of the leading trial."""

    TIE_RULE = "higher validation accuracy; ties: lower validation loss, then earlier trial"

    def __init__(self, spec: FineTuneSpec, trials: list[FineTuneParams], report: Reporter):
        self.spec, self.params, self.report = spec, trials, report
        self.runs: dict[int, list[tuple[float, float, float, int]]] = {}
        self.errors: dict[int, str] = {}
        self.kept: dict[int, tuple[Any, Any, tuple[float, float]]] = {}
        self.started = time.perf_counter()

    def on_epoch(self, index: int, total: int) -> Callable[[Any], None]:
        t0 = time.perf_counter()

        def show(p: Any) -> None:
            per_run = (
                (t0 - self.started) / index if index else time.perf_counter() - t0 + p.eta_seconds
            )
            self.report.update(
                epoch=p.epoch,
                epochs=p.epochs,
                loss=p.loss,
                train_accuracy=p.train_accuracy,
                val_accuracy=p.val_accuracy,
                eta_seconds=p.eta_seconds + (total - index - 1) * per_run,
            )

        return show

    def failed(self, number: int, params: FineTuneParams, err: Exception) -> None:
        self.errors[number] = str(err)
        self.report.log(f"trial {number} failed: {err}")

    def _key(self, number: int) -> tuple[float, float, int]:
        runs = self.runs[number]
        return (
            -sum(r[0] for r in runs) / len(runs),
            sum(r[1] for r in runs) / len(runs),
            number,
        )

    def add(
        self,
        number: int,
        params: FineTuneParams,
        seed: int,
        model: Any,
        result: Any,
        seconds: float,
    ) -> None:
        """Record a run; its model is kept while it is the leading trial's best seed."""
        accuracy, loss = result.metrics.accuracy, result.metrics.loss
        self.runs.setdefault(number, []).append((accuracy, loss, seconds, result.epochs_run))
        seeds = f", seed {seed}" if self.spec.seeds > 1 else ""
        self.report.log(
            f"trial {number}/{len(self.params)} ({_describe(params, self.spec)}{seeds}): "
            f"validation accuracy {accuracy:.2%}, loss {loss:.4f} after {result.epochs_run} "
            f"epoch(s), best at epoch {result.best_epoch}, {result.training_seconds:.1f}s on "
            f"{result.device}"
        )
        own = self.kept.get(number)
        if own is None or (-accuracy, loss) < own[2]:
            self.kept[number] = (model, result, (-accuracy, loss))
        leader = min(self.runs, key=self._key)
        # Only the leading trial's model is held: a search of many trials stays in memory.
        for other in [n for n in self.kept if n != leader and n != number]:
            del self.kept[other]
        if number != leader:
            self.kept.pop(number, None)

    def winner(self) -> tuple[Any, Any, int]:
        if not self.runs:
            raise JobFailed("every trial of the search failed; see the log for each one's error")
        leader = min(self.runs, key=self._key)
        model, result, _ = self.kept[leader]
        if len(self.runs) > 1 or self.spec.seeds > 1:
            self.report.log(f"kept trial {leader}: ranked by {self.TIE_RULE}")
        return model, result, leader

    def trials(self) -> tuple[Trial, ...]:
        leader = min(self.runs, key=self._key) if self.runs else 0
        out = []
        for number, params in enumerate(self.params, 1):
            if number in self.errors and number not in self.runs:
                out.append(
                    Trial(number=number, params=params.as_strings(), error=self.errors[number])
                )
                continue
            runs = self.runs.get(number, [])
            if not runs:
                continue
            accuracies = [r[0] for r in runs]
            out.append(
                Trial(
                    number=number,
                    params=params.as_strings(),
                    val_accuracy=sum(accuracies) / len(runs),
                    val_loss=sum(r[1] for r in runs) / len(runs),
                    epochs_run=runs[-1][3],
                    seconds=sum(r[2] for r in runs),
                    best=number == leader,
                    seeds=len(runs),
                    val_accuracy_min=min(accuracies),
                    val_accuracy_max=max(accuracies),
                )
            )
        return tuple(out)


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
                    "from; fine-tune with --from-base"
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
