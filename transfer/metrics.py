"""Classification metrics on a held-out split, as the registry's Evaluation type.

A class never predicted has precision 0.0 (and a class with no examples recall 0.0) rather
than NaN, so the JSON stays valid; `support` tells the two cases apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edgefleet.core.versions import ClassScore, Evaluation


def confusion_matrix(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int
) -> npt.NDArray[np.int64]:
    """Counts with true classes as rows and predicted classes as columns."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    return float((t == p).mean()) if t.size else 0.0


def evaluate(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, class_names: Sequence[str]
) -> Evaluation:
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    diagonal = np.diag(matrix)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    per_class = tuple(
        ClassScore(
            name=str(name),
            precision=float(diagonal[i] / predicted[i]) if predicted[i] else 0.0,
            recall=float(diagonal[i] / actual[i]) if actual[i] else 0.0,
            support=int(actual[i]),
        )
        for i, name in enumerate(class_names)
    )
    total = int(matrix.sum())
    return Evaluation(
        accuracy=float(diagonal.sum() / total) if total else 0.0,
        count=total,
        per_class=per_class,
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
    )
