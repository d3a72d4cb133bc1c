from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.errors import NotEnrolled
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import ModelPhase
from tests.agent.conftest import Rig
from tests.agent.fakes import WIDTH, build_artifact, golden

READY = ModelPhase.READY
FAILED = ModelPhase.FAILED


def infer(rig: Rig, name: str = "m", version: int | None = None) -> float:
    x = np.zeros((1, WIDTH), dtype=np.float32)
    (y,) = rig.repository.get(name, version).run({"x": x})
    return float(np.asarray(y)[0, 0])


def test_happy_path_v1_then_v2(rig: Rig, tmp_path: Path) -> None:
    v1 = build_artifact(tmp_path, rig.cloud.key, "m", 1)
    rig.cloud.assign(v1)
    result = rig.reconciler.reconcile_once()
    assert result.converged and result.activated == ["m v1"]
    assert infer(rig) == 1.0
    v2 = build_artifact(tmp_path, rig.cloud.key, "m", 2)
    rig.cloud.assign(v2)
    result = rig.reconciler.reconcile_once()
    assert result.converged and result.activated == ["m v2"]
    assert rig.repository.default_version("m") == 2
    assert infer(rig) == 2.0
    # The previous version stays loaded (addressable by version) and on disk for rollback.
    assert infer(rig, version=1) == 1.0
    record = rig.state.model("m")
    assert record is not None and record.active is not None and record.previous is not None
    assert (record.active.version, record.previous.version) == (2, 1)
    assert record.previous.dir.is_dir()
    report = rig.reconciler.build_report()
    assert report.observed_generation == 2
    (status,) = report.models
    assert (status.active_version, status.previous_version, status.phase) == (2, 1, READY)
    assert status.execution_provider == "CPUExecutionProvider"
    assert rig.cloud.enrolled == ["dev-1"]


