"""JobService over real gRPC on loopback, through the typed AdminClient: every bad request
gets the right status before anything is queued, and a job runs from upload to version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloudsvc.server import CloudServer
from cloudsvc.settings import CloudSettings
from edgefleet.client import AdminClient
from edgefleet.core.errors import EdgefleetError, ErrorCode
from protos.admin.v1 import jobs_pb2, jobs_pb2_grpc
from tests.cloudsvc.conftest import ADMIN_TOKEN, secure_channel


def write_image_folder(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """Class subfolders of 3x8x8 .npy images whose classes differ in brightness."""
    rng = np.random.default_rng(3)
    for c in range(classes):
        folder = root / f"class-{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.uniform(0, 80, (3, 8, 8)) + 150 * c / max(classes - 1, 1)
            np.save(folder / f"{i}.npy", pixels.astype(np.float32))
    return root


@pytest.fixture
def settings(settings: CloudSettings) -> CloudSettings:
    """The shared test settings with room for a data set upload."""
    return settings.model_copy(update={"max_upload_bytes": 4 << 20})


@pytest.fixture
def client(cloud: CloudServer) -> AdminClient:
    return AdminClient(cloud.address, ADMIN_TOKEN, timeout=20, ca_file=cloud.trust_dir / "ca.pem")


def code_of(call: object) -> ErrorCode:
    with pytest.raises(EdgefleetError) as caught:
        assert callable(call)
        call()
    return caught.value.code


def test_job_calls_need_the_admin_token(cloud: CloudServer) -> None:
    with secure_channel(cloud) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(jobs_pb2.ListJobsRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_submissions_get_clear_statuses_and_queue_nothing(client: AdminClient) -> None:
    def submit(**fields: object) -> None:
        base = {"base": "small-cnn", "data": "synthetic:100"}
        client.finetune("m", **{**base, **fields})  # type: ignore[arg-type]

    assert code_of(lambda: submit(base="vgg-19")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: submit(data="imagenet")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: submit(params={"epochs": "-1"})) is ErrorCode.INVALID_ARGUMENT
    assert code_of(lambda: submit(params={"device": "cuda"})) is ErrorCode.FAILED_PRECONDITION
    assert code_of(lambda: submit(targets=["onnx-gpu-fp16"])) is ErrorCode.FAILED_PRECONDITION
    assert code_of(lambda: submit(targets=["tensorrt-fp16"])) is ErrorCode.FAILED_PRECONDITION
    assert code_of(lambda: submit(targets=["onnx-npu-int4"])) is ErrorCode.INVALID_ARGUMENT
    assert code_of(lambda: submit(search={"seed": [1, 2]})) is ErrorCode.INVALID_ARGUMENT
    assert code_of(lambda: client.finetune("Bad Name", base="small-cnn", data="synthetic")) is (
        ErrorCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: client.compile("m", 1, "onnx-cpu-int8")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: client.cancel_job("job-404")) is ErrorCode.NOT_FOUND
    assert code_of(lambda: list(client.watch_job("job-404"))) is ErrorCode.NOT_FOUND
    assert client.jobs() == []


def test_upload_then_finetune_then_watch_to_a_new_version(
    client: AdminClient, tmp_path: Path
) -> None:
    reference = client.upload(write_image_folder(tmp_path / "pets"))
    assert reference.startswith("upload:") and reference.endswith("/pets")
    assert client.upload(tmp_path / "pets") == reference  # same bytes, same reference
    job = client.finetune(
        "pets", base="small-cnn", data=reference, params={"epochs": 3}, targets=["onnx-cpu-fp32"]
    )
    assert job.state == "queued" and job.request["base"] == "small-cnn"
    seen: list[str] = []
    done = client.wait_job(job.job_id, on_event=lambda e: seen.append(e.kind), timeout=240)
    assert done.state == "succeeded", done.error
    assert done.result_version == 1 and {"log", "progress", "state"} <= set(seen)
    assert [t.status for t in done.targets] == ["built"]
    version = client.version("pets", 1)
    assert version.lineage is not None and version.lineage.dataset == reference
    assert version.lineage.class_names == ("class-0", "class-1")
    assert version.evaluation is not None and version.evaluation.count == 4  # 20% of 12 per class
    assert version.artifacts[0].metrics["latency_p50_ms"] > 0
    replay = list(client.watch_job(job.job_id, follow=False))
    assert [e.seq for e in replay] == list(range(1, len(replay) + 1))
    assert replay[-1].state == "succeeded"
    assert [j.job_id for j in client.jobs("pets")] == [job.job_id]
    assert client.jobs(active_only=True) == []


def test_the_cloud_process_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import cloudsvc.server, cloudsvc.job_service, edgefleet.cli.jobs\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
