from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudsvc.cli import cloud
from edgefleet.core.auth import bearer_metadata
from protos.admin.v1 import admin_pb2, admin_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in (["--help"], ["serve", "--help"]):
        result = runner.invoke(cloud, args)
        assert result.exit_code == 0, result.output
    assert "--port-file" in runner.invoke(cloud, ["serve", "--help"]).output


def test_serve_writes_its_port_answers_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    data_dir = tmp_path / "cloud"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["--data-dir", str(data_dir), "--port", "0", "--port-file", str(port_file)]
    args += ["--enroll-token", "enr_secret-one"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet.cli",
            "cloud",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--enroll-token",
            "enr_secret-one",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server did not write its port in 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # The admin token it made is kept 0600 in the data dir and works.
            token_file = data_dir / "admin-token"
            assert token_file.stat().st_mode & 0o777 == 0o600
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            admin.ListModels(
                admin_pb2.ListModelsRequest(),
                metadata=bearer_metadata(token_file.read_text().strip()),
                timeout=10,
            )
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert f"edgefleet cloud listening on 127.0.0.1:{port}" in output
    assert "stopped (SIGTERM)" in output
    assert "enr_secret-one" not in output  # secrets are masked in the settings print-out
    assert (data_dir / "keys" / "manifest-signing.key").stat().st_mode & 0o777 == 0o600


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    from cloudsvc.server import serve
    from cloudsvc.settings import CloudSettings

    with serve(CloudSettings.load(None, data_dir=tmp_path / "a", port=0)) as first:
        result = CliRunner().invoke(
            cloud, ["serve", "--data-dir", str(tmp_path / "b"), "--port", str(first.port)]
        )
    assert result.exit_code != 0
    assert "cannot listen" in result.output
