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


def cloud_process(
    workdir: Path,
    admin_token: str,
    enroll_token: str,
    extra: list[str] | None = None,
    port: int = 0,
) -> ManagedProcess:
    """The cloud service on loopback; `port` 0 picks a free port (pass the old one to
    restart a cloud where its agents expect it)."""
    data = workdir / "cloud"
    return ManagedProcess(
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
            "--admin-token",
            admin_token,
            "--enroll-token",
            enroll_token,
            *(extra or []),
        ],
        log_path=workdir / "cloud.log",
        port_file=workdir / "cloud.port",
    )


def agent_process(
    workdir: Path,
    name: str,
    cloud: str,
    enroll_token: str,
    labels: dict[str, str],
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    label_args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
    return ManagedProcess(
        name=name,
        args=[
            "agent",
            "run",
            "--cloud",
            cloud,
            "--enroll-token",
            enroll_token,
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
            *label_args,
            *(extra or []),
        ],
        log_path=workdir / f"{name}.log",
        port_file=workdir / f"{name}.port",
        env=env or {},
    )
