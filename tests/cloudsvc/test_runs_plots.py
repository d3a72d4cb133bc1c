"""Training curves kept with a version (issue 15): recorded by a real fine-tune, stored by
both metadata stores, returned by the admin API; `runs plot`, `runs compare --html` and
`runs export-mlflow` as a user types them."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudsvc.settings import CloudSettings
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.store.metadata import MetadataStore
from cloudsvc.store.sqlite import SqliteMetadataStore
from edgefleet.cli import cli
from edgefleet.core.versions import ClassScore, EpochRecord, Evaluation, ModelVersion
from tests.cloudsvc.test_job_service import write_image_folder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


@pytest.fixture
def settings(settings: CloudSettings) -> CloudSettings:
    return settings.model_copy(update={"max_upload_bytes": 4 << 20})


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib (pip install 'edgefleet[plots]')")
def test_a_finetune_keeps_its_curves_and_the_cli_plots_them(run: object, tmp_path: Path) -> None:
    assert callable(run)
    data = write_image_folder(tmp_path / "parts")
    for _ in range(2):
        done = run(
            "finetune", "parts", "--base", "small-cnn", "--data", str(data), "--epochs", "2",
            "--target", "onnx-cpu-fp32",
        )  # fmt: skip
        assert done.exit_code == 0, done.output

    # Recorded by the training loop, carried in the job's result, stored with the version
    # and returned by the admin API.
    version = json.loads(run("models", "show", "parts", "1", "--json").output)
    history = version["evaluation"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, version["lineage"]["epochs_run"] + 1))
    assert len(history) == 2
    for h in history:
        assert h["train_loss"] > 0 and h["val_loss"] > 0
        assert 0 <= h["train_accuracy"] <= 1 and 0 <= h["val_accuracy"] <= 1
        assert h["learning_rate"] == pytest.approx(
            float(version["lineage"]["hyperparameters"]["lr"])
        )
    best = history[version["lineage"]["best_epoch"] - 1]
    assert best["val_accuracy"] == pytest.approx(version["evaluation"]["accuracy"])

    out = tmp_path / "plots"
    plotted = run("runs", "plot", "parts", "--versions", "1,2", "--out", str(out))
    assert plotted.exit_code == 0, plotted.output
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "parts-curves.png",
        "parts-v1-confusion.png",
        "parts-v1-per-class.png",
        "parts-v2-confusion.png",
        "parts-v2-per-class.png",
    ]
    for name in files:
        assert str(out / name) in plotted.output
        width, height = png_size((out / name).read_bytes())
        assert width >= 200 and height >= 200
    # Two versions side by side: the curves are wider than one version's.
    one = tmp_path / "one"
    as_json = json.loads(
        run("runs", "plot", "parts", "--versions", "2", "--out", str(one), "--json").output
    )
    assert sorted(Path(p).name for p in as_json["files"]) == [
        "parts-curves.png",
        "parts-v2-confusion.png",
        "parts-v2-per-class.png",
    ]
    assert (
        png_size((out / "parts-curves.png").read_bytes())[0]
        > png_size((one / "parts-curves.png").read_bytes())[0]
    )

    page_path = tmp_path / "report" / "parts.html"
    compared = run("runs", "compare", "parts", "--html", str(page_path))
    assert compared.exit_code == 0, compared.output
    assert f"wrote {page_path}" in compared.output and "val accuracy" in compared.output
    page = page_path.read_text()
    assert "<table>" in page and "val accuracy" in page and "<th>v2</th>" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5 and 'src="http' not in page
    for encoded in images:
        png_size(base64.b64decode(encoded))
    both = json.loads(
        run("runs", "compare", "parts", "--html", str(tmp_path / "b.html"), "--json").output
    )
    assert both["html"] == str(tmp_path / "b.html") and len(both["versions"]) == 2

    if not HAS_MLFLOW:
        refused = CliRunner().invoke(
            cli,
            ["runs", "export-mlflow", "parts", "--version", "1", "--tracking-uri", "file:x"],
        )
        assert refused.exit_code != 0 and "pip install mlflow" in refused.output


@pytest.mark.skipif(HAS_MLFLOW, reason="mlflow is installed: the refusal does not apply")
def test_export_mlflow_says_what_to_install() -> None:
    result = CliRunner().invoke(
        cli,
        ["runs", "export-mlflow", "m", "--version", "1", "--tracking-uri", "file:./mlruns"],
    )
    assert result.exit_code == 1
    assert "needs mlflow" in result.output and "pip install mlflow" in result.output


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataStore]:
    s: MetadataStore = (
        MemoryMetadataStore()
        if request.param == "memory"
        else SqliteMetadataStore(tmp_path / "m.db")
    )
    yield s
    s.close()


def test_both_metadata_stores_keep_the_history(store: MetadataStore) -> None:
    evaluation = Evaluation(
        0.5,
        4,
        (ClassScore("a", 0.5, 1.0, 2), ClassScore("b", 1.0, 0.0, 2)),
        ((2, 0), (2, 0)),
        "validation 20%",
        history=(EpochRecord(1, 1.25, 0.5, 1.5, 0.25, 3e-3), EpochRecord(2, 0.75, 0.75, 1.0, 0.5)),
    )
    version = ModelVersion("m", 1, "d", 1000, "ab" * 32, evaluation=evaluation)
    store.add_version(version)
    got = store.get_version("m", 1)
    assert got == version and got.evaluation is not None
    assert got.evaluation.history[1] == EpochRecord(2, 0.75, 0.75, 1.0, 0.5, 0.0)
    # A version stored before history existed reads back with an empty one.
    old = dataclasses.replace(version, version=2, evaluation=Evaluation(0.5, 4))
    store.add_version(old)
    again = store.get_version("m", 2)
    assert again is not None and again.evaluation is not None
    assert again.evaluation.history == ()


@pytest.mark.skipif(
    not HAS_MLFLOW,
    reason="mlflow is an optional extra (edgefleet[mlflow]); the dev extra installs it",
)
def test_export_mlflow_logs_parameters_metrics_curves_and_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from edgefleet.cli import plots
    from edgefleet.core.versions import Artifact, Lineage

    history = (EpochRecord(1, 1.2, 0.5, 1.4, 0.45, 3e-3), EpochRecord(2, 0.7, 0.8, 0.9, 0.7, 3e-3))
    validation = Evaluation(
        0.7,
        20,
        (ClassScore("cat", 0.8, 0.6, 10), ClassScore("dog", 0.65, 0.8, 10)),
        ((6, 4), (2, 8)),
        "validation 20%",
        history=history,
        loss=0.9,
    )
    version = ModelVersion(
        "pets",
        3,
        "d",
        1000,
        "ab" * 32,
        artifacts=(
            Artifact(
                "pets", 3, "onnx-cpu-int8", "cd" * 32, 10, 1, 1000, metrics={"latency_p50_ms": 0.4}
            ),
        ),
        lineage=Lineage(
            "small-cnn", "ef" * 32, "./pets", "12" * 32, {"lr": "0.003"}, strategy="head"
        ),
        evaluation=validation,
        test=dataclasses.replace(validation, accuracy=0.65, count=40, split="test: ./test"),
    )
    # A folder store (what mlflow-skinny has; MLflow 3 asks to opt in to it); a user's
    # tracking server or sqlite:///mlflow.db takes the same calls.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run_id = plots.export_mlflow("pets", version, uri, "pets", tmp_path / "work")

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.003" and run.data.params["strategy"] == "head"
    metrics = run.data.metrics
    assert metrics["val_accuracy"] == 0.7 and metrics["test_accuracy"] == 0.65
    assert metrics["test_count"] == 40 and metrics["val_loss"] == 0.9
    assert metrics["test_accuracy_ci_low"] < 0.65 < metrics["test_accuracy_ci_high"]
    assert metrics["onnx-cpu-int8.latency_p50_ms"] == 0.4
    curve = client.get_metric_history(run_id, "epoch_val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(1, 0.45), (2, 0.7)]
    files = {a.path for a in client.list_artifacts(run_id)}
    assert "confusion.json" in files
    confusion = json.loads(
        Path(client.download_artifacts(run_id, "confusion.json", str(tmp_path))).read_text()
    )
    assert confusion == {"classes": ["cat", "dog"], "rows": [[6, 4], [2, 8]]}
    plotted = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/pets-curves.png", "plots/pets-v3-confusion.png"} <= plotted
