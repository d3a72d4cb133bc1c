from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from click.testing import CliRunner

from agent.cli import agent
from edgefleet.core.certs import init_ca
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for args in (["--help"], ["run", "--help"], ["reenroll", "--help"]):
        result = runner.invoke(agent, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_a_bad_label_is_explained() -> None:
    result = CliRunner().invoke(agent, ["run", "--label", "oops"])
    assert result.exit_code != 0
    assert "key=value" in result.output


def test_agent_modules_never_import_torch_or_onnx() -> None:
    code = (
        "import sys, agent.cli, agent.daemon, agent.reconciler, agent.cloud_link;"
        "bad=[m for m in ('torch','onnx') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_agent_needs_a_way_to_trust_the_cloud() -> None:
    result = CliRunner().invoke(agent, ["run", "--cloud", "127.0.0.1:1"])
    assert result.exit_code != 0
    assert "--ca-file" in result.output and "--insecure" in result.output
    bad = CliRunner().invoke(agent, ["run", "--insecure", "--root-key", "abc"])
    assert bad.exit_code != 0 and "not a root key fingerprint" in bad.output


def test_run_serves_offline_keeps_secrets_private_and_stops_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    token_file = tmp_path / "enroll-token"
    token_file.write_text("hidden-token\n")
    ca = init_ca(tmp_path / "tls").ca_cert
    env = {
        **os.environ,
        "EDGEFLEET_AGENT_BACKOFF_CAP_S": "0.5",
        "EDGEFLEET_AGENT_PROVIDERS": '["CPUExecutionProvider"]',
    }
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "edgefleet.cli", "agent", "run",
            "--cloud", f"127.0.0.1:{_dead_port()}",
            "--ca-file", str(ca),
            "--root-key", "sha256:" + "ab" * 32,
            "--enroll-token-file", str(token_file),
            "--data-dir", str(tmp_path / "agent"),
            "--inference-port", "0",
            "--label", "site=lab",
            "--port-file", str(port_file),
            "--log-format", "json",
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert "hidden-token" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        # Inference binds loopback unless told otherwise.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                pb.ServerLiveRequest(), timeout=10
            )
        assert live.live
        time.sleep(0.5)  # let it fail to reach the cloud at least once
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "hidden-token" not in output
    # Every line a log shipper can read: one JSON object with a time, a level and a logger.
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = " | ".join(r["message"] for r in records)
    assert f"serving Open Inference Protocol on 127.0.0.1:{port}; cloud" in messages
    assert "over TLS" in messages and "WARNING" not in messages
    assert "cannot reach" in messages
    assert "stopped: serving nothing" in messages
    # Its folder holds its credential: only its user gets in.
    assert (tmp_path / "agent").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "agent" / "agent.db").stat().st_mode & 0o777 == 0o600
