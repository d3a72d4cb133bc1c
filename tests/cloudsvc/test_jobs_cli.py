"""`edgefleet finetune / compile / jobs / runs / models show` against a real cloud on
loopback, as a user types them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cloudsvc.server import CloudServer
from cloudsvc.settings import CloudSettings
from tests.cloudsvc.test_job_service import write_image_folder


@pytest.fixture
def settings(settings: CloudSettings) -> CloudSettings:
    return settings.model_copy(update={"max_upload_bytes": 4 << 20})


def test_finetune_a_local_folder_then_inspect_compile_and_compare(
    run: object, tmp_path: Path
) -> None:
    assert callable(run)
    data = write_image_folder(tmp_path / "parts")
    done = run(
        "finetune", "parts", "--base", "small-cnn", "--data", str(data), "--epochs", "3",
        "--target", "onnx-cpu-fp32", "--test-split", "0.25",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    out = done.output
    # 6 of the 24 images were the test set: the summary says so, with what one is worth
    assert "test accuracy" in out and "n=6; one example = 17 pts" in out
    assert "data set" in out and "24 image examples, 2 classes" in out
    assert "uploaded data set" in out and "submitted job-1" in out
    assert "job-1 succeeded" in out and "parts v1" in out
    assert "next: edgefleet models show parts 1" in out

    shown = run("models", "show", "parts", "1")
    assert shown.exit_code == 0, shown.output
    assert "confusion matrix" in shown.output and "class-0" in shown.output
    assert "onnx-cpu-fp32" in shown.output
    assert "validation (chose the epoch and settings)" in shown.output
    assert "test (never trained on nor chosen with)" in shown.output
    assert "6 test examples kept apart" in shown.output

    compiled = run(
        "compile", "parts", "--version", "1", "--target", "onnx-cpu-int8",
        "--max-accuracy-drop", "1", "--detach",
    )  # fmt: skip
    assert compiled.exit_code == 0, compiled.output
    job_id = re.search(r"submitted (job-\d+)", compiled.output)
    assert job_id is not None and job_id.group(1) == "job-2"
    followed = run("jobs", "logs", "-f", "job-2")
    assert followed.exit_code == 0, followed.output
    assert "job-2 succeeded" in followed.output

    listed = run("jobs", "list")
    assert listed.exit_code == 0 and "2 job(s): 0 running, 0 queued" in listed.output
    details = run("jobs", "show", "job-1")
    assert "finetune of parts" in details.output and "result: parts v1" in details.output
    logs = run("jobs", "logs", "job-1")
    assert "registered parts v1" in logs.output and "job-1 is succeeded" in logs.output

    compared = run("runs", "compare", "parts")
    assert compared.exit_code == 0, compared.output
    assert "val accuracy (chose it)" in compared.output and "onnx-cpu-int8" in compared.output
    assert "test accuracy" in compared.output and "6 (17 pts)" in compared.output
    assert "best test accuracy" in compared.output and "one example is 17 points" in compared.output

    # Every list and show command speaks JSON for scripts: the same fields as the types.
    version = json.loads(run("models", "show", "parts", "1", "--json").output)
    assert version["lineage"]["base_model"] == "small-cnn"
    assert {a["target"] for a in version["artifacts"]} == {"onnx-cpu-fp32", "onnx-cpu-int8"}
    assert [m["name"] for m in json.loads(run("models", "list", "--json").output)] == ["parts"]
    versions = json.loads(run("models", "versions", "parts", "--json").output)
    assert [v["version"] for v in versions] == [1]
    compared_json = json.loads(run("runs", "compare", "parts", "--json").output)
    assert compared_json[0]["evaluation"]["accuracy"] == version["evaluation"]["accuracy"]
    jobs = json.loads(run("jobs", "list", "--json").output)
    assert [(j["job_id"], j["state"]) for j in jobs] == [
        ("job-2", "succeeded"),
        ("job-1", "succeeded"),
    ]
    assert json.loads(run("jobs", "show", "job-1", "--json").output)["result_version"] == 1
    lines = run("jobs", "logs", "job-1", "--json").output.strip().splitlines()
    assert json.loads(lines[-1])["state"] == "succeeded"
    assert json.loads(run("devices", "--json").output) == []
    assert json.loads(run("deployments", "--json").output) == []


def test_a_bad_local_data_set_is_refused_before_any_upload(
    run: object, tmp_path: Path, cloud: CloudServer
) -> None:
    assert callable(run)
    one_class = tmp_path / "one"
    (one_class / "only").mkdir(parents=True)
    for i in range(4):
        np.save(one_class / "only" / f"{i}.npy", np.zeros((3, 8, 8), np.float32))
    refused = run("finetune", "m", "--base", "small-cnn", "--data", str(one_class))
    assert refused.exit_code != 0
    assert "at least two classes" in refused.output
    assert not cloud.settings.uploads_dir.exists()  # nothing was sent
    unknown = run("finetune", "m", "--base", "alexnet", "--data", "synthetic")
    assert unknown.exit_code == 1 and "unknown backbone 'alexnet'" in unknown.output
    assert "[not_found]" in unknown.output
    search = run("finetune", "m", "--base", "small-cnn", "--data", "synthetic", "--search", "lr")
    assert search.exit_code == 2 and "--search NAME=V1,V2" in search.output
