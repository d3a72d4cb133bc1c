"""Pretrain the built-in SmallCNN backbone on generated images: reproducible, no download.

    python -m transfer.pretrain --out small-cnn.pt [--count 3000] [--epochs 4] [--seed 0]

The synthetic patterns (transfer/synthetic.py) are mapped to pixels 0..255 so that the
built-in backbone takes the same input range as every other image backbone; the inverse
mapping, (x - PIXEL_OFFSET) / PIXEL_SCALE, is the first layer of the exported graph.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from transfer.models import SmallCNN
from transfer.synthetic import CLASSES, PIXEL_OFFSET, PIXEL_SCALE, synthetic_pixels
from transfer.train import accuracy, train_classifier

__all__ = [
    "PIXEL_OFFSET",
    "PIXEL_SCALE",
    "load_pretrained",
    "pretrain_small_cnn",
    "synthetic_pixels",
]

FORMAT = "edgefleet-small-cnn/1"


def pretrain_small_cnn(
    out: Path, *, count: int = 3000, epochs: int = 4, seed: int = 0, width: int = 16
) -> float:
    """Train SmallCNN on `count` generated images and save it to `out`; returns held-out accuracy."""
    torch.manual_seed(seed)
    net = SmallCNN(num_classes=len(CLASSES), width=width)
    pixels, labels = synthetic_pixels(count, seed=seed)
    images = (pixels - PIXEL_OFFSET) / PIXEL_SCALE
    train_classifier(net, images, labels, epochs=epochs, seed=seed)
    test_pixels, test_labels = synthetic_pixels(max(200, count // 5), seed=seed + 1)
    held_out = accuracy(net, (test_pixels - PIXEL_OFFSET) / PIXEL_SCALE, test_labels)
    payload = {
        "format": FORMAT,
        "state_dict": net.state_dict(),
        "num_classes": len(CLASSES),
        "width": width,
        "classes": list(CLASSES),
        "seed": seed,
        "count": count,
        "epochs": epochs,
        "held_out_accuracy": held_out,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    tmp.replace(out)  # a concurrent reader never sees half a file
    return held_out


def load_pretrained(path: Path) -> SmallCNN:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        from transfer.errors import BackboneUnavailable

        raise BackboneUnavailable(
            f"{path} is not a small-cnn weights file written by transfer.pretrain; "
            f"recreate it with `python -m transfer.pretrain --out {path}`"
        )
    net = SmallCNN(num_classes=int(payload["num_classes"]), width=int(payload["width"]))
    net.load_state_dict(payload["state_dict"])
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    acc = pretrain_small_cnn(args.out, count=args.count, epochs=args.epochs, seed=args.seed)
    print(f"wrote {args.out} (held-out accuracy {acc:.3f})")


if __name__ == "__main__":
    main()
