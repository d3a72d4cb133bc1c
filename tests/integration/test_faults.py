"""Faults with real processes: corrupt bytes, bad models, failed smoke tests, a cloud that
goes away, and agents killed with SIGKILL mid-download and mid-activation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.core.errors import EdgefleetError, ErrorCode
from edgefleet.core.tensors import to_raw
from protos.artifact.v1 import artifact_pb2
from tests.integration.conftest import Fleet, Versions, running
from tests.onnx_models import custom_op_model, expected_logits, linear_model

pytestmark = pytest.mark.integration


def _serving_v1(fleet: Fleet, models: Versions, agent: str = "a1") -> None:
    version, logits = fleet.infer(agent, models.x)
    assert version == 1
    np.testing.assert_allclose(logits, models.expected(1), rtol=1e-5, atol=1e-5)


def _on_v1(fleet: Fleet, models: Versions) -> None:
    fleet.start_agent("a1")
    fleet.admin.push_model("m", models.v1)
    fleet.admin.deploy("m", 1)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, what="a1 on v1")


def _failed(fleet: Fleet, needle: str) -> str:
    devices = fleet.wait_for(
        lambda ds: any(m.phase == "failed" for d in ds for m in d.models),
        what="the device to report the version as failed",
    )
    errors = " | ".join(m.error for d in devices for m in d.models) + " | " + devices[0].last_error
    assert needle.lower() in errors.lower(), errors
    assert running(devices) == {"a1": 1}
    return errors


def _corrupt_blob(cloud_dir: Path, sha256: str) -> None:
    hits = [p for p in cloud_dir.rglob("*") if p.is_file() and sha256 in "".join(p.parts[-2:])]
    assert hits, f"no blob for {sha256} under {cloud_dir}"
    for p in hits:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))


def test_corrupt_chunk_is_rejected_and_old_version_keeps_serving(
    fleet: Fleet, models: Versions
) -> None:
    _on_v1(fleet, models)
    v2 = fleet.admin.push_model("m", models.v2)
    # A file under 1 MiB is one chunk, whose digest is the file's.
    _corrupt_blob(fleet.workdir / "cloud", v2.source_sha256)
    fleet.admin.deploy("m", 2)
    _failed(fleet, "")
    _serving_v1(fleet, models)
    chunk_dir = fleet.workdir / "a1" / "chunks"
    assert not (chunk_dir / v2.source_sha256).exists(), "a corrupt chunk was kept"


def test_unloadable_model_is_rejected(fleet: Fleet, models: Versions, tmp_path: Path) -> None:
    _on_v1(fleet, models)
    broken = custom_op_model(tmp_path / "custom-op.onnx")
    fleet.admin.push_model("m", broken, skip_verify=True)
    fleet.admin.deploy("m", 2)
    _failed(fleet, "load")
    _serving_v1(fleet, models)
    # a fixed version after the broken one converges: the agent is not stuck
    fleet.admin.push_model("m", models.v2)
    fleet.admin.deploy("m", 3)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 3}, what="recovery to v3")


def _devices_cli(fleet: Fleet) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "devices", *fleet.admin_args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_failing_smoke_test_is_rejected(fleet: Fleet, models: Versions) -> None:
    _on_v1(fleet, models)
    x = np.ones((1, 8), np.float32)
    wrong = expected_logits(models.v2, x) + 1.0
    sample = artifact_pb2.GoldenSample(rtol=1e-4, atol=1e-4)
    sample.inputs.add(name="x", datatype="FP32", shape=[1, 8], data=to_raw(x))
    sample.outputs.add(name="logits", datatype="FP32", shape=list(wrong.shape), data=to_raw(wrong))
    fleet.admin.push_model("m", models.v2, golden_samples=[sample])
    fleet.admin.deploy("m", 2)
    _failed(fleet, "logits")
    _serving_v1(fleet, models)
    # the operator sees why in `edgefleet devices`
    out = _devices_cli(fleet)
    assert "m v2:" in out and "logits" in out and "1 with errors" in out, out


def test_cloud_unreachable_agent_serves_restarts_offline_and_converges_later(
    fleet: Fleet, models: Versions
) -> None:
    _on_v1(fleet, models)
    port = fleet.cloud.port
    fleet.cloud.stop()
    _serving_v1(fleet, models)
    # A reboot while offline: the agent serves from local state with no cloud call.
    fleet.restart_agent("a1")
    _serving_v1(fleet, models)
    fleet.restart_cloud()
    assert fleet.cloud.port == port
    fleet.admin.push_model("m", models.v2)
    fleet.admin.deploy("m", 2)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 2} and ds[0].converged, what="a1 on v2")
    version, logits = fleet.infer("a1", models.x)
    assert version == 2
    np.testing.assert_allclose(logits, models.expected(2), rtol=1e-5, atol=1e-5)


def _assert_serves_a_whole_version(
    fleet: Fleet, x: np.ndarray, expected: dict[int, np.ndarray]
) -> int:
    version, logits = fleet.infer("a1", x)
    assert version in expected
    np.testing.assert_allclose(logits, expected[version], rtol=1e-5, atol=1e-5)
    return version


def test_sigkill_during_download_resumes_and_never_serves_partial(
    fleet: Fleet, tmp_path: Path
) -> None:
    x = np.random.default_rng(3).normal(size=(2, 256)).astype(np.float32)
    v1 = linear_model(tmp_path / "small.onnx", features=256, seed=1)
    # ~12 MB: a dozen 1 MiB chunks, downloaded at a capped rate so the kill lands mid-way.
    v2 = linear_model(tmp_path / "big.onnx", features=256, hidden=12000, seed=2)
    expected = {1: expected_logits(v1, x), 2: expected_logits(v2, x)}
    slow = {"EDGEFLEET_AGENT_MAX_DOWNLOAD_BYTES_PER_S": str(4 << 20)}
    fleet.start_agent("a1", env=slow)
    fleet.admin.push_model("m", v1)
    fleet.admin.deploy("m", 1)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, what="a1 on v1")
    chunks = fleet.workdir / "a1" / "chunks"
    held = {p.name for p in chunks.iterdir()}

    fleet.admin.push_model("m", v2)
    fleet.admin.deploy("m", 2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = {p.name for p in chunks.iterdir()} - held
        if len([n for n in new if not n.endswith(".part")]) >= 2:
            break
        time.sleep(0.01)
    fleet.agents["a1"].kill()
    got = {p.name for p in chunks.iterdir()} - held
    complete_before = {n for n in got if not n.endswith(".part")}
    assert complete_before, "the kill should land after some chunks were downloaded"

    fleet.restart_agent("a1", env=slow)
    assert _assert_serves_a_whole_version(fleet, x, expected) == 1
    fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, timeout=90, what="a1 on v2 after resume")
    assert _assert_serves_a_whole_version(fleet, x, expected) == 2
    # what was complete before the kill was not fetched again
    assert complete_before <= {p.name for p in chunks.iterdir()}


def test_sigkill_at_any_moment_of_an_upgrade_never_serves_a_partial_model(
    fleet: Fleet, models: Versions
) -> None:
    expected = {1: models.expected(1), 2: models.expected(2)}
    _on_v1(fleet, models)
    fleet.admin.push_model("m", models.v2)
    fleet.admin.deploy("m", 2)
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4):
        time.sleep(delay)
        fleet.agents["a1"].kill()
        fleet.restart_agent("a1")
        _assert_serves_a_whole_version(fleet, models.x, expected)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, what="a1 on v2 after repeated kills")
    assert _assert_serves_a_whole_version(fleet, models.x, expected) == 2


def test_after_a_restart_the_previous_version_is_still_addressable(
    fleet: Fleet, models: Versions
) -> None:
    _on_v1(fleet, models)
    fleet.admin.push_model("m", models.v2)
    fleet.admin.deploy("m", 2)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, what="a1 on v2")
    fleet.cloud.stop()  # offline, so nothing but local state can bring v1 back
    fleet.restart_agent("a1")
    assert _assert_serves_a_whole_version(fleet, models.x, {2: models.expected(2)}) == 2
    version, logits = fleet.infer("a1", models.x, version=1)
    assert version == 1
    np.testing.assert_allclose(logits, models.expected(1), rtol=1e-5, atol=1e-5)


def test_sigkill_of_the_cloud_mid_deploy_leaves_all_or_nothing(
    fleet: Fleet, models: Versions
) -> None:
    """A deploy to 300 devices is one transaction: killed at any moment, the cloud comes
    back with every matching device assigned (the deploy recorded) or none of them (the
    deploy never acknowledged), never a part; an acknowledged deploy is never lost."""
    import random
    import threading

    from edgefleet.core.tls import ClientSecurity
    from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

    secret, _ = fleet.admin.create_enroll_token(labels={"site": "a"}, max_uses=300)
    with ClientSecurity(ca_file=fleet.trust.ca_file).channel(fleet.cloud.address) as channel:
        stub = fleet_pb2_grpc.AgentServiceStub(channel)
        for n in range(300):
            stub.Enroll(
                fleet_pb2.EnrollRequest(enroll_token=secret, device_id=f"d{n:03d}"), timeout=30
            )
    rounds, rng = 8, random.Random(5)
    for _ in range(rounds + 2):
        fleet.admin.push_model("m", models.v1)
    fleet.admin.deploy("m", 1, selector={"site": "a"})
    started = time.perf_counter()
    fleet.admin.deploy("m", 2, selector={"site": "a"})  # one like those the kills cut
    took = time.perf_counter() - started  # the kills land within about this long
    outcomes = []
    unexpected: list[BaseException] = []
    for version in range(3, rounds + 3):  # forward each time: no rollback involved
        acknowledged: list[bool] = []

        def deploy(version: int = version, acknowledged: list[bool] = acknowledged) -> None:
            try:
                fleet.admin.deploy("m", version, selector={"site": "a"})
                acknowledged.append(True)
            except EdgefleetError as err:
                acknowledged.append(False)
                if err.code is not ErrorCode.UNAVAILABLE:  # the kill, not a refusal
                    unexpected.append(err)

        thread = threading.Thread(target=deploy)
        thread.start()
        # Alternately early (before the answer, mostly) and late (around the commit).
        early = version % 2 == 0
        time.sleep(rng.uniform(0.0, took) if early else rng.uniform(0.8 * took, 1.6 * took))
        fleet.cloud.kill()
        thread.join(30)
        fleet.restart_cloud()
        standing = {
            (d.model, tuple(d.selector.items())): d.version for d in fleet.admin.deployments()
        }
        recorded = standing.get(("m", (("site", "a"),)), 0)
        assigned = {d.device_id: d.desired.assignment("m") for d in fleet.admin.devices()}
        versions = {a.version if a else 0 for a in assigned.values()}
        # Every device has what the standing deployment says: one version for all 300.
        assert len(assigned) == 300 and versions == {recorded}, (version, recorded, versions)
        if acknowledged == [True]:
            assert recorded == version  # an acknowledged deploy survives the kill
        outcomes.append((acknowledged == [True], recorded == version))
    assert not unexpected, unexpected
    # The kills landed before the answer (some deploys were never acknowledged), and on
    # both sides of the commit.
    assert not all(acked for acked, _ in outcomes)
    assert any(landed for _, landed in outcomes)
