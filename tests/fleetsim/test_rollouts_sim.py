"""Rollouts against a real cloud process (SQLite, its rollout engine ticking) and simulated
devices that report, and send telemetry through the real Recorder, Spool and Syncer: a gate
breach, the failure threshold, a wave's deadline with devices offline, a manual abort,
pause and resume, the cloud SIGKILLed in the middle of a wave and at the moment of an abort,
and a second rollout on the same devices refused through the `edgefleet` command.

What a user checks each time: the rollout's state and its reason (with the figures), which
devices were moved, and what each device serves in the end (asked of the device itself and
of the cloud's admin API). The engine's waves are ordered by sha256("r-N/device"): the
tests compute the same order to pick devices of a given wave."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.core.errors import EdgefleetError, FailedPrecondition
from edgefleet.core.rollouts import (
    DeadlineAction,
    DevicePhase,
    Rollout,
    RolloutSpec,
    RolloutState,
    WaveState,
    parse_gate,
)
from tests.fleetsim import Behaviour, SimCloud, SimFleet, SimulatedRuntime
from tests.onnx_models import linear_model

MODEL = "sim-classifier"
LABELS = {"fleet": "rollout"}
# The engine steps every 0.2 s here (1 s by default); a gate judges with 20 requests a side.
CLOUD_ENV = {
    "EDGEFLEET_CLOUD_ROLLOUTS__TICK_S": "0.2",
    "EDGEFLEET_CLOUD_ROLLOUTS__MIN_REQUESTS": "20",
    "EDGEFLEET_CLOUD_OFFLINE_AFTER_S": "3",
}

pytestmark = pytest.mark.integration


@dataclass
class Rig:
    cloud: SimCloud
    fleet: SimFleet
    runtime: SimulatedRuntime
    ids: list[str]

    def start(self, **spec: Any) -> Rollout:
        return self.fleet.admin.start_rollout(RolloutSpec(MODEL, 2, LABELS, **spec))

    def wait(
        self, rollout_id: str, done: Callable[[Rollout], bool], timeout: float = 30.0
    ) -> Rollout:
        deadline = time.monotonic() + timeout
        while True:
            found = self.fleet.admin.rollout(rollout_id)
            if done(found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rollout {rollout_id} did not get there in {timeout:.0f}s: "
                    f"{found.state.value}, wave {found.current_wave + 1} "
                    f"{[w.state.value for w in found.waves]}, {found.counts(found.moved())}, "
                    f"{found.reason}\n{self.cloud.process.log_tail(15)}"
                )
            time.sleep(0.1)

    def ended(self, rollout_id: str, state: RolloutState, timeout: float = 30.0) -> Rollout:
        found = self.wait(rollout_id, lambda r: r.state.finished, timeout)
        assert found.state == state, (found.state, found.reason)
        return found

    def assigned(self) -> dict[str, tuple[int, bool]]:
        """Per device: the version the cloud tells it to run, and whether as a rollback."""
        found = {}
        for d in self.fleet.admin.devices():
            a = d.desired.assignment(MODEL)
            found[d.device_id] = (a.version, a.rollback) if a else (0, False)
        return found

    def serving(self, ids: Sequence[str] | None = None) -> dict[str, int]:
        return {i: self.fleet.devices[i].serving(MODEL) for i in (ids or self.ids)}


def wave_members(ids: Sequence[str], waves: Sequence[float], rollout_id: str = "r-1") -> list[list[str]]:  # fmt: skip
    """The devices of each wave, as the engine picks them (its fixed hash order)."""
    ordered = sorted(ids, key=lambda i: hashlib.sha256(f"{rollout_id}/{i}".encode()).hexdigest())
    found, low = [], 0
    for share in waves:
        high = min(len(ordered), max(1, math.ceil(share * len(ordered) - 1e-9)))
        found.append(ordered[low:high])
        low = high
    return found


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """A fresh cloud and `devices` simulated devices running v1 (installed by a deploy)."""
    made: list[tuple[SimCloud, SimFleet]] = []

    def make(devices: int, *, telemetry: int = 0, runtime: SimulatedRuntime | None = None) -> Rig:
        runtime = runtime or SimulatedRuntime(Behaviour(latency_ms=4.0, jitter=0.1))
        cloud = SimCloud(tmp_path, devices=devices, env=CLOUD_ENV)
        access = cloud.start()
        fleet = SimFleet(
            access,
            tmp_path / "devices",
            runtime=runtime,
            report_interval_s=1.0,
            resync_interval_s=5.0,
            telemetry_interval_s=0.5,
            settings={"backoff_base_s": 0.2, "backoff_cap_s": 1.0},
        )
        made.append((cloud, fleet))
        for version in (1, 2):
            fleet.admin.push_model(MODEL, linear_model(tmp_path / f"v{version}.onnx", seed=version))
        fleet.enroll(devices, LABELS, telemetry=telemetry)
        fleet.admin.deploy(MODEL, 1, selector=LABELS)
        fleet.wait_until_converged(MODEL, 1, timeout=30)
        return Rig(cloud, fleet, runtime, sorted(fleet.devices))

    yield make
    for cloud, fleet in made:
        fleet.close()
        cloud.stop()


def test_a_breached_p95_gate_aborts_and_every_moved_device_serves_v1_again(
    make_rig: Callable[..., Rig],
) -> None:
    runtime = SimulatedRuntime(Behaviour(latency_ms=4.0, jitter=0.1))
    runtime.set(MODEL, 2, Behaviour(latency_ms=60.0, jitter=0.1))  # v2 is slow
    rig = make_rig(40, telemetry=40, runtime=runtime)
    time.sleep(1.5)  # v1's figures on these devices: the relative gate's baseline
    rig.fleet.flush_telemetry()
    waves = (0.25, 1.0)
    first, rest = wave_members(rig.ids, waves)

    started = rig.start(
        waves=waves,
        bake_s=2.0,
        gates=(parse_gate("p95_latency_ms<+50%"), parse_gate("error_rate<5%")),
    )
    assert started.rollout_id == "r-1" and [w.size for w in started.waves] == [10, 30]
    aborted = rig.ended("r-1", RolloutState.ABORTED)

    # Why, with the figures: v2's p95 against v1's on the same devices.
    assert aborted.reason.startswith("gate breached: p95_latency_ms<+50% breached: ")
    assert "against a limit of" in aborted.reason and "previous version" in aborted.reason
    assert "error_rate" not in aborted.reason  # that gate held
    wave = aborted.waves[0]
    assert wave.state == WaveState.FAILED and aborted.waves[1].state == WaveState.PENDING
    p95, errors = wave.checks
    assert p95.evaluated and not p95.passed and errors.evaluated and errors.passed
    assert 40 < p95.value < 120 and 0 < p95.baseline < 10
    assert p95.limit == pytest.approx(p95.baseline * 1.5)
    assert {d.device_id for d in aborted.moved()} == set(first)

    # Every moved device serves v1 again, told by a signed rollback; the rest never moved.
    back = rig.fleet.wait_until_converged(MODEL, 1, devices=first, timeout=20)
    assert back.devices == len(first)
    assigned = rig.assigned()
    assert all(assigned[d] == (1, True) for d in first)
    assert all(assigned[d] == (1, False) for d in rest)
    assert set(rig.serving().values()) == {1}
    assert all(rig.fleet.devices[d].serving_since[MODEL][0] == 1 for d in rest)
    final = rig.wait(
        "r-1", lambda r: r.counts(r.moved())[DevicePhase.ROLLED_BACK.value] == len(first)
    )
    assert final.state == RolloutState.ABORTED


def test_the_failure_threshold_aborts_the_rollout(make_rig: Callable[..., Rig]) -> None:
    runtime = SimulatedRuntime()
    rig_ids = [f"sim-{i:04d}" for i in range(30)]  # SimFleet's names
    waves = (0.5, 1.0)
    first, rest = wave_members(rig_ids, waves)
    broken = first[:5]  # a third of the first wave fails its smoke test; 20% may
    runtime.set(MODEL, 2, Behaviour(fail_load="golden sample 3 differs"), devices=broken)
    rig = make_rig(30, runtime=runtime)
    assert rig.ids == rig_ids

    rig.start(waves=waves, bake_s=1.0, max_failure=0.2)
    aborted = rig.ended("r-1", RolloutState.ABORTED)
    found = re.match(r"(\d+) of 15 moved devices failed \((\d+\.\d)%, over the 20\.0% allowed\)", aborted.reason)  # fmt: skip
    assert found is not None, aborted.reason
    assert 4 <= int(found[1]) <= 5  # it aborts as soon as the share is over
    assert "golden sample 3 differs (simulated)" in aborted.reason
    assert aborted.waves[1].state == WaveState.PENDING

    # The broken ones never left v1; the others that moved are back on it.
    rig.fleet.wait_until_converged(MODEL, 1, devices=first, timeout=20)
    assert set(rig.serving().values()) == {1}
    assigned = rig.assigned()
    assert all(assigned[d] == (1, True) for d in first)
    assert all(assigned[d] == (1, False) for d in rest)
    assert runtime.refused >= 4


@pytest.mark.parametrize("on_deadline", [DeadlineAction.SKIP, DeadlineAction.FAIL])
def test_a_wave_deadline_with_devices_offline(
    make_rig: Callable[..., Rig], on_deadline: DeadlineAction
) -> None:
    rig = make_rig(30)
    waves = (0.5, 1.0)
    first, rest = wave_members(rig.ids, waves)
    offline = first[:3]  # 20% of the first wave; 10% may fail
    rig.fleet.stop(offline)

    started = time.monotonic()
    rig.start(
        waves=waves, bake_s=0.5, max_failure=0.1, wave_deadline_s=4.0, on_deadline=on_deadline
    )
    online = [d for d in rig.ids if d not in offline]
    if on_deadline == DeadlineAction.SKIP:
        done = rig.ended("r-1", RolloutState.SUCCEEDED)
        assert time.monotonic() - started >= 4.0  # the first wave waited for its deadline
        assert all(w.state == WaveState.PASSED for w in done.waves)
        phases = {d.device_id: d.phase for d in done.devices}
        assert {phases[d] for d in offline} == {DevicePhase.OFFLINE}
        assert {phases[d] for d in online} == {DevicePhase.ACTIVE}
        rig.fleet.wait_until_converged(MODEL, 2, devices=online, timeout=20)
        # Skipped, not forgotten: back online, they converge on v2.
        rig.fleet.start(offline)
        rig.fleet.wait_until_converged(MODEL, 2, devices=offline, timeout=20)
        assert set(rig.serving().values()) == {2}
        assert [(d.version, d.selector) for d in rig.fleet.admin.deployments()] == [(2, LABELS)]
        return

    aborted = rig.ended("r-1", RolloutState.ABORTED)
    assert aborted.reason.startswith(
        "wave 1's deadline passed with 3 device(s) not on v2 (3 offline); "
        "3 of 15 moved devices count as failed, over the 10.0% allowed"
    ), aborted.reason
    assert aborted.waves[1].state == WaveState.PENDING
    rig.fleet.wait_until_converged(MODEL, 1, devices=[d for d in first if d not in offline])
    # Back online, the late ones find the rollback waiting and keep v1 (never loading v2).
    rig.fleet.start(offline)
    time.sleep(1.5)
    assert set(rig.serving().values()) == {1}
    assert not any(rig.runtime.loaded[(d, MODEL, 2)] for d in offline)
    assigned = rig.assigned()
    assert all(assigned[d] == (1, True) for d in first)
    assert all(assigned[d] == (1, False) for d in rest)


def test_pause_resume_then_a_manual_abort_mid_wave(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(30)
    waves = (0.2, 0.6, 1.0)
    first, second, third = wave_members(rig.ids, waves)
    rig.start(waves=waves, bake_s=1.5)
    rig.wait("r-1", lambda r: r.waves[0].state == WaveState.BAKING)
    paused = rig.fleet.admin.pause_rollout("r-1", "a look at the dashboards")
    assert paused.state == RolloutState.PAUSED and paused.reason == "a look at the dashboards"
    time.sleep(2.5)  # longer than the bake: a paused rollout does not move on
    held = rig.fleet.admin.rollout("r-1")
    assert held.state == RolloutState.PAUSED and held.current_wave == 0
    assert [w.state for w in held.waves[1:]] == [WaveState.PENDING] * 2
    assert all(a == (1, False) for d, a in rig.assigned().items() if d not in first)
    with pytest.raises(FailedPrecondition, match="is paused, not running"):
        rig.fleet.admin.pause_rollout("r-1")

    resumed = rig.fleet.admin.resume_rollout("r-1")
    assert resumed.state == RolloutState.RUNNING and resumed.waves[0].bake_until > time.time()
    rig.wait("r-1", lambda r: r.current_wave == 1 and r.waves[1].state == WaveState.BAKING)
    rig.fleet.wait_until_converged(MODEL, 2, devices=first + second, timeout=20)

    aborted = rig.fleet.admin.abort_rollout("r-1", "customer complaint")
    assert aborted.state in (RolloutState.ABORTING, RolloutState.ABORTED)
    assert aborted.reason == "aborted by an operator: customer complaint"
    done = rig.ended("r-1", RolloutState.ABORTED)
    assert [w.state for w in done.waves] == [WaveState.PASSED, WaveState.FAILED, WaveState.PENDING]
    rig.fleet.wait_until_converged(MODEL, 1, devices=first + second, timeout=20)
    assert set(rig.serving().values()) == {1}
    assigned = rig.assigned()
    assert all(assigned[d] == (1, True) for d in first + second)
    assert all(assigned[d] == (1, False) for d in third)
    with pytest.raises(FailedPrecondition, match="already aborted"):
        rig.fleet.admin.abort_rollout("r-1")


def test_the_cloud_killed_in_the_middle_of_a_wave_continues_it(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(40)
    waves = (0.25, 1.0)
    _, second = wave_members(rig.ids, waves)
    late = second[:3]  # hold the second wave open: it waits for these
    rig.fleet.stop(late)
    rig.start(waves=waves, bake_s=0.5, wave_deadline_s=120.0)
    # The second wave is moving: its online devices run v2, three are still to come.
    mid = rig.wait(
        "r-1",
        lambda r: (
            r.current_wave == 1
            and r.waves[1].state == WaveState.MOVING
            and r.counts(r.wave_devices(1))[DevicePhase.ACTIVE.value] == len(second) - len(late)
        ),
    )
    assert mid.state == RolloutState.RUNNING
    rig.cloud.restart(kill=True)  # SIGKILL, then the same data folder and port

    rig.fleet.start(late)
    done = rig.ended("r-1", RolloutState.SUCCEEDED, timeout=40)
    assert [w.state for w in done.waves] == [WaveState.PASSED, WaveState.PASSED]
    assert {d.phase for d in done.devices} == {DevicePhase.ACTIVE}
    rig.fleet.wait_until_converged(MODEL, 2, devices=rig.ids, timeout=20)
    assert set(rig.serving().values()) == {2}
    # Each device loaded v2 once: moving a wave again after the restart did not make anyone
    # load or switch twice.
    assert {rig.runtime.loaded[(d, MODEL, 2)] for d in rig.ids} == {1}
    assert rig.runtime.refused == 0
    assert set(rig.assigned().values()) == {(2, False)}
    assert [(d.version, d.selector) for d in rig.fleet.admin.deployments()] == [(2, LABELS)]


@pytest.mark.parametrize("when", ["after the answer", "during the call"])
def test_the_cloud_killed_at_the_abort_finishes_it_on_restart(
    make_rig: Callable[..., Rig], when: str
) -> None:
    rig = make_rig(40)
    waves = (0.5, 1.0)
    first, rest = wave_members(rig.ids, waves)
    rig.start(waves=waves, bake_s=600.0)
    rig.wait("r-1", lambda r: r.waves[0].state == WaveState.BAKING)
    rig.fleet.wait_until_converged(MODEL, 2, devices=first, timeout=20)

    answers: list[object] = []
    if when == "after the answer":
        answers.append(rig.fleet.admin.abort_rollout("r-1", "bad figures"))
        rig.cloud.kill()
    else:

        def abort() -> None:
            try:
                answers.append(rig.fleet.admin.abort_rollout("r-1", "bad figures"))
            except EdgefleetError as err:  # the kill cut the call: a user would retry
                answers.append(err)

        call = threading.Thread(target=abort)
        call.start()
        time.sleep(0.02)
        rig.cloud.kill()
        call.join(30)
    rig.cloud.restart(kill=True)

    found = rig.fleet.admin.rollout("r-1")
    if found.state == RolloutState.RUNNING:  # the kill came before the abort was written
        assert not isinstance(answers[0], Rollout), answers
        rig.fleet.admin.abort_rollout("r-1", "bad figures")
    done = rig.ended("r-1", RolloutState.ABORTED)
    assert done.reason == "aborted by an operator: bad figures"
    rig.fleet.wait_until_converged(MODEL, 1, devices=first, timeout=20)
    assert set(rig.serving().values()) == {1}
    assigned = rig.assigned()
    assert all(assigned[d] == (1, True) for d in first)
    assert all(assigned[d] == (1, False) for d in rest)
    rig.wait("r-1", lambda r: {d.phase for d in r.moved()} == {DevicePhase.ROLLED_BACK})


def test_a_second_rollout_on_the_same_devices_is_refused_by_the_command(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(20)
    access = rig.cloud.access
    connection = ["--cloud", access.address, "--token-file", str(access.admin_token_file)]
    connection += ["--ca-file", str(access.ca_file)]

    def edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgefleet.cli", *args, *connection],
            capture_output=True,
            text=True,
            timeout=60,
        )

    start = ["rollout", "start", MODEL, "--version", "2", "--selector", "fleet=rollout"]
    start += ["--waves", "50%,100%", "--bake", "10m", "--json"]
    first = edgefleet(*start)
    assert first.returncode == 0, first.stderr
    started = json.loads(first.stdout)
    assert started["rollout_id"] == "r-1" and started["state"] == "running"
    assert [w["size"] for w in started["waves"]] == [10, 10]

    second = edgefleet(*start)
    assert second.returncode != 0 and second.stdout == ""
    assert "rollout r-1 (running) is moving sim-classifier on 20 of these devices" in (
        second.stderr
    ), second.stderr
    assert "already" in second.stderr.lower() or "ALREADY_EXISTS" in second.stderr
    assert [r.rollout_id for r in rig.fleet.admin.rollouts(MODEL)] == ["r-1"]

    rig.wait("r-1", lambda r: r.waves[0].state == WaveState.BAKING)
    shown = edgefleet("rollout", "status", "r-1", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "running" and status["current_wave"] == 0
    assert [w["state"] for w in status["waves"]] == ["baking", "pending"]
    phases = [d["phase"] for d in status["devices"]]
    assert phases.count("active") == 10 and phases.count("pending") == 10
