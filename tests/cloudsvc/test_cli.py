from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudsvc.cli import cloud
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.certs import init_ca
from edgefleet.core.tls import ClientSecurity
from protos.admin.v1 import admin_pb2, admin_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in (["--help"], ["serve", "--help"]):
        result = runner.invoke(cloud, args)
        assert result.exit_code == 0, result.output
    assert "--port-file" in runner.invoke(cloud, ["serve", "--help"]).output


def test_serve_is_secure_by_default_and_stops_on_sigterm(tmp_path: Path) -> None:
    """TLS with a CA it makes, secrets in 0600 files in a 0700 folder and never on argv,
    the trust devices need published; plain text and other CAs are refused."""
    port_file = tmp_path / "port"
    data_dir = tmp_path / "cloud"
    enroll_file = tmp_path / "enroll-token"
    enroll_file.write_text("enr_secret-one\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
            "--enroll-token-file",
            str(enroll_file),
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
        address = f"127.0.0.1:{port}"
        # What `ps` shows holds no secret.
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        token_file = data_dir / "admin-token"
        assert "enr_secret-one" not in argv and token_file.read_text().strip() not in argv

        ca = data_dir / "trust" / "ca.pem"
        with ClientSecurity(ca_file=ca).channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            admin_pb2_grpc.AdminServiceStub(channel).ListModels(
                admin_pb2.ListModelsRequest(),
                metadata=bearer_metadata(token_file.read_text().strip()),
                timeout=10,
            )
        # Plain text does not reach it, nor does TLS trusting another CA (no trust on first use).
        other = init_ca(tmp_path / "other-ca")
        for security in (ClientSecurity(insecure=True), ClientSecurity(ca_file=other.ca_cert)):
            with security.channel(address) as channel, pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (data_dir / "trust" / "root-key.txt").read_text().startswith("sha256:")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert f"edgefleet cloud listening on 127.0.0.1:{port} (TLS)" in output
    assert "stopped (SIGTERM)" in output
    assert "enr_secret-one" not in output  # secrets are masked in the settings print-out
    assert data_dir.stat().st_mode & 0o777 == 0o700
    secrets = [
        token_file,
        data_dir / "keys" / "root-1.key",
        data_dir / "tls" / "ca.key",
        data_dir / "tls" / "server.key",
    ]
    assert {str(p): p.stat().st_mode & 0o777 for p in secrets} == {str(p): 0o600 for p in secrets}


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    from cloudsvc.server import serve
    from cloudsvc.settings import CloudSettings

    with serve(CloudSettings.load(None, data_dir=tmp_path / "a", port=0)) as first:
        result = CliRunner().invoke(
            cloud, ["serve", "--data-dir", str(tmp_path / "b"), "--port", str(first.port)]
        )
    assert result.exit_code != 0
    assert "cannot listen" in result.output
