"""One suite, run against every MetadataStore implementation."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudsvc.errors import Conflict, UnknownResource
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.store.metadata import (
    AdminTokenRecord,
    DeviceRecord,
    EnrollTokenRecord,
    MetadataStore,
)
from cloudsvc.store.sqlite import SqliteMetadataStore
from edgefleet.core.fleet import (
    Assignment,
    Capabilities,
    Deployment,
    DesiredState,
    ModelPhase,
    ModelStatus,
    ReportedState,
)
from edgefleet.core.jobs import Job, JobEvent, JobProgress, JobState, TargetOutcome, Trial
from edgefleet.core.rollouts import Rollout, RolloutSpec, RolloutState
from edgefleet.core.tokens import AdminToken, EnrollToken, Role
from edgefleet.core.versions import (
    Artifact,
    ClassScore,
    Evaluation,
    Lineage,
    ModelVersion,
    TensorSpec,
)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataStore]:
    s: MetadataStore = (
        MemoryMetadataStore()
        if request.param == "memory"
        else SqliteMetadataStore(tmp_path / "m.db")
    )
    yield s
    s.close()


def _version(model: str, number: int, parent: int = 0) -> ModelVersion:
    return ModelVersion(
        model=model,
        version=number,
        description=f"{model} v{number}",
        created_at=1000 + number,
        source_sha256="ab" * 32,
        parent_version=parent,
        metadata={"dataset": "fashion", "lr": "0.01"},
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("probs", "FP32", (-1, 3)),),
        golden_sample_count=2,
        created_by="admin",
        artifacts=(
            Artifact(model, number, "onnx-cpu-fp32", f"{number:064x}", 100, 1, 1000, "aa", "k1"),
        ),
    )


def test_versions_round_trip_with_lineage_and_artifacts(store: MetadataStore) -> None:
    store.add_version(_version("clf", 1))
    store.add_version(_version("clf", 2, parent=1))
    got = store.get_version("clf", 2)
    assert got == _version("clf", 2, parent=1)
    assert [v.version for v in store.list_versions("clf")] == [1, 2]
    model = store.get_model("clf")
    assert model is not None and (model.latest_version, model.version_count) == (2, 2)
    assert store.get_version("clf", 3) is None
    assert store.list_versions("other") == []


def test_versions_are_immutable(store: MetadataStore) -> None:
    store.add_version(_version("clf", 1))
    with pytest.raises(Conflict):
        store.add_version(_version("clf", 1))
    assert store.get_version("clf", 1) == _version("clf", 1)


def test_models_listed_by_name_and_ensure_is_idempotent(store: MetadataStore) -> None:
    store.ensure_model("zeta", "z", 1)
    store.ensure_model("alpha", "a", 2)
    again = store.ensure_model("alpha", "changed", 3)
    assert again.description == "a" and again.latest_version == 0
    assert [m.name for m in store.list_models()] == ["alpha", "zeta"]
    assert store.get_model("missing") is None


def test_artifacts_added_per_target_and_found_by_digest(store: MetadataStore) -> None:
    store.add_version(_version("clf", 1))
    extra = Artifact("clf", 1, "onnx-cpu-int8", "c" * 64, 50, 1, 2000, "bb", "k1")
    store.add_artifact(extra)
    version = store.get_version("clf", 1)
    assert version is not None and version.artifact("onnx-cpu-int8") == extra
    assert store.find_artifact("c" * 64) == extra
    assert store.find_artifact("d" * 64) is None
    with pytest.raises(Conflict):
        store.add_artifact(extra)
    with pytest.raises(UnknownResource):
        store.add_artifact(Artifact("clf", 9, "x", "e" * 64, 1, 1, 1))


def test_devices_round_trip_and_lookup_by_token_hash(store: MetadataStore) -> None:
    caps = Capabilities("x86_64", "linux", ("CPUExecutionProvider",), 1 << 30, "0.1", "h", "1.2")
    device = DeviceRecord("dev-1", "hash-1", 10, {"site": "a"}, caps, 11.5)
    store.put_device(device)
    store.put_device(DeviceRecord("dev-0", "hash-0", 10))
    assert store.get_device("dev-1") == device
    assert store.device_by_token_hash("hash-1") == device
    assert store.device_by_token_hash("nope") is None
    assert [d.device_id for d in store.list_devices()] == ["dev-0", "dev-1"]
    store.touch_device("dev-1", 99.0)
    touched = store.get_device("dev-1")
    assert touched is not None and touched.last_seen_at == 99.0
    store.put_device(DeviceRecord("dev-1", "hash-2", 12, {"site": "b"}, caps, 100.0))
    assert store.device_by_token_hash("hash-1") is None


def test_assign_replaces_the_model_and_moves_each_generation_on(store: MetadataStore) -> None:
    assert store.get_desired("dev-1") == DesiredState("dev-1", 0, ())
    clf1 = Assignment("clf", 1, "onnx-cpu-fp32", "a" * 64)
    det1 = Assignment("det", 1, "onnx-cpu-fp32", "b" * 64)
    assert store.assign({"dev-1": clf1, "dev-2": clf1}) == {"dev-1": 1, "dev-2": 1}
    assert store.assign({"dev-1": det1}) == {"dev-1": 2}
    clf2 = Assignment("clf", 2, "onnx-cpu-int8", "c" * 64)
    assert store.assign({"dev-1": clf2}) == {"dev-1": 3}
    assert store.get_desired("dev-1") == DesiredState("dev-1", 3, (clf2, det1))
    assert store.get_desired("dev-2") == DesiredState("dev-2", 1, (clf1,))


def test_assign_records_its_deployment_in_the_same_transaction(store: MetadataStore) -> None:
    clf1 = Assignment("clf", 1, "onnx-cpu-fp32", "a" * 64)
    deployment = Deployment("clf", {"site": "a"}, 1, "", 5.0)
    store.assign({"dev-1": clf1}, deployment)
    assert store.list_deployments() == [deployment]
    assert store.get_desired("dev-1").assignment("clf") == clf1


def test_reported_state_round_trip(store: MetadataStore) -> None:
    assert store.get_reported("dev-1") is None
    state = ReportedState(
        "dev-1",
        3,
        (ModelStatus("clf", 2, "a" * 64, 1, 2, ModelPhase.READY, "", "CPUExecutionProvider"),),
        Capabilities(arch="aarch64", execution_providers=("CPUExecutionProvider",)),
        "disk full",
        {"site": "a"},
        "10.0.0.7:8001",
        123.0,
    )
    store.put_reported(state)
    assert store.get_reported("dev-1") == state


def test_enroll_tokens_by_hash_and_id(store: MetadataStore) -> None:
    token = EnrollToken("tok-1", 100.0, 200.0, "line 3", 0, 0, {"site": "a"})
    record = EnrollTokenRecord("h" * 64, token)
    store.add_enroll_token(record)
    assert store.get_enroll_token("h" * 64) == record
    assert store.find_enroll_token("tok-1") == record
    assert store.get_enroll_token("x") is None and store.find_enroll_token("tok-x") is None
    with pytest.raises(Conflict):
        store.add_enroll_token(record)
    used, refusal = store.use_enroll_token("h" * 64, 150.0)
    assert refusal == "" and used is not None and used.uses == 1
    assert store.use_enroll_token("h" * 64, 250.0)[1] == "expired"
    revoked = dataclasses.replace(token, revoked=True, uses=1)
    store.put_enroll_token(EnrollTokenRecord("h" * 64, revoked))
    assert store.list_enroll_tokens() == [revoked]
    assert store.use_enroll_token("h" * 64, 150.0)[1] == "was revoked"
    assert store.use_enroll_token("nope", 150.0) == (None, "is not valid")
    with pytest.raises(UnknownResource):
        store.put_enroll_token(EnrollTokenRecord("z" * 64, token))


def test_a_token_is_never_used_more_than_its_maximum(store: MetadataStore) -> None:
    store.add_enroll_token(EnrollTokenRecord("h" * 64, EnrollToken("tok-1", 1.0, max_uses=5)))
    results: list[str] = []

    def use() -> None:
        for _ in range(10):
            results.append(store.use_enroll_token("h" * 64, 2.0)[1])

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("") == 5
    assert store.list_enroll_tokens()[0].uses == 5


def test_admin_tokens_by_hash_and_id(store: MetadataStore) -> None:
    token = AdminToken("tok-2", "ci", Role.OPERATOR, 5.0)
    store.add_admin_token(AdminTokenRecord("a" * 64, token))
    assert store.get_admin_token("a" * 64) == AdminTokenRecord("a" * 64, token)
    assert store.find_admin_token("tok-2") == AdminTokenRecord("a" * 64, token)
    revoked = dataclasses.replace(token, revoked=True)
    store.put_admin_token(AdminTokenRecord("a" * 64, revoked))
    assert store.list_admin_tokens() == [revoked]


def test_a_device_may_read_its_current_and_previous_desired_state(store: MetadataStore) -> None:
    for version, digest in ((1, "a"), (2, "b"), (3, "c")):
        store.assign({"dev-1": Assignment("clf", version, "onnx-cpu-fp32", digest * 64)})
    assert store.allowed_digests("dev-1") == {"b" * 64, "c" * 64}
    assert store.allowed_digests("dev-2") == set()


def test_the_highest_version_ever_assigned_is_kept(store: MetadataStore) -> None:
    for version in (1, 3, 2):
        store.assign({"dev-1": Assignment("clf", version, "onnx-cpu-fp32", "a" * 64)})
    store.assign({"dev-1": Assignment("det", 1, "onnx-cpu-fp32", "b" * 64)})
    assert store.peaks("dev-1") == {"clf": 3, "det": 1}
    assert store.peaks("dev-2") == {}


def test_revoked_devices_stay_revoked(store: MetadataStore) -> None:
    device = DeviceRecord("dev-1", "t" * 64, 1, {"site": "a"}, Capabilities(), 1.0)
    store.put_device(dataclasses.replace(device, revoked=True))
    got = store.get_device("dev-1")
    assert got is not None and got.revoked
    assert store.device_by_token_hash("t" * 64) == got


def test_concurrent_generation_bumps_never_lose_one(store: MetadataStore) -> None:
    def bump() -> None:
        for n in range(25):
            store.assign({"dev-1": Assignment("clf", n + 1, "onnx-cpu-fp32", "a" * 64)})

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_desired("dev-1").generation == 100


def test_sqlite_survives_reopen_and_migrates_once(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first = SqliteMetadataStore(path)
    first.add_version(_version("clf", 1))
    version = first.schema_version
    first.close()
    again = SqliteMetadataStore(path)
    assert again.get_version("clf", 1) == _version("clf", 1)
    assert again.schema_version == version >= 1
    mode = again._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again.close()


def test_deployments_replace_per_model_and_selector_in_order(store: MetadataStore) -> None:
    site_a = {"site": "a"}
    store.assign({}, Deployment("clf", site_a, 1, "", 1.0))
    store.assign({}, Deployment("det", {}, 1, "", 2.0))
    store.assign({}, Deployment("clf", site_a, 2, "onnx-cpu-fp32", 3.0))
    got = store.list_deployments()
    assert [(d.model, d.selector, d.version) for d in got] == [("det", {}, 1), ("clf", site_a, 2)]
    assert got[1].target == "onnx-cpu-fp32"
    assert got[1].matches({"site": "a", "hw": "x86"}) and not got[1].matches({"site": "b"})


def _fine_tuned(model: str, number: int) -> ModelVersion:
    base = _version(model, number)
    art = Artifact(
        model,
        number,
        "onnx-cpu-int8",
        f"{number + 100:064x}",
        40,
        3,
        1000,
        "cc",
        "k1",
        metrics={"latency_p50_ms": 0.41, "accuracy_drop": 0.002},
        steps=("int8-static-qdq-per-channel",),
        format="onnx",
        file_count=7,
    )
    return dataclasses.replace(
        base,
        artifacts=(*base.artifacts, art),
        lineage=Lineage(
            base_model="small-cnn",
            base_digest="b" * 64,
            dataset="fashion-mnist",
            dataset_digest="d" * 64,
            hyperparameters={"lr": "0.003", "strategy": "head"},
            seed=7,
            strategy="head",
            device="cpu",
            training_seconds=12.5,
            job_id="job-3",
            class_names=("cat", "dog"),
            train_examples=80,
            validation_examples=20,
            epochs_run=9,
            best_epoch=4,
        ),
        evaluation=Evaluation(
            accuracy=0.9,
            count=20,
            per_class=(
                ClassScore("cat", 0.9, 0.9, 10),
                ClassScore("dog", 0.9, 0.9, 10),
            ),
            confusion=((9, 1), (1, 9)),
            split="validation 20%, stratified, seed 7",
        ),
    )


def test_fine_tuned_versions_keep_lineage_evaluation_and_artifact_metrics(
    store: MetadataStore,
) -> None:
    store.add_version(_fine_tuned("clf", 1))
    got = store.get_version("clf", 1)
    assert got == _fine_tuned("clf", 1)
    assert got is not None and got.lineage is not None and got.evaluation is not None
    assert got.evaluation.confusion == ((9, 1), (1, 9))
    int8 = got.artifact("onnx-cpu-int8")
    assert int8 is not None and int8.metrics["latency_p50_ms"] == 0.41
    assert store.list_versions("clf") == [_fine_tuned("clf", 1)]


def test_jobs_get_ids_in_order_and_list_newest_first(store: MetadataStore) -> None:
    first = store.create_job(Job("", "finetune", "clf", '{"base": "small-cnn"}', created_at=1))
    second = store.create_job(Job("", "compile", "det", "{}", created_at=2))
    assert (first.job_id, second.job_id) == ("job-1", "job-2")
    assert store.get_job("job-1") == first
    assert store.get_job("job-9") is None
    assert [j.job_id for j in store.list_jobs()] == ["job-2", "job-1"]
    assert [j.job_id for j in store.list_jobs(model="clf")] == ["job-1"]
    assert store.list_jobs(limit=1) == [second]
    running = dataclasses.replace(
        first,
        state=JobState.RUNNING,
        started_at=5.0,
        slot="cpu",
        progress=JobProgress("training", 2, 10, 0.5),
    )
    store.update_job(running)
    assert store.get_job("job-1") == running
    assert store.list_jobs(states=[JobState.RUNNING]) == [running]
    assert store.list_jobs(states=[JobState.QUEUED, JobState.FAILED]) == [second]
    with pytest.raises(UnknownResource):
        store.update_job(dataclasses.replace(first, job_id="job-77"))
    done = dataclasses.replace(
        running,
        state=JobState.SUCCEEDED,
        result_version=3,
        trials=(Trial(1, {"lr": "0.1"}, 0.9, 4, 2.5, True),),
        targets=(TargetOutcome("onnx-cpu-int8", "refused", "lost 2 points", {"a": 1.0}),),
    )
    store.update_job(done)
    assert store.get_job("job-1") == done


def test_job_events_are_numbered_per_job_and_read_after_a_seq(store: MetadataStore) -> None:
    job = store.create_job(Job("", "finetune", "clf", "{}"))
    other = store.create_job(Job("", "finetune", "clf", "{}"))
    for n in range(5):
        store.add_job_event(JobEvent(job.job_id, 0, float(n), "log", f"line {n}"))
    progress = JobProgress("training", epoch=1)
    store.add_job_event(JobEvent(other.job_id, 0, 9.0, "progress", "e1", progress))
    store.add_job_event(JobEvent(other.job_id, 0, 9.5, "state", "done", None, JobState.FAILED))
    events = store.list_job_events(job.job_id)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.message for e in store.list_job_events(job.job_id, after_seq=3)] == [
        "line 3",
        "line 4",
    ]
    assert store.list_job_events(job.job_id, after_seq=1, limit=2)[-1].seq == 3
    assert [(e.seq, e.kind, e.progress, e.state) for e in store.list_job_events(other.job_id)] == [
        (1, "progress", progress, JobState.UNSPECIFIED),
        (2, "state", None, JobState.FAILED),
    ]


def test_sqlite_jobs_survive_reopen_and_ids_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first = SqliteMetadataStore(path)
    job = first.create_job(Job("", "finetune", "clf", "{}"))
    first.add_job_event(JobEvent(job.job_id, 0, 1.0, "log", "started"))
    first.close()
    again = SqliteMetadataStore(path)
    assert again.get_job(job.job_id) == job
    assert again.list_job_events(job.job_id)[0].message == "started"
    assert again.create_job(Job("", "finetune", "clf", "{}")).job_id == "job-2"
    again.close()


def test_rollouts_by_model_and_state_oldest_first(store: MetadataStore) -> None:
    def rollout(rollout_id: str, model: str, state: RolloutState, at: float) -> Rollout:
        return Rollout(rollout_id, RolloutSpec(model, 2), state, created_at=at)

    store.put_rollout(rollout("r-1", "a", RolloutState.SUCCEEDED, 1.0))
    store.put_rollout(rollout("r-2", "b", RolloutState.RUNNING, 2.0))
    store.put_rollout(rollout("r-3", "a", RolloutState.RUNNING, 3.0))
    store.put_rollout(rollout("r-3", "a", RolloutState.ABORTING, 3.0))  # its next state
    assert store.count_rollouts() == 3
    assert [r.rollout_id for r in store.list_rollouts()] == ["r-1", "r-2", "r-3"]
    assert [r.rollout_id for r in store.list_rollouts("a")] == ["r-1", "r-3"]
    stepped = store.list_rollouts(states=(RolloutState.RUNNING, RolloutState.ABORTING))
    assert [(r.rollout_id, r.state) for r in stepped] == [
        ("r-2", RolloutState.RUNNING),
        ("r-3", RolloutState.ABORTING),
    ]
    assert store.list_rollouts("a", (RolloutState.RUNNING,)) == []
    assert store.get_rollout("r-3") == rollout("r-3", "a", RolloutState.ABORTING, 3.0)
    assert store.get_rollout("r-9") is None


def test_unassign_takes_a_model_off_and_moves_the_generation_on(store: MetadataStore) -> None:
    a = Assignment("m", 1, "onnx-cpu-fp32", "d" * 64)
    b = Assignment("n", 1, "onnx-cpu-fp32", "e" * 64)
    store.assign({"dev-1": a})
    store.assign({"dev-1": b, "dev-2": b})
    assert store.unassign("m", ["dev-1", "dev-2"]) == {"dev-1": 3}  # dev-2 never had it
    desired = store.get_desired("dev-1")
    assert desired.generation == 3 and [x.model for x in desired.assignments] == ["n"]


def test_a_revoked_credential_reads_revoked_at_once(store: MetadataStore) -> None:
    """Lookups by credential may be answered from memory; a revocation must not be."""
    store.put_device(DeviceRecord("dev-1", "hash-1", 10))
    assert store.device_by_token_hash("hash-1") is not None  # looked up once: may be kept
    store.put_device(DeviceRecord("dev-1", "hash-1", 10, revoked=True))
    found = store.device_by_token_hash("hash-1")
    assert found is not None and found.revoked
