"""The agent's Prometheus endpoint, scraped over HTTP as Prometheus would: an agent and a real
cloud, each with metrics on, after real traffic (a deploy, inference requests, a sync)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from agent.daemon import Agent
from agent.recorder import Recorder
from agent.settings import AgentSettings
from agent.spool import Spool
from cloudsvc.server import serve
from cloudsvc.settings import CloudSettings
from edgefleet.client.inference import InferenceClient
from edgefleet.core.errors import EdgefleetError, Unavailable
from edgefleet.core.metrics import exposure_warning
from tests.agent.fakes import WIDTH, FakeCloud, inline_golden, model_bytes
from tests.agent.live import admin_of, lab_agent, wait_for
from tests.scrape import Scrape, scrape

ROOT = Path(__file__).resolve().parents[2]
SYNC = "/edgefleet.fleet.v1.AgentService/Sync"


def listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_scrape_shows_what_the_agent_served_synced_and_converged(tmp_path: Path) -> None:
    cloud = serve(
        CloudSettings.model_validate({"data_dir": tmp_path / "cloud", "port": 0, "metrics_port": 0})
    )
    admin = admin_of(cloud, tmp_path)
    agent = lab_agent(cloud, admin, tmp_path, report_interval_s=0.3, metrics_port=0)
    try:
        agent.start()
        assert agent.metrics is not None and cloud.metrics_endpoint is not None
        assert agent.metrics.host == "127.0.0.1" and not agent.metrics.warning
        port, cloud_port = agent.metrics.port, cloud.metrics_endpoint.port
        wait_for(lambda: len(admin.devices()) == 1)
        before = scrape(port)
        assert before.value("edgefleet_agent_info", device_id="edge-1") == 1
        assert before.value("edgefleet_download_fetched_bytes_total") == 0
        assert not before.find("edgefleet_inference_requests_total")

        path = tmp_path / "m.onnx"
        path.write_bytes(model_bytes(2.0))
        admin.push_model("m", path, golden_samples=[inline_golden(2.0)])
        admin.set_capture_policy("m", sample_rate=1.0)  # every request captured
        admin.deploy("m", 1, selector={"site": "lab"})
        admin.wait_converged("m", 1, ["edge-1"], timeout=60)
        wait_for(lambda: agent.recorder is not None and "m" in agent.recorder._models)
        with InferenceClient(f"127.0.0.1:{agent.inference_port}") as client:
            for n in range(10):
                client.infer("m", {"x": np.full((1, WIDTH), n, dtype=np.float32)})
            for _ in range(2):  # the wrong width: refused, counted as errors
                with pytest.raises(EdgefleetError):
                    client.infer("m", {"x": np.zeros((1, 3), dtype=np.float32)})

        def synced() -> bool:
            s = scrape(port)
            return (
                s.value("edgefleet_spool_captures_written_total") == 10
                and s.value("edgefleet_spool_pending_rows", stream="captures") == 0
            )

        wait_for(synced)
        got = scrape(port)
        m1 = {"model": "m", "version": "1"}
        # What a user checks first: requests, errors and latency of model m version 1.
        assert got.value("edgefleet_inference_requests_total", **m1) == 12
        assert got.value("edgefleet_inference_errors_total", **m1) == 2
        assert got.value("edgefleet_inference_captured_total", **m1) == 10
        assert got.value("edgefleet_inference_latency_seconds_count", **m1) == 10
        assert got.value("edgefleet_inference_latency_seconds_bucket", le="+Inf", **m1) == 10
        assert 0 < got.value("edgefleet_inference_latency_seconds_sum", **m1) < 10
        buckets = got.find("edgefleet_inference_latency_seconds_bucket", **m1)
        counts = [b.value for b in sorted(buckets, key=lambda b: float(b.labels["le"]))]
        assert counts == sorted(counts) and len(counts) == 25  # cumulative, 24 bounds + Inf
        (sample,) = got.find("edgefleet_inference_requests_total", **m1)
        assert sample.labels["target"]  # the target the version was built for
        # Convergence.
        assert got.value("edgefleet_converged") == 1
        assert got.value("edgefleet_model_converged", **m1) == 1
        assert got.value("edgefleet_model_desired_version", model="m") == 1
        assert got.value("edgefleet_model_serving_version", model="m") == 1
        assert got.value("edgefleet_model_phase", model="m", phase="ready") == 1
        assert got.value("edgefleet_model_phase", model="m", phase="downloading") == 0
        assert got.value("edgefleet_model_loaded", provider="CPUExecutionProvider", **m1) == 1
        assert got.value("edgefleet_model_activations_total") == 1
        assert got.value("edgefleet_observed_generation") >= 1
        assert got.value("edgefleet_device_error") == 0
        # The download: the model's 64 float weights at least came over the wire.
        assert got.value("edgefleet_download_fetched_bytes_total") >= 4 * WIDTH
        assert got.value("edgefleet_download_chunks_total", outcome="fetched") >= 1
        # Spool and sync: the captures were written, sent and acknowledged.
        assert got.value("edgefleet_capture_queue_rows") == 0
        assert got.value("edgefleet_capture_dropped_total", reason="queue_full") == 0
        assert got.value("edgefleet_sync_rows_total") >= 10
        assert got.value("edgefleet_sync_batches_total") >= 1
        assert got.value("edgefleet_sync_bytes_total") > 0
        assert got.value("edgefleet_sync_last_success_timestamp_seconds") > time.time() - 60
        assert got.value("edgefleet_spool_bytes") > 0
        assert got.value("edgefleet_spool_captures_evicted_total") == 0
        assert got.find("process_cpu_seconds_total")  # the process collector too

        # The cloud's side of the same story.
        c = scrape(cloud_port)
        assert c.value("edgefleet_cloud_devices", state="online") == 1
        assert c.value("edgefleet_cloud_devices", state="offline") == 0
        assert c.value("edgefleet_cloud_devices", state="revoked") == 0
        assert c.value("edgefleet_cloud_devices_converged") == 1
        for state in ("desired", "running", "converged"):
            assert c.value("edgefleet_cloud_model_devices", state=state, **m1) == 1
        assert c.value("edgefleet_cloud_deployments", **m1) == 1
        assert c.value("edgefleet_cloud_ingest_rows_total", stream="captures") == 10
        assert c.value("edgefleet_cloud_ingest_stored_rows_total") >= 10
        assert c.value("edgefleet_cloud_ingest_duplicate_rows_total") == 0
        assert c.value("edgefleet_cloud_sync_batches_total") >= 1
        assert c.total("edgefleet_cloud_sync_refused_total") == 0
        syncs = c.value("edgefleet_cloud_rpc_requests_total", method=SYNC, code="OK")
        assert syncs == c.value("edgefleet_cloud_sync_batches_total")
        assert c.value("edgefleet_cloud_rpc_duration_seconds_count", method=SYNC) >= syncs
        assert c.value("edgefleet_cloud_jobs", state="running") == 0
    finally:
        agent.stop()
        admin.close()
        cloud.stop(grace=0.5)
    assert cloud.metrics_endpoint is not None
    with pytest.raises(OSError):  # both ports closed with their processes' parts
        scrape(port)
    with pytest.raises(OSError):
        scrape(cloud_port)


def test_metrics_are_off_by_default(settings: AgentSettings, cloud: FakeCloud) -> None:
    assert AgentSettings().metrics_port is None
    assert AgentSettings().metrics_host == "127.0.0.1"
    before = listening_ports()
    agent = Agent(settings, link=cloud)
    agent.start(reconcile=False)
    try:
        assert agent.metrics is None
        # The only port this agent opened is the inference one.
        assert listening_ports() - before == {agent.inference_port}
    finally:
        agent.stop()


def test_without_reconciling_or_a_cloud_a_scrape_still_answers(
    settings: AgentSettings, cloud: FakeCloud
) -> None:
    agent = Agent(settings.model_copy(update={"metrics_port": 0}), link=cloud)
    agent.start(reconcile=False)
    try:
        assert agent.metrics is not None
        got = scrape(agent.metrics.port)
        assert got.value("edgefleet_converged") == 0  # never given a desired state
        assert got.value("edgefleet_spool_pending_rows", stream="telemetry") == 0
        assert not got.find("edgefleet_sync_rows_total")  # no syncer without reconciling
        assert got.value("edgefleet_agent_info", device_id="") == 1
    finally:
        agent.stop()


def test_a_taken_metrics_port_fails_the_start_and_says_which_setting(
    settings: AgentSettings, cloud: FakeCloud
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = Agent(settings.model_copy(update={"metrics_port": port}), link=cloud)
        try:
            with pytest.raises(Unavailable, match="metrics_port"):
                agent.start(reconcile=False)
        finally:
            agent.stop()


def test_metrics_off_loopback_warn() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host) == ""
    warning = exposure_warning("0.0.0.0")
    assert "WARNING" in warning and "metrics_host" in warning and "model" in warning


def test_recorder_totals_survive_telemetry_flushes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    recorder = Recorder(spool, stats_per_second=0)
    x = np.zeros((1, 4), dtype=np.float32)
    try:
        for _ in range(3):
            recorder.observe("m", 1, {"x": x}, ["y"], [x], time.perf_counter() - 0.002)
        recorder.failed("m", 1)
        assert recorder.flush_telemetry() == 2  # the window of m v1 and the device's
        recorder.observe("m", 1, {"x": x}, ["y"], [x], time.perf_counter())
        recorder.observe("m", 2, {"x": x}, ["y"], [x], time.perf_counter())
        totals = recorder.totals()
        assert (totals["m", 1].requests, totals["m", 1].errors) == (5, 1)
        assert sum(totals["m", 1].latency) == 4 and totals["m", 1].latency_sum_ms >= 6
        assert totals["m", 2].requests == 1
        # A copy: what a scrape holds does not move under it.
        totals["m", 1].latency[0] += 100
        assert sum(recorder.totals()["m", 1].latency) == 4
    finally:
        spool.close()


def test_agent_run_metrics_port_flag(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    metrics_port = free_port()
    env = {**os.environ, "EDGEFLEET_AGENT_PROVIDERS": '["CPUExecutionProvider"]'}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "edgefleet.cli", "agent", "run",
            "--cloud", f"127.0.0.1:{free_port()}",
            "--insecure",
            "--root-key", "sha256:" + "ab" * 32,
            "--data-dir", str(tmp_path / "agent"),
            "--inference-port", "0",
            "--metrics-port", str(metrics_port),
            "--port-file", str(port_file),
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        got: Scrape = scrape(metrics_port)
        assert got.value("edgefleet_converged") == 0
        assert got.value("edgefleet_spool_budget_bytes") == 512 << 20
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in output
