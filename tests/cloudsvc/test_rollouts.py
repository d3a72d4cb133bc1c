"""Rollouts in waves, stepped by hand with a clock the test moves: devices report as agents
would (ReportedState), telemetry windows arrive through the data store as sync stores them.
What a user checks: which devices moved and when, which version each device is told to run,
the verdict of each gate with its figures, and that nothing moves when a request is wrong.
The same engine runs in the cloud process; tests/fleetsim/test_rollouts_sim.py kills it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloudsvc.errors import Conflict, InvalidRequest, NotReady, UnknownResource
from cloudsvc.fleet import Fleet
from cloudsvc.rollouts import RolloutEngine, RolloutTuning, wave_order
from cloudsvc.store.data import Batch, MemoryDataStore
from edgefleet.core.data import (
    LATENCY_BOUNDS_MS,
    LatencyHistogram,
    ModelWindow,
    TelemetryRecord,
    latency_histogram,
)
from edgefleet.core.fleet import ModelPhase, ModelStatus, ReportedState
from edgefleet.core.rollouts import (
    DeadlineAction,
    DevicePhase,
    Gate,
    RolloutSpec,
    RolloutState,
    WaveState,
    parse_gate,
    parse_waves,
)
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import data_pb2

from .conftest import ENROLL_TOKEN, write_linear_model

MODEL = "clf"


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    fleet: Fleet
    engine: RolloutEngine
    data: MemoryDataStore
    clock: Clock
    devices: list[str]
    seq: dict[str, int] = field(default_factory=dict)

    def report(self, device: str, version: int, phase: ModelPhase = ModelPhase.READY, error: str = "", desired: int = 0) -> None:  # fmt: skip
        generation = self.fleet.desired_state(device).generation
        status = ModelStatus(
            MODEL,
            active_version=version if phase == ModelPhase.READY else 0,
            desired_version=desired or version,
            phase=phase,
            error=error,
        )
        self.fleet.report(ReportedState(device, generation, (status,)))
        self.fleet.touch(device)

    def converge(self, devices: list[str] | None = None) -> None:
        """Every device (of `devices`) runs what it is told, as an agent would."""
        for d in devices if devices is not None else self.devices:
            a = self.fleet.desired_state(d).assignment(MODEL)
            if a is not None:
                self.report(d, a.version)

    def serve(self, device: str, version: int, requests: int, latency_ms: float, errors: int = 0, agreed: int | None = None) -> None:  # fmt: skip
        """A telemetry window of `requests` at `latency_ms`, synced."""
        self.seq[device] = self.seq.get(device, 0) + 1
        counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        bucket = next(
            (i for i, b in enumerate(LATENCY_BOUNDS_MS) if latency_ms <= b), len(counts) - 1
        )
        counts[bucket] = requests
        window = ModelWindow(
            MODEL,
            version,
            start=self.clock.now - 60,
            end=self.clock.now,
            requests=requests,
            errors=errors,
            latency=LatencyHistogram((), tuple(counts), latency_ms * requests),
            # A shadow's window: every request compared with the primary's answer.
            compared=requests if agreed is not None else 0,
            agreed=agreed or 0,
        )
        row = to_proto(TelemetryRecord(self.seq[device], model=window), data_pb2.TelemetryRecord)
        self.data.ingest(Batch(device, "spool", telemetry=[row]))

    def version_of(self, device: str) -> int:
        a = self.fleet.desired_state(device).assignment(MODEL)
        return a.version if a else 0

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.now += seconds
        self.engine.tick()


@pytest.fixture
def rig(fleet: Fleet, tmp_path: Path) -> Iterator[Rig]:
    registry = fleet.registry
    for scale in (1.0, 2.0, 3.0):  # v1, v2, v3
        registry.push(MODEL, write_linear_model(tmp_path / f"m{scale}.onnx", scale=scale))
    devices = [f"d{n:02d}" for n in range(20)]
    for d in devices:
        fleet.enroll(ENROLL_TOKEN, d)
        fleet.label(d, {"site": "plant-1"})
    fleet.enroll(ENROLL_TOKEN, "elsewhere")  # no site label: never part of these rollouts
    fleet.deploy(MODEL, 1)
    data = MemoryDataStore()
    clock = Clock()
    engine = RolloutEngine(fleet, registry.metadata, data, RolloutTuning(min_requests=20), clock)
    r = Rig(fleet, engine, data, clock, devices)
    r.converge()
    yield r
    engine.stop()


def spec(**overrides: object) -> RolloutSpec:
    fields: dict[str, object] = {
        "model": MODEL,
        "version": 2,
        "selector": {"site": "plant-1"},
        "waves": parse_waves("1%,10%,50%,100%"),
        "bake_s": 60.0,
        "max_failure": 0.05,
        "gates": (parse_gate("p95_latency_ms<+20%"), parse_gate("error_rate<0.5%")),
        "wave_deadline_s": 300.0,
    }
    fields.update(overrides)
    return RolloutSpec(**fields)  # type: ignore[arg-type]


def healthy_traffic(rig: Rig, latency_v2: float = 1.2, errors_v2: int = 0) -> None:
    """Every device served v1 at 1.2 ms before; moved ones now serve v2."""
    for d in rig.devices:
        version = rig.version_of(d)
        rig.serve(d, version, 100, latency_v2 if version == 2 else 1.2, errors_v2 if version == 2 else 0)  # fmt: skip


def test_waves_move_the_devices_the_rollout_chose_and_succeed(rig: Rig) -> None:
    healthy_traffic(rig)  # v1's figures on these devices before any moved
    rollout = rig.engine.start_rollout(spec())
    assert [w.size for w in rollout.waves] == [1, 1, 8, 10]  # 1%, 10%, 50%, 100% of 20
    order = [d.device_id for d in rollout.devices]
    assert sorted(order) == rig.devices and "elsewhere" not in order
    first = order[0]
    assert rig.version_of(first) == 2
    assert all(rig.version_of(d) == 1 for d in order[1:])  # nothing else moved yet
    assert all(d.previous_version == 1 for d in rollout.devices)
    for wave in range(4):
        rig.converge()
        rig.tick()
        assert rig.engine.get(rollout.rollout_id).waves[wave].state == WaveState.BAKING
        healthy_traffic(rig)
        rig.tick(61)
    done = rig.engine.get(rollout.rollout_id)
    assert done.state == RolloutState.SUCCEEDED, done.reason
    assert all(rig.version_of(d) == 2 for d in rig.devices)
    assert rig.version_of("elsewhere") == 1
    checks = done.waves[-1].checks
    assert [c.gate for c in checks] == ["p95_latency_ms<+20%", "error_rate<0.5%"]
    assert all(c.evaluated and c.passed for c in checks)
    # v2 is now what the selector runs, for devices that enroll later too.
    assert any(
        d.model == MODEL and d.version == 2 and dict(d.selector) == {"site": "plant-1"}
        for d in rig.fleet.deployments()
    )
    # The same rollout id orders devices the same way (a restart picks the same ones).
    again = sorted(rig.devices, key=lambda d: wave_order(rollout.rollout_id, d))
    assert again == order


def test_a_breached_gate_aborts_and_every_moved_device_goes_back(rig: Rig) -> None:
    healthy_traffic(rig)
    rollout = rig.engine.start_rollout(spec(waves=(0.25, 0.5, 1.0)))
    rig.converge()
    rig.tick()
    healthy_traffic(rig)
    rig.tick(61)  # wave 1 passes with healthy figures
    assert rig.engine.get(rollout.rollout_id).current_wave == 1
    rig.converge()
    rig.tick()
    healthy_traffic(rig, latency_v2=4.0)  # v2 is now slower than v1 by far
    rig.tick(61)
    aborted = rig.engine.get(rollout.rollout_id)
    assert aborted.state == RolloutState.ABORTED
    assert "p95_latency_ms<+20% breached" in aborted.reason and "previous version" in aborted.reason
    breached = next(c for c in aborted.waves[1].checks if c.gate.startswith("p95"))
    assert breached.evaluated and not breached.passed and breached.value > breached.limit
    assert breached.limit == pytest.approx(breached.baseline * 1.2)
    moved = [d.device_id for d in aborted.moved()]
    assert len(moved) == 10
    for d in rig.devices:
        assignment = rig.fleet.desired_state(d).assignment(MODEL)
        assert assignment is not None and assignment.version == 1
        # Devices that ran v2 go back only as a signed operator's rollback.
        assert assignment.rollback == (d in moved)
    rig.converge()
    after = rig.engine.get(rollout.rollout_id)
    assert after.counts(after.moved())["rolled back"] == 10
    assert aborted.waves[2].state == WaveState.PENDING  # never started


def test_failed_installs_over_the_threshold_abort(rig: Rig) -> None:
    rollout = rig.engine.start_rollout(spec(waves=(0.5, 1.0), max_failure=0.1))
    moved = [d.device_id for d in rollout.moved()]
    for d in moved[:8]:
        rig.report(d, 2)
    rig.report(moved[8], 1, ModelPhase.FAILED, "smoke test failed: NaN in output", desired=2)
    rig.tick()
    assert rig.engine.get(rollout.rollout_id).state == RolloutState.RUNNING  # 1 of 10: 10%
    rig.report(moved[9], 1, ModelPhase.FAILED, "out of memory", desired=2)
    rig.tick()
    aborted = rig.engine.get(rollout.rollout_id)
    assert aborted.state == RolloutState.ABORTED
    assert "2 of 10 moved devices failed (20.0%, over the 10.0% allowed)" in aborted.reason
    assert "NaN in output" in aborted.reason
    assert all(rig.version_of(d) == 1 for d in rig.devices)


@pytest.mark.parametrize("action", [DeadlineAction.SKIP, DeadlineAction.FAIL])
def test_offline_devices_at_the_deadline(rig: Rig, action: DeadlineAction) -> None:
    rig.fleet.offline_after_s = 30
    rollout = rig.engine.start_rollout(
        spec(waves=(0.5, 1.0), on_deadline=action, max_failure=0.05, gates=(), bake_s=0)
    )
    moved = [d.device_id for d in rollout.moved()]
    rig.converge(moved[:9])  # moved[9] never answers: it went offline
    rig.fleet.metadata.touch_device(moved[9], time.time() - 3600)  # the fleet's own clock
    rig.tick()
    status = rig.engine.get(rollout.rollout_id)
    assert status.waves[0].state == WaveState.MOVING
    assert status.counts(status.moved())["offline"] == 1
    rig.tick(301)  # past the deadline
    after = rig.engine.get(rollout.rollout_id)
    if action == DeadlineAction.SKIP:
        assert after.state == RolloutState.RUNNING and after.current_wave == 1
        assert rig.version_of(moved[9]) == 2  # still told: it converges when it is back
    else:
        assert after.state == RolloutState.ABORTED
        assert "deadline passed with 1 device(s) not on v2 (1 offline)" in after.reason
        assert rig.version_of(moved[0]) == 1


def test_a_gate_without_enough_data_pauses_and_says_why(rig: Rig) -> None:
    rollout = rig.engine.start_rollout(spec(waves=(1.0,), gates=(parse_gate("error_rate<1%"),)))
    rig.converge()
    rig.tick()
    rig.serve(rig.devices[0], 2, 5, 1.0)  # 5 requests: too few to judge
    rig.tick(61)
    paused = rig.engine.get(rollout.rollout_id)
    assert paused.state == RolloutState.PAUSED
    assert "5 requests of the new version" in paused.reason and "at least 20" in paused.reason
    rig.engine.resume(rollout.rollout_id)
    healthy_traffic(rig)
    rig.tick(61)
    assert rig.engine.get(rollout.rollout_id).state == RolloutState.SUCCEEDED


def test_operator_pause_resume_and_abort(rig: Rig) -> None:
    rollout = rig.engine.start_rollout(spec(waves=(0.5, 1.0)))
    paused = rig.engine.pause(rollout.rollout_id, "night shift")
    assert paused.state == RolloutState.PAUSED and paused.reason == "night shift"
    rig.converge()
    rig.tick(3600)  # nothing happens while paused
    assert rig.engine.get(rollout.rollout_id).waves[0].state == WaveState.MOVING
    rig.engine.resume(rollout.rollout_id)
    aborted = rig.engine.abort(rollout.rollout_id, "customer complaint")
    assert aborted.state == RolloutState.ABORTED
    assert aborted.reason == "aborted by an operator: customer complaint"
    assert all(rig.version_of(d) == 1 for d in rig.devices)
    with pytest.raises(NotReady, match="already aborted"):
        rig.engine.abort(rollout.rollout_id)
    with pytest.raises(UnknownResource):
        rig.engine.get("r-99")


def test_bad_requests_move_nothing(rig: Rig) -> None:
    before = {d: rig.fleet.desired_state(d).generation for d in rig.devices}
    bad: list[tuple[RolloutSpec, type[Exception], str]] = [
        (spec(waves=(0.5, 0.2, 1.0)), InvalidRequest, "must grow"),
        (spec(waves=(0.5,)), InvalidRequest, "last wave must be 100%"),
        (spec(gates=(Gate("p42_latency", "<", 1.0),)), InvalidRequest, "no metric"),
        (spec(max_failure=1.5), InvalidRequest, "max failure"),
        (spec(version=9), UnknownResource, "no version 9"),
        (spec(selector={"site": "nowhere"}), NotReady, "no device matches"),
        (spec(target="tensorrt-fp16"), NotReady, r"artifacts \(onnx-cpu-fp32\) runs on"),
    ]
    for wrong, error, message in bad:
        with pytest.raises(error, match=message):
            rig.engine.start_rollout(wrong)
    for text in ("p95<1", "error_rate<150%", "p95_latency_ms<+20", "agreement>=2"):
        with pytest.raises(ValueError):
            parse_gate(text)
    assert rig.engine.list() == []
    assert {d: rig.fleet.desired_state(d).generation for d in rig.devices} == before


def test_two_rollouts_never_claim_the_same_devices(rig: Rig) -> None:
    first = rig.engine.start_rollout(spec(waves=(0.5, 1.0)))
    with pytest.raises(Conflict, match=f"rollout {first.rollout_id}"):
        rig.engine.start_rollout(spec(version=3))
    with pytest.raises(Conflict, match="is moving clf"):
        rig.fleet.deploy(MODEL, 3, {"site": "plant-1"})
    rig.engine.abort(first.rollout_id)
    assert rig.engine.start_rollout(spec(version=3)).state == RolloutState.RUNNING


def test_a_new_engine_continues_a_rollout_and_finishes_an_abort(rig: Rig) -> None:
    """The cloud restarted: the state in the store is all there is."""
    rollout = rig.engine.start_rollout(spec(waves=(0.5, 1.0), gates=()))
    rig.converge()
    rig.tick()
    restarted = RolloutEngine(rig.fleet, rig.fleet.metadata, rig.data, clock=rig.clock)
    rig.clock.now += 61
    restarted.tick()
    status = restarted.get(rollout.rollout_id)
    assert status.current_wave == 1 and status.waves[1].state == WaveState.MOVING
    assert all(rig.version_of(d) == 2 for d in rig.devices)
    # Killed just after recording the abort, before any device was sent back.
    rig.fleet.metadata.put_rollout(
        status.__class__(**{**status.__dict__, "state": RolloutState.ABORTING, "reason": "r"})
    )
    again = RolloutEngine(rig.fleet, rig.fleet.metadata, rig.data, clock=rig.clock)
    again.tick()
    assert again.get(rollout.rollout_id).state == RolloutState.ABORTED
    assert all(rig.version_of(d) == 1 for d in rig.devices)


def test_a_model_new_to_the_devices_is_taken_off_on_abort(rig: Rig, tmp_path: Path) -> None:
    rig.fleet.registry.push("fresh", write_linear_model(tmp_path / "fresh.onnx"))
    rollout = rig.engine.start_rollout(
        RolloutSpec("fresh", 1, {"site": "plant-1"}, (1.0,), 0.0, 0.05)
    )
    assert all(d.previous_version == 0 for d in rollout.devices)
    assert rig.fleet.desired_state(rig.devices[0]).assignment("fresh") is not None
    rig.engine.abort(rollout.rollout_id)
    assert all(rig.fleet.desired_state(d).assignment("fresh") is None for d in rig.devices)
    assert rig.version_of(rig.devices[0]) == 1  # its other model untouched


def test_an_agreement_gate_reads_the_shadows_figures(rig: Rig) -> None:
    """v2 runs as a shadow beside v1 before the rollout; the gate judges its agreement."""
    rollout = rig.engine.start_rollout(
        spec(waves=(1.0,), gates=(parse_gate("agreement>=0.97"),), bake_s=60.0)
    )
    # Moved devices answer with v2 and run v1, what they ran, as its shadow.
    assignment = rig.fleet.desired_state(rig.devices[0]).assignment(MODEL)
    assert assignment is not None and assignment.version == 2
    assert [(v.version, v.shadow) for v in assignment.variants] == [(1, True)]
    rig.converge()
    rig.tick()
    for d in rig.devices[:10]:
        rig.serve(d, 2, 100, 1.0, agreed=90)  # 90% agreement
    rig.tick(61)
    aborted = rig.engine.get(rollout.rollout_id)
    assert aborted.state == RolloutState.ABORTED
    (check,) = aborted.waves[0].checks
    assert check.evaluated and not check.passed and check.value == pytest.approx(0.9)
    assert "agreement>=0.97 breached: 0.9 against a limit of 0.97" in aborted.reason
    back = rig.fleet.desired_state(rig.devices[0]).assignment(MODEL)
    assert back is not None and back.version == 1 and not back.variants


def test_agreeing_versions_pass_and_the_shadows_go(rig: Rig) -> None:
    rollout = rig.engine.start_rollout(
        spec(waves=(1.0,), gates=(parse_gate("agreement>=0.97"),), bake_s=60.0)
    )
    rig.converge()
    rig.tick()
    for d in rig.devices:
        rig.serve(d, 2, 100, 1.0, agreed=100)
    rig.tick(61)
    assert rig.engine.get(rollout.rollout_id).state == RolloutState.SUCCEEDED
    for d in rig.devices:
        a = rig.fleet.desired_state(d).assignment(MODEL)
        assert a is not None and a.version == 2 and not a.variants


def test_what_the_fleet_refuses_mid_rollout_pauses_it_with_the_reason(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout = rig.engine.start_rollout(spec(waves=(0.5, 1.0), gates=(), bake_s=0))
    rig.converge()

    def refuse(*args: object, **kwargs: object) -> dict[str, int]:
        raise NotReady("none of clf v2's artifacts (onnx-cpu-fp32) runs on d07")

    monkeypatch.setattr(rig.fleet, "move", refuse)
    rig.tick()  # wave 1 passes; moving wave 2 is refused
    paused = rig.engine.get(rollout.rollout_id)
    assert paused.state == RolloutState.PAUSED
    assert "runs on d07" in paused.reason and "rollout resume" in paused.reason
    monkeypatch.undo()
    rig.engine.resume(rollout.rollout_id)
    rig.tick()
    rig.converge()
    rig.tick()
    assert rig.engine.get(rollout.rollout_id).state == RolloutState.SUCCEEDED


def test_latency_histogram_helper_matches_the_agent() -> None:
    """The rig's windows put requests in the bucket the recorder would."""
    histogram = latency_histogram([1.2] * 10)
    assert histogram.count == 10 and histogram.quantile(0.95) <= 1.5
    assert DevicePhase.ACTIVE.value == "active"
