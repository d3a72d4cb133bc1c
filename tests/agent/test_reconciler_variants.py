"""The reconciler serves a model's variants (A/B, shadow) beside its primary: downloaded,
verified, loaded and smoke-tested as the primary is, and never at the primary's expense."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.core.fleet import ModelPhase, Variant
from tests.agent.conftest import Rig
from tests.agent.fakes import WIDTH, Artifact, build_artifact


def infer(rig: Rig, version: int | None = None) -> float:
    (y,) = rig.repository.get("m", version).run({"x": np.zeros((1, WIDTH), np.float32)})
    return float(np.asarray(y)[0, 0])


def variant(artifact: Artifact, weight: float = 0.0, shadow: bool = False) -> Variant:
    return Variant(artifact.version, "onnx-cpu-fp32", artifact.digest, weight, shadow)


def test_a_variant_is_fetched_verified_and_split_to(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    assert rig.reconciler.reconcile_once().converged
    v2 = build_artifact(tmp_path, rig.cloud.key, "m", 2)
    rig.cloud.publish(v2)
    rig.cloud.variants["m"] = (variant(v2, 0.5),)
    rig.cloud.generation += 1
    result = rig.reconciler.reconcile_once()
    assert result.converged, result.errors
    assert rig.repository.default_version("m") == 1  # the primary stays the primary
    assert (infer(rig), infer(rig, 2)) == (1.0, 2.0)
    assert rig.repository.traffic("m").slices == ((2, 0.5),)
    assert {rig.repository.route("m", str(k))[0].version for k in range(100)} == {1, 2}
    assert any("beside the primary (A/B 50.0%)" in e for e in rig.events)
    # A second pass fetches nothing and keeps the split.
    fetched = len(rig.cloud.fetch_offsets)
    assert rig.reconciler.reconcile_once().converged
    assert len(rig.cloud.fetch_offsets) == fetched
    # The variant becomes a shadow, then the split is cleared: v2 is no longer served.
    rig.cloud.variants["m"] = (variant(v2, shadow=True),)
    rig.cloud.generation += 1
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.route("m", "k") == (
        rig.repository.get("m", 1),
        rig.repository.get("m", 2),
    )
    del rig.cloud.variants["m"]
    rig.cloud.generation += 1
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.versions("m") == [1]
    assert rig.repository.route("m", "k")[1] is None


def test_a_variant_that_fails_to_load_leaves_the_primary_serving(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    assert rig.reconciler.reconcile_once().converged
    bad = build_artifact(tmp_path, rig.cloud.key, "m", 2, body=b"not an onnx graph" * 40)
    rig.cloud.publish(bad)
    rig.cloud.variants["m"] = (variant(bad, 0.9),)
    rig.cloud.generation += 1
    result = rig.reconciler.reconcile_once()
    assert not result.converged
    assert "variant v2" in result.errors[0] and "ONNX Runtime cannot load" in result.errors[0]
    # The primary serves every request; the refused variant's share falls back to it.
    assert rig.repository.versions("m") == [1]
    assert {rig.repository.route("m", str(k))[0].version for k in range(100)} == {1}
    assert infer(rig) == 1.0
    (status,) = rig.reconciler.build_report().models
    assert (status.active_version, status.phase) == (1, ModelPhase.READY)
    assert "variant v2" in status.error
    # The cloud fixes the split: the error clears.
    good = build_artifact(tmp_path, rig.cloud.key, "m", 3)
    rig.cloud.publish(good)
    rig.cloud.variants["m"] = (variant(good, shadow=True),)
    rig.cloud.generation += 1
    assert rig.reconciler.reconcile_once().converged
    (status,) = rig.reconciler.build_report().models
    assert status.error == "" and rig.repository.versions("m") == [1, 3]


def test_a_variant_survives_the_primarys_switch(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    rig.reconciler.reconcile_once()
    shadow = build_artifact(tmp_path, rig.cloud.key, "m", 5)
    rig.cloud.publish(shadow)
    rig.cloud.variants["m"] = (variant(shadow, shadow=True),)
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2))
    assert rig.reconciler.reconcile_once().converged
    # v2 primary, v1 kept for rollback, v5 the shadow; its folder survives collection.
    assert rig.repository.default_version("m") == 2
    assert rig.repository.versions("m") == [1, 2, 5]
    assert rig.repository.route("m")[1] is rig.repository.get("m", 5)
    assert (rig.settings.data_dir / "models" / "m" / shadow.digest).is_dir()
