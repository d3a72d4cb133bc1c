"""Fixtures for transfer tests: one thread, a tiny pretrained SmallCNN, small pixel data sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transfer.datasets import Dataset, from_arrays
from transfer.pretrain import pretrain_small_cnn, synthetic_pixels
from transfer.synthetic import CLASSES


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # other engineers' tests share the 2 cores (STACK.md trap 2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def small_cnn_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "small-cnn.pt"
    pretrain_small_cnn(path, count=480, epochs=2, seed=0)
    return path


@pytest.fixture(scope="session")
def pixels() -> Dataset:
    """240 generated 3x32x32 images, 4 classes, pixels 0..255."""
    x, y = synthetic_pixels(240, seed=7)
    return from_arrays(x, y, CLASSES, source="synthetic")
