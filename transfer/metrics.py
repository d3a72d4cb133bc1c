"""Classification metrics on a held-out split, as plain data that serialises to JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


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


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float
    recall: float
    support: int


@dataclass(frozen=True)
class ClassificationMetrics:
    """Accuracy, per-class precision/recall and the confusion matrix (rows: true class).

    A class never predicted has precision 0.0 (and a class with no examples recall 0.0)
    rather than NaN, so the JSON stays valid; `support` tells the two cases apart.
    """

    accuracy: float
    count: int
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.per_class)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_class"] = [asdict(c) for c in self.per_class]
        out["confusion"] = [list(row) for row in self.confusion]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassificationMetrics:
        return cls(
            accuracy=float(data["accuracy"]),
            count=int(data["count"]),
            per_class=tuple(ClassMetrics(**c) for c in data["per_class"]),
            confusion=tuple(tuple(int(v) for v in row) for row in data["confusion"]),
        )


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    return float((t == p).mean()) if t.size else 0.0


def evaluate(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, class_names: Sequence[str]
) -> ClassificationMetrics:
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    diagonal = np.diag(matrix)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    per_class = tuple(
        ClassMetrics(
            name=str(name),
            precision=float(diagonal[i] / predicted[i]) if predicted[i] else 0.0,
            recall=float(diagonal[i] / actual[i]) if actual[i] else 0.0,
            support=int(actual[i]),
        )
        for i, name in enumerate(class_names)
    )
    total = int(matrix.sum())
    return ClassificationMetrics(
        accuracy=float(diagonal.sum() / total) if total else 0.0,
        count=total,
        per_class=per_class,
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
    )
