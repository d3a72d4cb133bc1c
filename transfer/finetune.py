"""Fine-tune a pretrained backbone plus a new linear head on a labelled data set.

Strategies:
- `head`: the backbone is frozen, so its features are computed once (and optionally cached
  on disk, keyed by backbone digest + data set digest) and every epoch trains only the head.
  `cache_features=False` recomputes the backbone every epoch: the baseline the benchmark
  compares against, with the same shuffling, initialisation and result.
- `last-n`: the last N backbone blocks and the head train; the rest stays frozen.
- `full`: everything trains, the backbone at `backbone_lr_scale` times the head's rate.

BatchNorm layers always run in eval mode (their running statistics stay pretrained): with
small fine-tune batches, updating them collapsed accuracy (see STACK.md, trap 13).
Every check that can fail (settings, data set vs backbone, split) runs before any forward pass.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edgefleet.core.versions import EpochRecord, Evaluation
from edgefleet.core.wire import to_jsonable
from transfer.backbones import Backbone, Preprocessing
from transfer.datasets import Dataset, Split, split_dataset, validate_dataset
from transfer.errors import InvalidConfig
from transfer.metrics import evaluate
from transfer.train import seed_everything

Strategy = Literal["head", "last-n", "full"]
STRATEGIES: tuple[Strategy, ...] = ("head", "last-n", "full")


@dataclass(frozen=True)
class FineTuneConfig:
    strategy: Strategy = "head"
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    unfreeze_blocks: int = 1  # last-n: how many of the backbone's last blocks train
    backbone_lr_scale: float = 0.1  # last-n / full: backbone rate = lr * this
    patience: int | None = 5  # epochs without a better validation accuracy; None: never stop
    min_delta: float = 0.0
    validation_fraction: float = 0.2
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | None = None  # None: on exactly when training on CUDA
    cache_features: bool = True  # head only
    cache_dir: Path | None = None  # head only: keep features on disk across runs
    feature_batch_size: int = 64  # 256 ran 2x slower per image on CPU (EfficientNet-Lite0, 64px)
    # best: end at the epoch with the best validation accuracy; last: keep the last epoch
    # (a --final run, whose "validation" data is trained on and cannot choose).
    keep: Literal["best", "last"] = "best"

    def hyperparameters(self) -> dict[str, Any]:
        out = asdict(self)
        out["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        return out


@dataclass(frozen=True)
class EpochProgress:
    epoch: int
    epochs: int
    loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float
    eta_seconds: float
    improved: bool
    val_loss: float = 0.0
    learning_rate: float = 0.0


@dataclass(frozen=True)
class FineTuneResult:
    """What a version's lineage records about how it was trained."""

    strategy: Strategy
    backbone: str
    backbone_digest: str
    dataset_digest: str
    dataset_source: str
    class_names: tuple[str, ...]
    hyperparameters: dict[str, Any]
    seed: int
    device: str
    amp: bool
    train_examples: int
    validation_examples: int
    feature_cache: Literal["none", "memory", "disk-hit", "disk-miss"]
    feature_seconds: float  # the one-time feature pass (head with cache), else 0
    training_seconds: float  # wall time of the whole run, feature pass included
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    metrics: Evaluation
    history: tuple[EpochProgress, ...] = field(default=())
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = to_jsonable(self)
        return value


