from __future__ import annotations

import numpy as np

from edgefleet.core.versions import Evaluation
from edgefleet.core.wire import from_json, to_json
from transfer.metrics import accuracy, confusion_matrix, evaluate


def test_confusion_matrix_rows_are_true_classes() -> None:
    m = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_precision_recall_per_class() -> None:
    metrics = evaluate([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], ["cat", "dog", "owl"])
    assert metrics.accuracy == 4 / 6
    cat, dog, owl = metrics.per_class
    assert (cat.precision, cat.recall, cat.support) == (0.5, 0.5, 2)
    assert (dog.precision, dog.recall, dog.support) == (0.5, 1.0, 1)
    assert (owl.precision, owl.recall, owl.support) == (1.0, 2 / 3, 3)
    assert [c.name for c in metrics.per_class] == ["cat", "dog", "owl"]


def test_never_predicted_class_gives_zero_not_nan_and_json_round_trips() -> None:
    metrics = evaluate(np.array([0, 1, 1]), np.array([0, 0, 0]), ["a", "b"])
    assert metrics.per_class[1].precision == 0.0
    text = to_json(metrics)
    assert "NaN" not in text
    assert from_json(Evaluation, text) == metrics
    assert accuracy([1, 2], [1, 3]) == 0.5
