"""Labelled images the project generates itself, so demos and tests need no download.

Four classes of 3x32x32 patterns (horizontal stripes, vertical stripes, checkerboard, a
bright disc) with random phase, frequency, colour and noise: easy enough to learn in
seconds on a CPU, hard enough that one epoch and five give visibly different accuracy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

CLASSES: tuple[str, ...] = ("h-stripes", "v-stripes", "checker", "disc")
IMAGE_SHAPE = (3, 32, 32)
# make_images' values mapped to pixels 0..255 by x * SCALE + OFFSET, so the built-in
# backbone takes the same input range as every other image backbone; the inverse is the
# first layer of its exported graph.
PIXEL_OFFSET = 127.5
PIXEL_SCALE = 50.0


def make_images(
    count: int, seed: int = 0, noise: float = 1.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`count` images (N,3,32,32 float32, roughly zero-mean) and their class indices."""
    rng = np.random.default_rng(seed)
    _, h, w = IMAGE_SHAPE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = rng.integers(0, len(CLASSES), size=count)
    images = np.empty((count, *IMAGE_SHAPE), dtype=np.float32)
    for i, label in enumerate(labels):
        period = rng.uniform(4.0, 10.0)
        phase = rng.uniform(0, 2 * np.pi)
        if label == 0:
            pattern = np.sin(2 * np.pi * yy / period + phase)
        elif label == 1:
            pattern = np.sin(2 * np.pi * xx / period + phase)
        elif label == 2:
            pattern = np.sign(
                np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period)
            )
        else:
            cy, cx, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(4, 10)
            pattern = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 1.0, -1.0)
        colour = rng.uniform(0.3, 1.0, size=(3, 1, 1)).astype(np.float32)
        images[i] = colour * pattern + rng.normal(0.0, noise, size=IMAGE_SHAPE)
    return images, labels.astype(np.int64)


def synthetic_pixels(
    count: int, seed: int = 0, noise: float = 1.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Generated images as float pixels 0..255 (N,3,32,32) and their class indices."""
    images, labels = make_images(count, seed=seed, noise=noise)
    pixels = np.clip(images * PIXEL_SCALE + PIXEL_OFFSET, 0.0, 255.0).astype(np.float32)
    return pixels, labels