class Classifier(nn.Module):
    """Backbone plus head as one module, ready for export: logits = head(backbone(*inputs))."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        class_names: tuple[str, ...],
        preprocessing: Preprocessing,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.class_names = class_names
        self.preprocessing = preprocessing

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(*inputs))
        return out


ProgressCallback = Callable[[EpochProgress], None]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig("device='cuda' but no CUDA device is visible here; use 'auto' or 'cpu'")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested not in ("cuda", "auto", "cpu"):
        raise InvalidConfig(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    return torch.device("cpu")


def check_config(config: FineTuneConfig, backbone: Backbone) -> None:
    """Raise InvalidConfig naming the bad setting and its allowed range."""
    if config.strategy not in STRATEGIES:
        raise InvalidConfig(
            f"unknown strategy {config.strategy!r}; use one of {', '.join(STRATEGIES)}"
        )
    checks = [
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (
            config.lr > 0 and math.isfinite(config.lr),
            f"lr must be a positive number, got {config.lr}",
        ),
        (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}"),
        (config.feature_batch_size >= 1, "feature_batch_size must be >= 1"),
        (config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}"),
        (config.backbone_lr_scale > 0, "backbone_lr_scale must be > 0"),
        (config.patience is None or config.patience >= 1, "patience must be >= 1 or None"),
        (config.keep in ("best", "last"), f"keep must be 'best' or 'last', got {config.keep!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidConfig(message)
    if config.strategy == "last-n" and not 1 <= config.unfreeze_blocks <= len(backbone.blocks):
        raise InvalidConfig(
            f"unfreeze_blocks must lie in 1..{len(backbone.blocks)} for backbone "
            f"{backbone.name!r} (it has {len(backbone.blocks)} blocks), got {config.unfreeze_blocks}"
        )
    if config.strategy != "head" and config.cache_dir is not None:
        raise InvalidConfig(
            f"cache_dir applies to strategy 'head' only; strategy {config.strategy!r} trains "
            "the backbone, so its features change every step"
        )


def fine_tune(
    backbone: Backbone,
    dataset: Dataset,
    config: FineTuneConfig | None = None,
    *,
    on_epoch: ProgressCallback | None = None,
    split: Split | None = None,
    init: Callable[[Classifier], None] | None = None,
) -> tuple[Classifier, FineTuneResult]:
    """Train a new head (and, per strategy, parts of the backbone) on `dataset`.

    The backbone's module is trained in place and becomes the returned Classifier's
    backbone. `on_epoch` is called after every epoch; an exception it raises stops training
    (how a job is cancelled). Pass `split` to reuse one split across runs. `init`, when
    given, sets the classifier's starting weights (a warm start from an earlier version's
    head) after the head is made and before anything trains.
    """
    config = config or FineTuneConfig()
    check_config(config, backbone)
    validate_dataset(dataset)
    backbone.check_inputs(dataset.kind, dataset.input_shape)
    if split is None:
        split = split_dataset(dataset, config.validation_fraction, config.seed)
    elif not _made_from(split, dataset):
        raise InvalidConfig("the split passed to fine_tune was not made from this data set")
    device = resolve_device(config.device)
    amp = (device.type == "cuda") if config.amp is None else config.amp
    if amp and device.type != "cuda":
        raise InvalidConfig("amp=True needs CUDA; leave amp=None to use it exactly when available")

    seed_everything(config.seed)
    head = nn.Linear(backbone.feature_dim, dataset.num_classes)
    model = Classifier(backbone.module, head, dataset.class_names, backbone.preprocessing)
    if init is not None:
        with torch.no_grad():
            init(model)
    model = model.to(device)
    runner = _Runner(backbone, model, config, device, amp)

    feature_cache: Literal["none", "memory", "disk-hit", "disk-miss"] = "none"
    feature_seconds = 0.0
    t0 = time.perf_counter()
    if config.strategy == "head" and config.cache_features:
        feats, feature_cache = _features_for(backbone, dataset, split, config, runner)
        feature_seconds = time.perf_counter() - t0
        loop = runner.train_head_on_features(feats, split, on_epoch)
    elif config.strategy == "head":
        loop = runner.train_head_recomputing(split, on_epoch)
    else:
        loop = runner.train_end_to_end(split, on_epoch)
    training_seconds = time.perf_counter() - t0

    model.eval()
    predictions = loop.final_predictions
    kept = loop.history[loop.best_epoch - 1] if loop.best_epoch else None
    metrics = replace(
        evaluate(split.validation.labels, predictions, dataset.class_names),
        loss=kept.val_loss if kept else 0.0,
        history=tuple(
            EpochRecord(
                p.epoch, p.loss, p.train_accuracy, p.val_loss, p.val_accuracy, p.learning_rate
            )
            for p in loop.history
        ),
    )
    result = FineTuneResult(
        strategy=config.strategy,
        backbone=backbone.name,
        backbone_digest=backbone.digest,
        dataset_digest=dataset.digest,
        dataset_source=dataset.source,
        class_names=dataset.class_names,
        hyperparameters=config.hyperparameters(),
        seed=config.seed,
        device=_device_name(device),
        amp=amp,
        train_examples=len(split.train),
        validation_examples=len(split.validation),
        feature_cache=feature_cache,
        feature_seconds=feature_seconds,
        training_seconds=training_seconds,
        epochs_run=len(loop.history),
        best_epoch=loop.best_epoch,
        stopped_early=len(loop.history) < config.epochs,
        metrics=metrics,
        history=tuple(loop.history),
        preprocessing=backbone.preprocessing.to_dict(),
    )
    return model.cpu(), result


def final_split(split: Split) -> Split:
    """For a --final run: the training and validation examples both train; the validation
    part is still scored each epoch (figures that are not held out, kept for the curves)."""
    train_idx = np.sort(np.concatenate([split.train_indices, split.validation_indices]))
    everything = Dataset(
        split.train.kind,
        np.concatenate([split.train.inputs, split.validation.inputs]),
        np.concatenate([split.train.labels, split.validation.labels]),
        split.train.class_names,
        split.train.source,
    )
    order = np.argsort(np.concatenate([split.train_indices, split.validation_indices]))
    return replace(split, train=everything.subset(order), train_indices=train_idx)


def predict_logits(
    model: Classifier,
    backbone: Backbone,
    inputs: npt.NDArray[Any],
    *,
    batch_size: int = 64,
) -> npt.NDArray[np.float32]:
    """The classifier's logits on raw examples, batch by batch, in eval mode on the CPU."""
    model = model.cpu().eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            batch = backbone.prepare(inputs[start : start + batch_size])
            out.append(model(*batch).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.class_names)), np.float32)


