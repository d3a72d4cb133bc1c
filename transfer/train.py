"""A plain supervised training loop with seeds fixed and per-epoch progress callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    loss: float
    train_accuracy: float


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train_classifier(
    model: nn.Module,
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train `model` in place with Adam and cross-entropy; one EpochResult per epoch."""
    seed_everything(seed)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    optimiser = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    results = []
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad()
            logits = model(x[idx])
            loss = loss_fn(logits, y[idx])
            loss.backward()
            optimiser.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        result = EpochResult(epoch, total_loss / len(x), correct / len(x))
        results.append(result)
        if on_epoch:
            on_epoch(result)
    model.eval()
    return results


@torch.no_grad()
def accuracy(
    model: nn.Module, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> float:
    model.eval()
    logits = model(torch.from_numpy(images))
    return float((logits.argmax(1).numpy() == labels).mean())
