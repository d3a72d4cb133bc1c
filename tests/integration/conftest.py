"""A real cloud process and real agent processes on loopback, for integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.cli.processes import (
    CloudTrust,
    ManagedProcess,
    agent_process,
    cloud_process,
    write_secret_file,
)
from edgefleet.client.admin import AdminClient
from edgefleet.client.inference import InferenceClient
from edgefleet.core.fleet import Device
from tests.onnx_models import expected_logits, linear_model

INTEGRATION_DIR = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's pytestmark marks nothing: every test here starts real processes.
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass
class Fleet:
    workdir: Path
    cloud: ManagedProcess
    trust: CloudTrust
    agents: dict[str, ManagedProcess] = field(default_factory=dict)
    _client: AdminClient | None = None

    @property
    def admin(self) -> AdminClient:
        if self._client is None:
            self._client = self.client()
        return self._client

    def client(self, timeout: float = 15) -> AdminClient:
        return AdminClient(
            self.cloud.address,
            token_file=self.trust.admin_token_file,
            ca_file=self.trust.ca_file,
            insecure=self.trust.insecure,
            timeout=timeout,
        )

    @property
    def admin_args(self) -> list[str]:
        """How an `edgefleet` admin command reaches this cloud."""
        return ["--cloud", self.cloud.address, *self.trust.client_args()]

    def enroll_token_file(self, name: str, labels: dict[str, str]) -> Path:
        """A single-use token granting `labels`, in a file only its owner reads."""
        secret, _ = self.admin.create_enroll_token(labels=labels, max_uses=1, note=name)
        return write_secret_file(self.workdir / "tokens" / name, secret)

    def start_agent(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        *,
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
        wait: bool = True,
        via: str | None = None,
    ) -> ManagedProcess:
        """An agent process enrolled with a token granting `labels`; `via` is the address
        it dials instead of the cloud's (a proxy in front of it)."""
        proc = agent_process(
            self.workdir,
            name,
            via or self.cloud.address,
            self.trust,
            self.enroll_token_file(name, labels or {"site": "test"}),
            extra=extra,
            env={
                "EDGEFLEET_AGENT_REPORT_INTERVAL_S": "1",
                "EDGEFLEET_AGENT_BACKOFF_CAP_S": "2",
                **(env or {}),
            },
        )
        proc.start()
        if wait:
            proc.wait_ready(60)
        self.agents[name] = proc
        return proc

    def restart_agent(self, name: str, *, env: dict[str, str] | None = None) -> ManagedProcess:
        old = self.agents[name]
        old.stop()
        proc = ManagedProcess(
            old.name, old.args, old.log_path, old.port_file, {**old.env, **(env or {})}
        )
        proc.start().wait_ready(60)
        self.agents[name] = proc
        return proc

    def restart_cloud(self) -> None:
        port = self.cloud.port
        self.cloud.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        self.cloud, self.trust = cloud_process(
            self.workdir, port=port, insecure=self.trust.insecure
        )
        self.cloud.start().wait_ready(60)

    def infer(
        self, agent: str, x: npt.NDArray[np.float32], version: int | None = None, model: str = "m"
    ) -> tuple[int, npt.NDArray[np.float32]]:
        with InferenceClient(self.agents[agent].address) as client:
            result = client.infer(model, {"x": x}, version=version)
            logits: npt.NDArray[np.float32] = result.outputs["logits"]
            return int(result.model_version), logits

    def wait_for(
        self, predicate: Callable[[list[Device]], bool], timeout: float = 60.0, what: str = ""
    ) -> list[Device]:
        deadline = time.monotonic() + timeout
        devices: list[Device] = []
        while time.monotonic() < deadline:
            devices = self.admin.devices()
            if predicate(devices):
                return devices
            time.sleep(0.2)
        summary = [(d.device_id, d.models, d.last_error) for d in devices]
        raise AssertionError(f"timed out waiting for {what}: {summary}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.log_tail(30)}" for p in [self.cloud, *self.agents.values()]
        )

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in [*self.agents.values(), self.cloud]:
            proc.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    cloud, trust = cloud_process(tmp_path)
    cloud.start().wait_ready(60)
    f = Fleet(tmp_path, cloud, trust)
    try:
        yield f
    finally:
        f.stop()


@dataclass(frozen=True)
class Versions:
    v1: Path
    v2: Path
    x: npt.NDArray[np.float32]

    def expected(self, version: int) -> npt.NDArray[np.float32]:
        return expected_logits(self.v1 if version == 1 else self.v2, self.x)


@pytest.fixture
def models(tmp_path: Path) -> Versions:
    x = np.random.default_rng(7).normal(size=(4, 8)).astype(np.float32)
    return Versions(
        linear_model(tmp_path / "m-v1.onnx", seed=1),
        linear_model(tmp_path / "m-v2.onnx", seed=2),
        x,
    )


def running(devices: list[Device], model: str = "m") -> dict[str, int]:
    return {d.device_id: d.running(model) for d in devices}
