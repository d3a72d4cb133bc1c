from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from agent.artifacts import ArtifactStore
from agent.chunks import ChunkStore
from agent.reconciler import Reconciler
from agent.runtime import ModelRepository
from agent.settings import AgentSettings
from agent.state import StateStore
from tests.agent.fakes import FakeCloud


@pytest.fixture
def settings(tmp_path: Path, cloud: FakeCloud) -> AgentSettings:
    return AgentSettings(
        cloud="127.0.0.1:1",
        insecure=True,  # the fake cloud is in memory: no channel to secure
        root_key=cloud.root_key,
        enroll_token=SecretStr("enroll-secret"),
        data_dir=tmp_path / "agent",
        providers=["CPUExecutionProvider"],
        intra_op_threads=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        resync_interval_s=0.2,
        report_interval_s=0.2,
        min_free_disk_bytes=0,
        inference_host="127.0.0.1",
        inference_port=0,
    )


@pytest.fixture
def cloud() -> FakeCloud:
    return FakeCloud()


class Rig:
    """A reconciler wired like the daemon wires it, over a FakeCloud; reopenable."""

    def __init__(self, settings: AgentSettings, cloud: FakeCloud) -> None:
        self.settings = settings
        self.cloud = cloud
        self.events: list[str] = []
        self.open()

    def open(self) -> None:
        self.state = StateStore(self.settings.db_path)
        self.chunks = ChunkStore(self.settings.data_dir / "chunks")
        self.artifacts = ArtifactStore(self.settings.data_dir, self.chunks)
        self.repository = ModelRepository()
        self.reconciler = Reconciler(
            self.settings,
            self.state,
            self.chunks,
            self.artifacts,
            self.cloud,
            self.repository,
            on_event=self.events.append,
        )

    def reopen(self) -> None:
        self.state.close()
        self.open()


@pytest.fixture
def rig(settings: AgentSettings, cloud: FakeCloud) -> Iterator[Rig]:
    r = Rig(settings, cloud)
    yield r
    r.state.close()
