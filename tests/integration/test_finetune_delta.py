"""Head-only fine-tunes ship only the head: two fine-tune jobs on the real cloud make v1 and
v2, an agent running v1 fetches only the chunks v2 adds, and serves v2's new head."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloudsvc.store.blobs import FolderBlobStore
from edgefleet.cli.processes import ManagedProcess, cloud_process
from edgefleet.client import AdminClient
from edgefleet.client.inference import InferenceClient
from edgefleet.core.golden import tensors_from_bytes
from edgefleet.core.manifests import file_chunks
from protos.artifact.v1 import artifact_pb2
from tests.integration.conftest import Fleet, running

pytestmark = pytest.mark.integration

MODEL = "m"
TARGET = "onnx-cpu-fp32"
SUMMARY = re.compile(r"fetched (\d+) bytes in (\d+) chunk\(s\)")


@pytest.fixture
def job_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The `fleet` fixture's cloud, running its fine-tune jobs on one torch thread (two
    threads on a busy 2-core machine run many times slower)."""
    cloud, trust = cloud_process(tmp_path)
    cloud.env["EDGEFLEET_CLOUD_JOBS__THREADS"] = "1"
    cloud.start().wait_ready(60)
    f = Fleet(tmp_path, cloud, trust)
    try:
        yield f
    finally:
        f.stop()


def finished_version(admin: AdminClient, job_id: str) -> int:
    job = admin.wait_job(job_id, timeout=240)
    assert job.state == "succeeded", f"{job_id}: {job.error}"
    assert [(t.target, t.status) for t in job.targets] == [(TARGET, "built")]
    return job.result_version


def fetched_since_start(agent: ManagedProcess) -> tuple[int, int]:
    """Bytes and chunks the stopped agent says it fetched (its last stop summary)."""
    found = SUMMARY.findall(agent.log_path.read_text(errors="replace"))
    assert found, f"{agent.name} printed no stop summary:\n{agent.log_tail()}"
    fetched, chunks = found[-1]
    return int(fetched), int(chunks)


def chunk_sizes(manifest: artifact_pb2.Manifest) -> dict[str, int]:
    return {c.sha256: c.size for f in manifest.files for c in file_chunks(f)}


def test_head_only_finetune_ships_only_the_head(job_fleet: Fleet) -> None:
    fleet = job_fleet
    fleet.start_agent("a1")
    fleet.wait_for(lambda ds: len(ds) == 1, what="the agent enrolled")

    # The same base on two different samples; v2's parent is v1.
    def submit(data: str, seed: int) -> str:
        return fleet.admin.finetune(
            MODEL,
            base="small-cnn",
            data=data,
            params={"strategy": "head", "epochs": 3, "seed": seed},
            targets=[TARGET],
        ).job_id

    assert finished_version(fleet.admin, submit("synthetic:240:0", 0)) == 1
    fleet.admin.deploy(MODEL, 1, target=TARGET)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, what="a1 on v1")
    # A restart starts the agent's transfer counters from zero, with v1 held on disk.
    fleet.restart_agent("a1")
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, what="a1 serving v1 from disk")

    assert finished_version(fleet.admin, submit("synthetic:320:1", 1)) == 2
    v1, v2 = fleet.admin.version(MODEL, 1), fleet.admin.version(MODEL, 2)
    assert v2.parent_version == 1
    for v in (v1, v2):
        assert v.lineage is not None
        assert (v.lineage.base_model, v.lineage.strategy) == ("small-cnn", "head")
    assert v1.lineage is not None and v2.lineage is not None
    assert v1.lineage.dataset_digest != v2.lineage.dataset_digest
    a1, a2 = v1.artifact(TARGET), v2.artifact(TARGET)
    assert a1 is not None and a2 is not None

    blobs = FolderBlobStore(fleet.workdir / "cloud" / "blobs")
    manifests = []
    for digest in (a1.manifest_digest, a2.manifest_digest):
        manifest = artifact_pb2.Manifest()
        manifest.ParseFromString(blobs.get(digest))
        manifests.append(manifest)
    m1, m2 = manifests
    old_chunks, new_chunks = chunk_sizes(m1), chunk_sizes(m2)
    delta = {sha: size for sha, size in new_chunks.items() if sha not in old_chunks}
    by_path = {f.path: f.sha256 for f in m1.files}
    changed = sorted(f.path for f in m2.files if by_path.get(f.path) != f.sha256)
    # The head, and the golden samples' expected outputs: their inputs are v1's examples,
    # bytes the device already holds.
    outputs = sorted(g.outputs for g in m2.golden)
    assert outputs and changed == sorted(["head.bias.bin", "head.weight.bin", *outputs])
    assert [g.inputs for g in m2.golden] == [g.inputs for g in m1.golden]
    full = sum(f.size for f in m2.files)
    assert full == a2.size_bytes

    fleet.admin.deploy(MODEL, 2, target=TARGET)
    devices = fleet.wait_for(
        lambda ds: running(ds) == {"a1": 2} and all(d.converged for d in ds), what="a1 on v2"
    )
    assert not devices[0].errors

    # Served over the Open Inference Protocol: v2 reproduces the job's golden outputs,
    # and its new head answers differently from v1 (still loaded, for rollback).
    files = {f.path: f for f in m2.files}

    def tensors(path: str) -> dict[str, np.ndarray]:
        return tensors_from_bytes(b"".join(blobs.get(c.sha256) for c in file_chunks(files[path])))

    with InferenceClient(fleet.agents["a1"].address) as client:
        for sample in m2.golden:
            inputs = tensors(sample.inputs)
            new = client.infer(MODEL, inputs)
            old = client.infer(MODEL, inputs, version=1)
            assert new.model_version == "2" and old.model_version == "1"
            for name, want in tensors(sample.outputs).items():
                np.testing.assert_allclose(
                    new.outputs[name], want, rtol=sample.rtol, atol=sample.atol
                )
                assert not np.allclose(old.outputs[name], want, rtol=1e-3, atol=1e-3)

    chunk_dir = fleet.workdir / "a1" / "chunks"
    assert all((chunk_dir / sha).is_file() for sha in new_chunks)
    fleet.agents["a1"].stop()
    fetched, fetched_chunks = fetched_since_start(fleet.agents["a1"])
    assert (fetched, fetched_chunks) == (sum(delta.values()), len(delta))
    assert 0 < fetched * 20 < full, (fetched, full)
