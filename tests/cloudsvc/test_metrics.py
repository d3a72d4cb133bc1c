"""The cloud's Prometheus endpoint, scraped over HTTP: RPCs by method and status, sync batches
stored and refused by reason, devices by state, jobs by state; off unless asked for."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cloudsvc.metrics import MeteredIngest
from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings
from edgefleet.client import AdminClient
from edgefleet.core.errors import EdgefleetError, FailedPrecondition, InvalidArgument
from edgefleet.core.jobs import Job, JobState
from edgefleet.core.rollouts import RolloutSpec
from protos.fleet.v1 import data_pb2
from tests.cloudsvc.conftest import write_linear_model
from tests.scrape import scrape

ROOT = Path(__file__).resolve().parents[2]
LIST_DEVICES = "/edgefleet.admin.v1.AdminService/ListDevices"


def _settings(tmp_path: Path, **extra: object) -> CloudSettings:
    return CloudSettings.model_validate(
        {
            "data_dir": tmp_path / "cloud",
            "port": 0,
            "metadata_backend": "memory",
            "enroll_tokens": ["fleet-token"],
            **extra,
        }
    )


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudServer]:
    server = serve(_settings(tmp_path, metrics_port=0))
    yield server
    server.stop(grace=0.5)


def _port(server: CloudServer) -> int:
    assert server.metrics_endpoint is not None
    return server.metrics_endpoint.port


def _window(seq: int) -> data_pb2.TelemetryRecord:
    now = time.time()
    return data_pb2.TelemetryRecord(seq=seq, device=data_pb2.DeviceWindow(start=now, end=now))


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    assert CloudSettings().metrics_port is None
    assert CloudSettings().metrics_host == "127.0.0.1"
    before = {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    server = serve(_settings(tmp_path))
    try:
        assert server.metrics_endpoint is None
        after = {
            c.laddr.port
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert after - before == {server.port}
    finally:
        server.stop(grace=0.5)


def test_rpcs_are_counted_by_method_and_status(cloud: CloudServer, tmp_path: Path) -> None:
    ca = cloud.trust_dir / "ca.pem"
    admin = AdminClient(cloud.address, token_file=tmp_path / "cloud" / "admin-token", ca_file=ca)
    intruder = AdminClient(cloud.address, token="adm_wrong", ca_file=ca)
    try:
        assert admin.devices() == []
        assert admin.devices() == []
        with pytest.raises(EdgefleetError):
            intruder.devices()
    finally:
        admin.close()
        intruder.close()
    got = scrape(_port(cloud))
    assert got.value("edgefleet_cloud_rpc_requests_total", method=LIST_DEVICES, code="OK") == 2
    refused = got.value(
        "edgefleet_cloud_rpc_requests_total", method=LIST_DEVICES, code="UNAUTHENTICATED"
    )
    assert refused == 1
    assert got.value("edgefleet_cloud_rpc_duration_seconds_count", method=LIST_DEVICES) == 3
    assert got.value("edgefleet_cloud_info", version="0.1.0") == 1


def test_sync_batches_stored_resent_and_refused_by_reason(cloud: CloudServer) -> None:
    ingest = MeteredIngest(cloud.data, cloud.metadata, cloud.metrics)
    batch = data_pb2.SyncBatch(device_id="d1", spool_id="spool-1", telemetry=[_window(1)])
    assert ingest.sync("d1", batch).stored == 1
    assert ingest.sync("d1", batch).duplicates == 1  # the same batch again: stored once
    with pytest.raises(FailedPrecondition):  # a gap after the cloud's mark
        ingest.sync("d1", data_pb2.SyncBatch(spool_id="spool-1", telemetry=[_window(5)]))
    with pytest.raises(InvalidArgument):
        ingest.sync("d1", data_pb2.SyncBatch(spool_id="no spaces allowed"))
    never_given = data_pb2.TelemetryRecord(seq=2)
    never_given.model.model, never_given.model.version = "m", 1
    with pytest.raises(EdgefleetError):
        ingest.sync("d1", data_pb2.SyncBatch(spool_id="spool-1", telemetry=[never_given]))
    got = scrape(_port(cloud))
    assert got.value("edgefleet_cloud_sync_batches_total") == 2
    assert got.value("edgefleet_cloud_ingest_rows_total", stream="telemetry") == 2
    assert got.value("edgefleet_cloud_ingest_rows_total", stream="captures") == 0
    assert got.value("edgefleet_cloud_ingest_stored_rows_total") == 1
    assert got.value("edgefleet_cloud_ingest_duplicate_rows_total") == 1
    assert got.value("edgefleet_cloud_ingest_bytes_total") == 2 * batch.ByteSize()
    for reason in ("out_of_sequence", "invalid", "not_assigned"):
        assert got.value("edgefleet_cloud_sync_refused_total", reason=reason) == 1


def test_devices_and_jobs_by_state(cloud: CloudServer) -> None:
    cloud.fleet.enroll("fleet-token", "d1")
    cloud.fleet.enroll("fleet-token", "d2")
    cloud.fleet.revoke("d2")
    cloud.metadata.create_job(Job("", "finetune", "m", "{}", state=JobState.FAILED))
    got = scrape(_port(cloud))
    assert got.value("edgefleet_cloud_devices", state="revoked") == 1
    assert (
        got.total("edgefleet_cloud_devices", state="online")
        + got.total("edgefleet_cloud_devices", state="offline")
        == 1
    )
    # Given nothing, d1 has applied everything it was given.
    assert got.value("edgefleet_cloud_devices_converged") == 1
    assert got.value("edgefleet_cloud_jobs", state="failed") == 1
    assert got.value("edgefleet_cloud_jobs", state="queued") == 0
    assert not got.find("edgefleet_cloud_deployments")
    assert got.value("edgefleet_cloud_rollouts", state="running") == 0


def test_a_rollout_under_way_shows_its_devices_by_phase(cloud: CloudServer, tmp_path: Path) -> None:
    cloud.fleet.enroll("fleet-token", "d1")
    cloud.fleet.enroll("fleet-token", "d2")
    cloud.registry.push("m", write_linear_model(tmp_path / "m.onnx"))
    rollout = cloud.rollouts.start_rollout(RolloutSpec("m", 1, {}, (0.5, 1.0), 60.0, 0.5))
    got = scrape(_port(cloud))
    assert got.value("edgefleet_cloud_rollouts", state="running") == 1
    labels = {"rollout": rollout.rollout_id, "model": "m", "version": "1"}
    # The first wave's device was told and has not reported; the other waits its turn.
    assert got.value("edgefleet_cloud_rollout_devices", phase="pending", **labels) == 2
    assert got.value("edgefleet_cloud_rollout_devices", phase="active", **labels) == 0
    cloud.rollouts.abort(rollout.rollout_id, "test")
    got = scrape(_port(cloud))
    assert got.value("edgefleet_cloud_rollouts", state="aborted") == 1
    assert not got.find("edgefleet_cloud_rollout_devices")


def test_a_failing_section_is_left_out_and_the_rest_answers(
    cloud: CloudServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[object]:
        raise RuntimeError("the store is closing")

    monkeypatch.setattr(cloud.fleet, "devices", broken)
    with caplog.at_level(logging.WARNING):
        got = scrape(_port(cloud))
    assert not got.find("edgefleet_cloud_devices")
    assert got.find("edgefleet_cloud_jobs") and got.find("edgefleet_cloud_sync_batches_total")
    assert "the store is closing" in caplog.text


def test_serve_metrics_port_flag(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "edgefleet.cli", "cloud", "serve",
            "--data-dir", str(tmp_path / "cloud"),
            "--port", "0",
            "--port-file", str(port_file),
            "--metrics-port", str(metrics_port),
        ],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        got = scrape(metrics_port)
        assert got.value("edgefleet_cloud_devices", state="online") == 0
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in output