def score(
    logits: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], class_names: tuple[str, ...]
) -> Evaluation:
    """Accuracy, per-class figures, confusion and mean cross-entropy of logits."""
    loss = float(
        nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long())
    )
    return replace(evaluate(labels, logits.argmax(1), class_names), loss=loss)


def _made_from(split: Split, dataset: Dataset) -> bool:
    n = len(dataset)
    for part, indices in (
        (split.train, split.train_indices),
        (split.validation, split.validation_indices),
    ):
        if len(indices) != len(part) or (
            len(indices) and (indices.min() < 0 or indices.max() >= n)
        ):
            return False
        if not np.array_equal(dataset.labels[indices], part.labels):
            return False
    return True


def extract_features(
    backbone: Backbone,
    inputs: npt.NDArray[Any],
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    amp: bool = False,
) -> npt.NDArray[np.float32]:
    """Backbone features (N, feature_dim) in eval mode, batch by batch."""
    device = device or torch.device("cpu")
    module = backbone.module.to(device)
    was_training = module.training
    module.eval()
    out = np.empty((len(inputs), backbone.feature_dim), dtype=np.float32)
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
        for start in range(0, len(inputs), batch_size):
            batch = backbone.prepare(inputs[start : start + batch_size])
            feats = module(*(t.to(device) for t in batch))
            out[start : start + len(feats)] = feats.float().cpu().numpy()
    module.train(was_training)
    return out


def feature_cache_path(cache_dir: Path, backbone: Backbone, dataset: Dataset, amp: bool) -> Path:
    tag = "amp" if amp else "fp32"
    return cache_dir / f"{backbone.digest[:24]}-{dataset.digest[:24]}-{tag}.npy"


# ---------------------------------------------------------------- internals


@dataclass
class _Loop:
    history: list[EpochProgress]
    best_epoch: int
    final_predictions: npt.NDArray[np.int64]


