"""A real cloud service and a real agent, both in this process, for end-to-end tests of the
way back (captures, telemetry, metrics, A/B): what they share, written once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.daemon import Agent
from agent.settings import AgentSettings
from cloudsvc.server import CloudServer
from edgefleet.client import AdminClient


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def admin_of(cloud: CloudServer, tmp_path: Path) -> AdminClient:
    """An admin client of a cloud whose data_dir is tmp_path / "cloud"."""
    return AdminClient(
        cloud.address,
        token_file=tmp_path / "cloud" / "admin-token",
        ca_file=cloud.trust_dir / "ca.pem",
    )


def lab_agent(cloud: CloudServer, admin: AdminClient, tmp_path: Path, **overrides: Any) -> Agent:
    """An agent (not started) enrolling as edge-1 with the label site=lab, trusting the
    cloud's CA and root key, reporting, syncing and flushing telemetry every half second."""
    secret, _ = admin.create_enroll_token(labels={"site": "lab"}, max_uses=1)
    fields: dict[str, Any] = {
        "cloud": cloud.address,
        "ca_file": cloud.trust_dir / "ca.pem",
        "root_key": (cloud.trust_dir / "root-key.txt").read_text(),
        "enroll_token": secret,
        "device_id": "edge-1",
        "data_dir": tmp_path / "agent",
        "providers": ["CPUExecutionProvider"],
        "inference_port": 0,
        "report_interval_s": 0.5,
        "backoff_cap_s": 0.5,
        "min_free_disk_bytes": 0,
        "telemetry_interval_s": 0.5,
        "sync_interval_s": 0.3,
    }
    fields.update(overrides)
    return Agent(AgentSettings(**fields))
