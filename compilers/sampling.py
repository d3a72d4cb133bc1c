"""Stratified samples and confidence intervals for the accuracy figures compiles report.

Data sets are often stored class by class: the first N examples of Fashion-MNIST's class-
sorted folders hold 5 of 10 classes, and the first 256 two. Every sample a compile scores
or calibrates on is drawn per class, with its class counts stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.core.stats import Z95, wilson_interval

__all__ = ["Z95", "Sample", "Score", "stratified_sample", "wilson_interval"]


@dataclass(frozen=True)
class Score:
    """An accuracy-like score and, where known, each example's verdict (for intervals)."""

    value: float
    correct: npt.NDArray[np.bool_] | None = None

    @property
    def n(self) -> int | None:
        return None if self.correct is None else len(self.correct)


@dataclass(frozen=True)
class Sample:
    indices: npt.NDArray[np.intp]  # sorted positions into the labels
    per_class: dict[int, int]  # label -> examples drawn

    def describe(self, class_names: Sequence[str] = ()) -> str:
        """e.g. '1000 examples, 100 per class for 10 classes' or the per-class counts."""
        counts = sorted(self.per_class.items())
        total = len(self.indices)
        if counts and len({c for _, c in counts}) == 1:
            return f"{total} examples, {counts[0][1]} per class for {len(counts)} classes"

        def name(label: int) -> str:
            return class_names[label] if 0 <= label < len(class_names) else str(label)

        return f"{total} examples, per class: " + ", ".join(f"{name(k)} {c}" for k, c in counts)


def stratified_sample(
    labels: npt.ArrayLike,
    count: int,
    *,
    seed: int = 0,
    exclude: npt.ArrayLike | None = None,
) -> Sample:
    """About `count` positions drawn at random within each class, in proportion to the
    class's size (equal shares for balanced data), every class with examples getting at
    least one while `count` allows; positions in `exclude` are never drawn (e.g. the
    held-out set a calibration sample must not overlap)."""
    y = np.asarray(labels).reshape(-1)
    available = np.ones(len(y), dtype=bool)
    if exclude is not None:
        available[np.asarray(exclude, dtype=np.intp)] = False
    classes = np.unique(y[available])
    pools = {int(c): np.flatnonzero(available & (y == c)) for c in classes}
    total = int(sum(len(p) for p in pools.values()))
    count = max(0, min(count, total))
    quota = _allocate({c: len(p) for c, p in pools.items()}, count)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(pools[c])[:n] for c, n in quota.items() if n]
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.intp)
    return Sample(indices.astype(np.intp), {c: n for c, n in quota.items() if n})


def _allocate(sizes: dict[int, int], count: int) -> dict[int, int]:
    """Largest-remainder proportional allocation; every class gets one while count allows."""
    total = sum(sizes.values())
    if not total or not count:
        return dict.fromkeys(sizes, 0)
    exact = {c: count * n / total for c, n in sizes.items()}
    quota = {c: min(sizes[c], math.floor(exact[c])) for c in sizes}
    if count >= len(sizes):
        quota = {c: max(1, q) for c, q in quota.items()}
    while sum(quota.values()) > count:  # the ones given to tiny classes come from the largest
        largest = max(quota, key=lambda c: quota[c])
        quota[largest] -= 1
    by_remainder = sorted(sizes, key=lambda c: exact[c] - quota[c], reverse=True)
    for c in [*by_remainder, *by_remainder]:  # a second pass fills classes with room left
        left = count - sum(quota.values())
        if left <= 0:
            break
        quota[c] += min(left, sizes[c] - quota[c], 1 if exact[c] > quota[c] else left)
    return quota


def paired_difference_interval(
    before: npt.NDArray[np.bool_], after: npt.NDArray[np.bool_], z: float = Z95
) -> tuple[float, float]:
    """Normal interval of mean(before) - mean(after) on the same examples (paired: only
    the examples whose verdict changed add variance)."""
    d = before.astype(np.float64) - after.astype(np.float64)
    n = len(d)
    if n == 0:
        return (-1.0, 1.0)
    mean = float(d.mean())
    spread = float(d.std(ddof=1)) if n > 1 else 0.0
    # no example changed its verdict: the normal interval would have zero width; bound
    # the share of examples that could change instead (Wilson upper bound of 0 in n)
    half = z * spread / math.sqrt(n) if spread > 0 else wilson_interval(0, n, z)[1]
    return (mean - half, mean + half)