def test_a_second_pass_fetches_nothing(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    fetched = len(rig.cloud.fetch_offsets)
    assert rig.reconciler.reconcile_once().activated == []
    assert len(rig.cloud.fetch_offsets) == fetched


def test_shared_chunks_are_not_fetched_again(rig: Rig, tmp_path: Path) -> None:
    # Same graph bytes, different version: every chunk is already held.
    v1 = build_artifact(tmp_path, rig.cloud.key, "m", 1, bias=1.0)
    v2 = build_artifact(tmp_path, rig.cloud.key, "m", 2, bias=1.0)
    rig.cloud.assign(v1)
    rig.reconciler.reconcile_once()
    before = rig.chunks.stats.bytes_fetched
    rig.cloud.assign(v2)
    assert rig.reconciler.reconcile_once().activated == ["m v2"]
    assert rig.chunks.stats.bytes_fetched == before
    assert rig.chunks.stats.bytes_skipped == sum(len(b) for b in v2.chunks.values())


def test_interrupted_download_resumes_from_the_part_file(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.break_after_pieces = 2
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    first = rig.reconciler.reconcile_once()
    assert not first.converged and "stream reset" in first.errors[0]
    assert rig.repository.names() == []
    assert rig.reconciler.reconcile_once().converged
    resumed = [off for _, off in rig.cloud.fetch_offsets if off > 0]
    assert resumed == [2 * rig.cloud.piece_size]
    assert rig.chunks.stats.bytes_resumed == 2 * rig.cloud.piece_size
    assert infer(rig) == 1.0


def test_corrupt_chunk_fails_and_v1_keeps_serving(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    v2 = build_artifact(tmp_path, rig.cloud.key, "m", 2)
    rig.cloud.assign(v2)
    bad = next(iter(v2.chunks))
    rig.cloud.corrupt.add(bad)
    result = rig.reconciler.reconcile_once()
    assert not result.converged
    assert "sha256" in result.errors[0]
    assert infer(rig) == 1.0
    assert not rig.chunks.has(bad) and not rig.chunks.part_path(bad).exists()
    (status,) = rig.reconciler.build_report().models
    assert status.phase == FAILED and status.active_version == 1 and status.desired_version == 2
    assert "sha256" in status.error
    # The cloud fixes the chunk: the next pass (backoff timer) converges.
    rig.cloud.corrupt.clear()
    assert rig.reconciler.reconcile_once().converged
    assert infer(rig) == 2.0


def test_unloadable_onnx_fails_and_v1_keeps_serving(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    rig.cloud.assign(
        build_artifact(tmp_path, rig.cloud.key, "m", 2, body=b"not an onnx graph" * 40)
    )
    result = rig.reconciler.reconcile_once()
    assert not result.converged and "ONNX Runtime cannot load" in result.errors[0]
    assert infer(rig) == 1.0
    assert rig.state.model("m").active.version == 1  # type: ignore[union-attr]
    (status,) = rig.reconciler.build_report().models
    assert status.phase == FAILED and "cannot load" in status.error


def test_golden_mismatch_names_the_output(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    wrong = golden(2.0, off_by=0.5)
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2, sample=wrong))
    result = rig.reconciler.reconcile_once()
    assert not result.converged
    assert "output 'y'" in result.errors[0] and "0.5" in result.errors[0]
    assert infer(rig) == 1.0
    assert rig.repository.versions("m") == [1]


def test_untrusted_signature_is_rejected(rig: Rig, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rig.cloud.assign(build_artifact(tmp_path, Ed25519PrivateKey.generate(), "m", 1))
    result = rig.reconciler.reconcile_once()
    assert not result.converged and "unknown key" in result.errors[0]
    assert rig.repository.names() == []
    assert rig.cloud.fetch_offsets == []  # nothing downloaded for an untrusted manifest


def test_cloud_down_retries_with_backoff_then_converges(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.cloud.down = True
    loop = threading.Thread(target=rig.reconciler.run, daemon=True)
    loop.start()
    try:
        deadline = threading.Event()
        for _ in range(200):
            if rig.cloud.calls >= 5:
                break
            deadline.wait(0.01)
        assert rig.cloud.calls >= 5  # retried, not given up
        assert rig.repository.names() == []
        assert "cannot reach" in rig.reconciler.device_error
        rig.cloud.down = False
        for _ in range(500):
            if rig.repository.names():
                break
            deadline.wait(0.01)
        assert infer(rig) == 1.0
    finally:
        rig.reconciler.stop()
        loop.join(timeout=10)
    assert not loop.is_alive()
    assert any(r.observed_generation == 1 for r in rig.cloud.reports)


def test_restart_serves_from_disk_without_the_cloud(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    rig.cloud.down = True
    rig.reopen()
    calls = rig.cloud.calls
    restored = rig.reconciler.restore()
    assert [(m.name, m.version) for m in restored] == [("m", 1)]
    assert rig.cloud.calls == calls
    assert infer(rig) == 1.0
    with pytest.raises(EdgefleetError, match="cannot reach"):
        rig.reconciler.reconcile_once()
    assert infer(rig) == 1.0


def test_restart_with_tampered_files_falls_back_to_previous(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2))
    rig.reconciler.reconcile_once()
    active = rig.state.model("m").active  # type: ignore[union-attr]
    assert active is not None
    (active.dir / "model.onnx").write_bytes(b"tampered")
    rig.reopen()
    rig.reconciler.restore()
    assert infer(rig) == 1.0
    assert any("cannot be served" in e for e in rig.events)
    # With the cloud back, the agent rebuilds v2 from verified chunks.
    assert rig.reconciler.reconcile_once().converged
    assert infer(rig) == 2.0


def test_leftover_staging_is_deleted_on_start(rig: Rig, tmp_path: Path) -> None:
    staging = rig.artifacts.models_dir / "m" / "abc.staging"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(b"half")
    rig.reconciler.restore()
    assert not staging.exists()


def test_removed_model_stops_serving_and_is_collected(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    del rig.cloud.models["m"]
    rig.cloud.generation += 1
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.names() == []
    assert list(rig.artifacts.models_dir.iterdir()) == []
    assert [p for p in rig.chunks.root.iterdir()] == []


def test_old_versions_beyond_previous_are_collected(rig: Rig, tmp_path: Path) -> None:
    for v in (1, 2, 3):
        rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", v))
        rig.reconciler.reconcile_once()
    dirs = {p.name for p in (rig.artifacts.models_dir / "m").iterdir()}
    record = rig.state.model("m")
    assert record is not None and record.active and record.previous
    assert dirs == {record.active.digest, record.previous.digest}
    assert rig.repository.versions("m") == [2, 3]


def test_not_enrolled_without_a_token(rig: Rig) -> None:
    rig.settings.enroll_token = None
    with pytest.raises(NotEnrolled, match="--enroll-token"):
        rig.reconciler.reconcile_once()