def _features_for(
    backbone: Backbone, dataset: Dataset, split: Split, config: FineTuneConfig, runner: _Runner
) -> tuple[tuple[torch.Tensor, torch.Tensor], Literal["memory", "disk-hit", "disk-miss"]]:
    """Train and validation features: from the disk cache, else one pass over the data set."""
    status: Literal["memory", "disk-hit", "disk-miss"] = "memory"
    path = None
    feats: npt.NDArray[np.float32] | None = None
    if config.cache_dir is not None:
        path = feature_cache_path(config.cache_dir, backbone, dataset, runner.amp)
        if path.exists():
            loaded = np.load(path, allow_pickle=False)
            if loaded.shape == (len(dataset), backbone.feature_dim):
                feats, status = loaded, "disk-hit"
    if feats is None:
        # Features of the whole data set (not the split) so any split reuses the cache.
        feats = extract_features(
            backbone,
            dataset.inputs,
            batch_size=config.feature_batch_size,
            device=runner.device,
            amp=runner.amp,
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, feats)
            tmp.replace(path)
            status = "disk-miss"
    train_idx, val_idx = split.train_indices, split.validation_indices
    return (
        (
            torch.from_numpy(feats[train_idx]).to(runner.device),
            torch.from_numpy(feats[val_idx]).to(runner.device),
        ),
        status,
    )


