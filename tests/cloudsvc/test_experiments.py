"""Experiments a user can trust, through real fine-tune jobs: a test set nothing chooses on,
search ranking with seeds and a stated tie rule, --final, warm starts from the parent by
default, and one digest per base whatever the strategy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloudsvc.errors import InvalidRequest
from cloudsvc.jobs.feeds import EVALUATION_FILE, EvaluationData
from cloudsvc.jobs.spec import FineTuneSpec, spec_from_json
from cloudsvc.jobs.uploads import UploadKind
from cloudsvc.registry import SOURCE_KEY
from cloudsvc.sessions import open_session
from edgefleet.core.jobs import JobState
from tests.cloudsvc.test_jobs import Rig, events, finetune
from tests.cloudsvc.test_jobs import rig as rig  # the fixture: a job manager on real stores
from transfer.datasets import load_dataset, split_dataset


def _kept_evaluation(rig: Rig, model: str, version: int, tmp: Path) -> EvaluationData:
    record = rig.registry.get_version(model, version)
    manifest = rig.registry.materialize(record.metadata[SOURCE_KEY], tmp)
    assert EVALUATION_FILE in {f.path for f in manifest.files}
    return EvaluationData.load(tmp / EVALUATION_FILE)


def test_a_test_split_is_kept_apart_scored_once_and_judges_the_int8_gate(
    rig: Rig, tmp_path: Path
) -> None:
    spec = finetune(
        data="synthetic:300",
        test_fraction=0.2,
        final=True,
        seeds=2,
        search=[("lr", ("1e-6", "3e-2"))],
        params={"epochs": "4", "patience": "2"},
        targets=("onnx-cpu-fp32", "onnx-cpu-int8"),
        max_accuracy_drop=0.5,
    )
    done = rig.wait(rig.manager.submit(spec).job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    version = rig.registry.get_version("shapes", 1)
    lineage, test, validation = version.lineage, version.test, version.evaluation
    assert lineage is not None and test is not None and validation is not None

    # 60 of 300 are the test set; the 240 others were split into training and validation,
    # and --final trained on all 240.
    assert lineage.test_examples == test.count == 60
    assert lineage.final and lineage.train_examples == 240
    # a fifth of 240, rounded per class
    assert validation.count == lineage.validation_examples and 44 <= validation.count <= 52
    assert test.split.startswith("test:") and validation.split.startswith("validation")
    low, high = test.interval()
    assert low <= test.accuracy <= high and test.example_points == pytest.approx(100 / 60)
    assert test.loss > 0 and validation.loss > 0

    # The kept evaluation data (the INT8 gate's and later compiles') is the test set, none
    # of it among the examples trained on: the same split, made here independently.
    whole = load_dataset("synthetic:300")
    parts = split_dataset(whole, 0.2, 7919)
    kept = _kept_evaluation(rig, "shapes", 1, tmp_path / "source")
    images = kept.validation["image"].reshape(len(kept.labels), -1)
    pool = parts.train.inputs.reshape(len(parts.train), -1)
    tests = parts.validation.inputs.reshape(len(parts.validation), -1)
    assert len(images) == 60
    for image in images:
        assert np.any(np.all(np.isclose(tests, image), axis=1))
        assert not np.any(np.all(np.isclose(pool, image), axis=1))
    assert any("of the test set" in m for m in events(rig, done.job_id))

    # The recorded test accuracy is what the exported model scores on those rows.
    session = open_session(tmp_path / "source" / "model.onnx")
    logits = session.run(None, {"image": kept.validation["image"]})[0]
    correct = int((logits.argmax(1) == kept.labels).sum())
    assert abs(correct - round(test.accuracy * 60)) <= 1  # torch vs ONNX: parity within 1e-3

    # Search: every trial ran with two seeds; the kept one ranks first by the stated rule.
    assert [t.seeds for t in done.trials] == [2, 2]
    for t in done.trials:
        assert t.val_accuracy_min <= t.val_accuracy <= t.val_accuracy_max
    ranked = sorted(done.trials, key=lambda t: (-t.val_accuracy, t.val_loss, t.number))
    assert [t.best for t in done.trials] == [t is ranked[0] for t in done.trials]
    assert lineage.hyperparameters["lr"] == ranked[0].params["lr"]
    final_line = next(m for m in events(rig, done.job_id) if m.startswith("final run"))
    assert f"for {lineage.epochs_run} epoch(s)" in final_line
    int8 = version.artifact("onnx-cpu-int8")
    assert int8 is not None and int8.metrics["accuracy_n"] == 60


def test_a_second_fine_tune_starts_from_its_parent_unless_told_and_keeps_one_base_digest(
    rig: Rig,
) -> None:
    v1 = rig.wait(rig.manager.submit(finetune(targets=("onnx-cpu-fp32",))).job_id)
    assert v1.state is JobState.SUCCEEDED, v1.error
    # last-n trains the backbone in place: its base digest is still the base's, taken first
    two = rig.manager.submit(
        finetune(
            data="synthetic:240:3",
            test_data="synthetic:120:7",
            params={"epochs": "2", "strategy": "last-n"},
            targets=("onnx-cpu-fp32",),
        )
    )
    spec = spec_from_json(two.request_json)
    assert isinstance(spec, FineTuneSpec) and spec.warm_start and spec.parent_version == 1
    done = rig.wait(two.job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    first, second = (rig.registry.get_version("shapes", n) for n in (1, 2))
    assert first.lineage is not None and second.lineage is not None
    assert second.lineage.warm_start_from == 1 and first.lineage.warm_start_from == 0
    assert second.lineage.base_digest == first.lineage.base_digest
    assert second.test is not None and second.test.count == 120
    assert second.test.split == "test: synthetic:120:7"
    assert first.test is None  # no test set was asked for: none is claimed

    fresh = rig.manager.submit(finetune(from_parent="base", targets=("onnx-cpu-fp32",)))
    spec = spec_from_json(fresh.request_json)
    assert isinstance(spec, FineTuneSpec) and not spec.warm_start
    rig.manager.cancel(fresh.job_id)
    with pytest.raises(InvalidRequest, match="fine-tuned from small-cnn"):
        rig.manager.submit(finetune(base="efficientnet-lite0", from_parent="parent"))


def test_a_test_set_must_be_new_data_of_known_classes(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="also training data"):
        rig.manager.submit(finetune(test_data="synthetic:240"))
    with pytest.raises(InvalidRequest, match="one way"):
        rig.manager.submit(finetune(test_data="synthetic:100:2", test_fraction=0.2))
    odd = tmp_path / "odd.npz"
    x = np.random.default_rng(0).random((20, 3, 32, 32), dtype=np.float32)
    y = np.arange(20) % 2
    np.savez(odd, x=x, y=y, classes=np.array(["disc", "triangle"]))
    upload = rig.uploads.receive(odd.name, UploadKind.FILE, odd.stat().st_size, [odd.read_bytes()])
    done = rig.wait(rig.manager.submit(finetune(test_data=upload.reference)).job_id)
    assert done.state is JobState.FAILED
    assert "triangle" in done.error and "never saw" in done.error
