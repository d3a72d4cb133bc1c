"""Fixtures of the fault suite: see rig.py (in-process real parts) and netproxy.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.rig import Stage, stage

# The real cloud process of the integration tests, with TLS and its own CA.
from tests.integration.conftest import fleet  # noqa: F401

FAULTS_DIR = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test here is part of the fault suite, whichever file it is in.
    for item in items:
        if FAULTS_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Stage]:
    yield from stage(tmp_path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.faults.figures import write_if_asked

    write_if_asked()


# What the fault tests set on their agents: short retries and deadlines, so that a fault
# costs seconds, not the production defaults' minutes.
FAST_AGENT = {
    "EDGEFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "EDGEFLEET_AGENT_BACKOFF_BASE_S": "0.2",
    "EDGEFLEET_AGENT_BACKOFF_CAP_S": "1",
    "EDGEFLEET_AGENT_RESYNC_INTERVAL_S": "2",
    "EDGEFLEET_AGENT_RPC_TIMEOUT_S": "5",
    "EDGEFLEET_AGENT_CHUNK_TIMEOUT_S": "4",
    "EDGEFLEET_AGENT_MIN_FREE_DISK_BYTES": "0",
}