class _Runner:
    def __init__(
        self,
        backbone: Backbone,
        model: Classifier,
        config: FineTuneConfig,
        device: torch.device,
        amp: bool,
    ) -> None:
        self.backbone = backbone
        self.model = model
        self.config = config
        self.device = device
        self.amp = amp
        self.loss_fn = nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(config.seed)

    # -- head only -----------------------------------------------------------------

    def _head_optimiser(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.model.head.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def train_head_on_features(
        self,
        feats: tuple[torch.Tensor, torch.Tensor],
        split: Split,
        on_epoch: ProgressCallback | None,
    ) -> _Loop:
        train_x, val_x = feats
        y = torch.from_numpy(split.train.labels).to(self.device)
        head = self.model.head
        optimiser = self._head_optimiser()

        def epoch() -> tuple[float, float]:
            head.train()
            order = torch.randperm(len(y), generator=self.generator).to(self.device)
            total, correct = 0.0, 0
            for start in range(0, len(y), self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                loss, hits = self._step(optimiser, head(train_x[idx]), y[idx])
                total += loss * len(idx)
                correct += hits
            return total / len(y), correct / len(y)

        def predict_val() -> torch.Tensor:
            head.eval()
            with torch.inference_mode():
                logits: torch.Tensor = head(val_x).float().cpu()
            return logits

        return self._loop(epoch, predict_val, split, on_epoch, lambda: head, optimiser)

    def train_head_recomputing(self, split: Split, on_epoch: ProgressCallback | None) -> _Loop:
        backbone = self.model.backbone
        head = self.model.head
        for p in backbone.parameters():
            p.requires_grad_(False)
        optimiser = self._head_optimiser()
        inputs = split.train.inputs
        y = torch.from_numpy(split.train.labels).to(self.device)

        def features(batch: npt.NDArray[Any]) -> torch.Tensor:
            backbone.eval()
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
                out: torch.Tensor = backbone(
                    *(t.to(self.device) for t in self.backbone.prepare(batch))
                )
            return out.float().clone()

        def epoch() -> tuple[float, float]:
            head.train()
            order = torch.randperm(len(y), generator=self.generator)
            total, correct = 0.0, 0
            for start in range(0, len(y), self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                feats = features(inputs[idx.numpy()])
                loss, hits = self._step(optimiser, head(feats), y[idx.to(self.device)])
                total += loss * len(idx)
                correct += hits
            return total / len(y), correct / len(y)

        def predict_val() -> torch.Tensor:
            head.eval()
            logits = []
            val = split.validation.inputs
            for start in range(0, len(val), self.config.feature_batch_size):
                feats = features(val[start : start + self.config.feature_batch_size])
                with torch.inference_mode():
                    logits.append(head(feats).float().cpu())
            return torch.cat(logits)

        return self._loop(epoch, predict_val, split, on_epoch, lambda: head, optimiser)

    # -- last-n / full -------------------------------------------------------------

    def train_end_to_end(self, split: Split, on_epoch: ProgressCallback | None) -> _Loop:
        model = self.model
        backbone_params: list[nn.Parameter]
        if self.config.strategy == "full":
            trainable_blocks: list[nn.Module] = [model.backbone]
        else:
            trainable_blocks = list(self.backbone.blocks[-self.config.unfreeze_blocks :])
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        seen: set[int] = set()
        backbone_params = []
        for block in trainable_blocks:
            for p in block.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    p.requires_grad_(True)
                    backbone_params.append(p)
        optimiser = torch.optim.Adam(
            [
                {"params": list(model.head.parameters()), "lr": self.config.lr},
                {"params": backbone_params, "lr": self.config.lr * self.config.backbone_lr_scale},
            ],
            weight_decay=self.config.weight_decay,
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        inputs = split.train.inputs
        y = torch.from_numpy(split.train.labels).to(self.device)

        def set_modes() -> None:
            model.backbone.eval()
            for block in trainable_blocks:
                block.train()
            for m in model.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            model.head.train()

        def epoch() -> tuple[float, float]:
            set_modes()
            order = torch.randperm(len(y), generator=self.generator)
            total, correct = 0.0, 0
            for start in range(0, len(y), self.config.batch_size):
                idx = order[start : start + self.config.batch_size]
                batch = [t.to(self.device) for t in self.backbone.prepare(inputs[idx.numpy()])]
                target = y[idx.to(self.device)]
                optimiser.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, enabled=self.amp):
                    logits = model(*batch)
                    loss = self.loss_fn(logits.float(), target)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                total += float(loss.item()) * len(idx)
                correct += int((logits.argmax(1) == target).sum())
            return total / len(y), correct / len(y)

        def predict_val() -> torch.Tensor:
            model.eval()
            logits = []
            val = split.validation.inputs
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
                for start in range(0, len(val), self.config.feature_batch_size):
                    batch = self.backbone.prepare(
                        val[start : start + self.config.feature_batch_size]
                    )
                    logits.append(model(*(t.to(self.device) for t in batch)).float().cpu())
            return torch.cat(logits)

        return self._loop(epoch, predict_val, split, on_epoch, lambda: model, optimiser)

    # -- shared --------------------------------------------------------------------

    def _step(
        self, optimiser: torch.optim.Optimizer, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[float, int]:
        optimiser.zero_grad(set_to_none=True)
        loss = self.loss_fn(logits, target)
        loss.backward()
        optimiser.step()
        return float(loss.item()), int((logits.argmax(1) == target).sum())

    def _loop(
        self,
        epoch: Callable[[], tuple[float, float]],
        predict_val: Callable[[], torch.Tensor],
        split: Split,
        on_epoch: ProgressCallback | None,
        best_of: Callable[[], nn.Module],
        optimiser: torch.optim.Optimizer | None = None,
    ) -> _Loop:
        """Epochs with early stopping; the module `best_of` returns ends at its best epoch."""
        config = self.config
        val_y = split.validation.labels
        history: list[EpochProgress] = []
        best_acc, best_epoch = -1.0, 0
        best_state: dict[str, torch.Tensor] = {}
        best_preds = np.zeros(len(val_y), dtype=np.int64)
        started = time.perf_counter()
        for n in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            loss, train_acc = epoch()
            logits = predict_val()
            preds = logits.argmax(1).numpy().astype(np.int64)
            val_acc = float((preds == val_y).mean())
            val_loss = float(
                nn.functional.cross_entropy(logits, torch.from_numpy(val_y).long()).item()
            )
            lr = float(optimiser.param_groups[0]["lr"]) if optimiser is not None else 0.0
            improved = config.keep == "last" or val_acc > best_acc + config.min_delta
            if improved:
                best_acc, best_epoch, best_preds = val_acc, n, preds
                best_state = {
                    k: v.detach().clone() for k, v in copy.copy(best_of().state_dict()).items()
                }
            seconds = time.perf_counter() - t0
            per_epoch = (time.perf_counter() - started) / n
            stopping = (
                config.keep == "best"
                and config.patience is not None
                and n - best_epoch >= config.patience
            )
            remaining = 0 if stopping else config.epochs - n
            progress = EpochProgress(
                n,
                config.epochs,
                loss,
                train_acc,
                val_acc,
                seconds,
                per_epoch * remaining,
                improved,
                val_loss,
                lr,
            )
            history.append(progress)
            if on_epoch is not None:
                on_epoch(progress)
            if stopping:
                break
        best_of().load_state_dict(best_state)
        return _Loop(history, best_epoch, best_preds)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"
