"""`compile --data`: the scoring and INT8 calibration samples are stratified by class and
disjoint, and the job's events state their sizes (class-sorted data used to give 5 of 10
classes to scoring and 2 to calibration)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from cloudsvc.jobs import compile as compile_job
from cloudsvc.jobs.env import WorkerEnv
from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.spec import CompileSpec
from tests.compilers.models import conv_model


def test_compile_data_is_sampled_per_class_and_the_sizes_are_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compile_job, "MAX_EVALUATION_EXAMPLES", 100)
    monkeypatch.setattr(compile_job, "MAX_CALIBRATION_EXAMPLES", 40)
    labels = np.repeat(np.arange(4), 60)  # stored class by class
    x = np.random.default_rng(0).normal(size=(len(labels), 3, 16, 16)).astype(np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=labels, classes=np.array(["a", "b", "c", "d"]))
    entry = conv_model(tmp_path / "model.onnx")
    env = WorkerEnv("job", tmp_path / "job", tmp_path, tmp_path, tmp_path)
    out = io.StringIO()
    spec = CompileSpec(model="m", version=1, target="onnx-cpu-int8", data=str(data))

    evaluation = compile_job._evaluation_from(spec, entry, env, Reporter(out))

    assert np.bincount(evaluation.labels).tolist() == [25, 25, 25, 25]
    scored = {x_.tobytes() for x_ in evaluation.validation["image"]}
    calibration = evaluation.calibration["image"]
    assert len(calibration) == 40
    assert not scored & {x_.tobytes() for x_ in calibration}  # held out from calibration
    calibrated_labels = [
        int(labels[np.flatnonzero((x == c).all(axis=(1, 2, 3)))[0]]) for c in calibration
    ]
    assert np.bincount(calibrated_labels).tolist() == [10, 10, 10, 10]
    logged = [json.loads(line).get("message", "") for line in out.getvalue().splitlines()]
    assert any("scoring on 100 examples, 25 per class for 4 classes of 240" in m for m in logged)
    assert any("calibration sample: 40 examples, 10 per class for 4 classes" in m for m in logged)
