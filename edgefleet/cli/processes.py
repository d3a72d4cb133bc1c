"""Start edgefleet processes (cloud, agents) as children and stop them cleanly.

Used by the demo and the integration tests: a process started with `--port 0 --port-file F`
writes its bound port to F once it serves, so nothing guesses ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.core.errors import Unavailable


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    log_path: Path
    port_file: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ManagedProcess:
        self.port_file.unlink(missing_ok=True)
        self.port = 0
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> int:
        """Wait for the port file; raise with the log's tail if the process dies first."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                text = self.port_file.read_text().strip()
                if text.isdigit():
                    self.port = int(text)
                    return self.port
            if self.process.poll() is not None:
                raise Unavailable(
                    f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise Unavailable(f"{self.name} did not start within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the crash a power cut or the OOM killer would cause."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@dataclass(frozen=True)
class CloudTrust:
    """What a cloud started by :func:`cloud_process` gives its clients, out of band: the CA
    bundle, the root key fingerprint and the first admin token, as files in its data folder.
    Empty `ca_file` means the cloud serves plain text (`insecure`)."""

    data_dir: Path
    insecure: bool = False

    @property
    def ca_file(self) -> Path | None:
        return None if self.insecure else self.data_dir / "trust" / "ca.pem"

    @property
    def root_key(self) -> str:
        return (self.data_dir / "trust" / "root-key.txt").read_text().strip()

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"

    def client_args(self) -> list[str]:
        """The security options of an admin command (`edgefleet devices ...`)."""
        tls = ["--insecure"] if self.insecure else ["--ca-file", str(self.ca_file)]
        return ["--token-file", str(self.admin_token_file), *tls]

    def agent_args(self) -> list[str]:
        """The trust an agent is provisioned with (`edgefleet agent run ...`)."""
        tls = ["--insecure"] if self.insecure else ["--ca-file", str(self.ca_file)]
        return ["--root-key", self.root_key, *tls]


def write_secret_file(path: Path, secret: str) -> Path:
    """A secret in a file only its owner reads, for a `--...-file` option."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def cloud_process(
    workdir: Path,
    extra: list[str] | None = None,
    port: int = 0,
    *,
    insecure: bool = False,
    enroll_token_file: Path | None = None,
) -> tuple[ManagedProcess, CloudTrust]:
    """The cloud service on loopback, with TLS from certificates it makes in its data folder
    (plain text only with `insecure`); `port` 0 picks a free port (pass the old one to
    restart a cloud where its agents expect it)."""
    data = workdir / "cloud"
    process = ManagedProcess(
        name="cloud",
        args=[
            "cloud",
            "serve",
            "--data-dir",
            str(data),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-file",
            str(workdir / "cloud.port"),
            *(["--insecure"] if insecure else []),
            *(["--enroll-token-file", str(enroll_token_file)] if enroll_token_file else []),
            *(extra or []),
        ],
        log_path=workdir / "cloud.log",
        port_file=workdir / "cloud.port",
    )
    return process, CloudTrust(data, insecure)


def agent_process(
    workdir: Path,
    name: str,
    cloud: str,
    trust: CloudTrust,
    enroll_token_file: Path,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """An agent on loopback, provisioned with the cloud's trust and an enroll token file
    (its labels are the ones the token grants)."""
    return ManagedProcess(
        name=name,
        args=[
            "agent",
            "run",
            "--cloud",
            cloud,
            *trust.agent_args(),
            "--enroll-token-file",
            str(enroll_token_file),
            "--data-dir",
            str(workdir / name),
            "--device-id",
            name,
            "--inference-host",
            "127.0.0.1",
            "--inference-port",
            "0",
            "--port-file",
            str(workdir / f"{name}.port"),
            *(extra or []),
        ],
        log_path=workdir / f"{name}.log",
        port_file=workdir / f"{name}.port",
        env=env or {},
    )
