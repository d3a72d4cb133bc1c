"""The fleet simulator against a real cloud process: 100 simulated devices converge on a
deploy and on a signed rollback, devices offline do not (and catch up when back), and the
simulated latency of each version shows in the cloud's telemetry."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fleetsim import Behaviour, SimFleet, SimulatedRuntime, start_cloud
from tests.onnx_models import linear_model

DEVICES = 100
LABELS = {"fleet": "sim"}
MODEL = "sim-classifier"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    workdir = tmp_path_factory.mktemp("fleetsim")
    runtime = SimulatedRuntime(Behaviour(latency_ms=4.0, jitter=0.1))
    runtime.set(MODEL, 2, Behaviour(latency_ms=60.0, jitter=0.1, error_rate=0.2))
    with start_cloud(workdir, devices=DEVICES) as cloud:
        sim = SimFleet(cloud, workdir / "devices", runtime=runtime, telemetry_interval_s=0.5)
        try:
            for version in (1, 2):
                sim.admin.push_model(
                    MODEL, linear_model(workdir / f"v{version}.onnx", seed=version)
                )
            sim.enroll(DEVICES, LABELS, telemetry=10)
            yield sim
        finally:
            sim.close()


def test_deploy_offline_rollback_and_telemetry(fleet: SimFleet) -> None:
    admin = fleet.admin
    since = time.monotonic()
    admin.deploy(MODEL, 1, selector=LABELS)
    first = fleet.wait_until_converged(MODEL, 1, since=since, timeout=30)
    assert first.devices == DEVICES and first.confirmed_s > 0
    fetched = fleet.bytes_fetched()
    assert all(b > 0 for b in fetched.values())
    assert fleet.runtime.loads == DEVICES

    # Ten devices go offline; the others take v2, they keep v1.
    offline = [d.device_id for d in list(fleet.devices.values())[-10:]]
    fleet.stop(offline)
    since = time.monotonic()
    admin.deploy(MODEL, 2, selector=LABELS)
    fleet.wait_until_converged(MODEL, 2, since=since, timeout=30)
    time.sleep(0.5)  # room for a wrong activation to show
    by_id = {d.device_id: d for d in admin.devices()}
    for device_id in offline:
        assert fleet.devices[device_id].serving(MODEL) == 1
        assert by_id[device_id].running(MODEL) == 1
        assert not by_id[device_id].converged
    # Only the new version's bytes travelled to those that moved (not v1's again).
    moved = [d for d in fleet.devices.values() if d.device_id not in offline]
    assert all(d.bytes_fetched - fetched[d.device_id] > 0 for d in moved)

    # Back online, they catch up from their local state.
    fleet.start(offline)
    fleet.wait_until_converged(MODEL, 2, devices=offline, timeout=30)

    # The slow, faulty v2 shows in the cloud's telemetry beside v1.
    time.sleep(1.0)
    fleet.flush_telemetry()
    versions = {v.version: v for v in admin.telemetry(MODEL)}
    assert {1, 2} <= set(versions)
    assert versions[1].p95_ms < 10 and versions[1].errors == 0
    assert 40 <= versions[2].p95_ms <= 100
    assert 0.1 < versions[2].errors / versions[2].requests < 0.3

    # A signed rollback (what a rollout abort does) takes every device back to v1.
    killed = [d.device_id for d in list(fleet.devices.values())[:5]]
    fleet.kill(killed)
    since = time.monotonic()
    admin.rollback(MODEL, 1, selector=LABELS)
    back = fleet.wait_until_converged(
        MODEL, 1, since=since, timeout=30, devices=[d for d in fleet.devices if d not in killed]
    )
    assert back.devices == DEVICES - len(killed)
    fleet.start(killed)  # a killed device restarts from disk and converges too
    fleet.wait_until_converged(MODEL, 1, devices=killed, timeout=30)
    assert all(d.serving(MODEL) == 1 for d in fleet.devices.values())
