"""Rollouts: a version moved across a fleet in waves, each gated on what the moved devices
report, with abort sending every moved device back to what it ran through the signed
rollback.

The state lives in the metadata store and every step is written before it acts, so a cloud
killed at any moment continues where it was when it restarts: a wave that was being moved is
moved again (an assignment already made is made once more, harmlessly), an abort that was
under way finishes. Devices are ordered once, at the start, by a hash of the rollout id and
the device id: a restart picks the same devices for each wave.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from cloudsvc.errors import CloudError, Conflict, InvalidRequest, NotReady, UnknownResource
from cloudsvc.fleet import Fleet
from cloudsvc.store.data import DataStore
from cloudsvc.store.metadata import MetadataStore
from cloudsvc.telemetry import aggregate
from edgefleet.core.data import TelemetryRecord, VersionTelemetry
from edgefleet.core.fleet import Deployment, Device, ModelPhase
from edgefleet.core.rollouts import (
    GATE_METRICS,
    DeadlineAction,
    DevicePhase,
    Gate,
    GateCheck,
    Rollout,
    RolloutDevice,
    RolloutSpec,
    RolloutState,
    Wave,
    WaveState,
    check_waves,
)

log = logging.getLogger(__name__)

MAX_GATES = 16
# What the engine steps each tick, and what holds devices against other rollouts and deploys.
STEPPED = (RolloutState.RUNNING, RolloutState.ABORTING)
UNFINISHED = (*STEPPED, RolloutState.PAUSED)


@dataclass(frozen=True)
class RolloutTuning:
    """How the engine runs (the cloud's `[rollouts]` settings)."""

    tick_s: float = 1.0
    # Fewer requests than this on either side and a gate cannot judge: the rollout pauses.
    min_requests: int = 20
    # How far back the previous version's figures on the same devices are taken from.
    baseline_lookback_s: float = 3600.0


def wave_order(rollout_id: str, device_id: str) -> str:
    """Where a device stands in a rollout's fixed order (its waves take the lowest first)."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()


def figures(version: VersionTelemetry | None) -> dict[str, float | None]:
    """What gates read of a version's merged telemetry (None: no figure)."""
    if version is None or not version.requests:
        return dict.fromkeys(
            ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "error_rate", "agreement")
        )
    return {
        "p50_latency_ms": version.p50_ms,
        "p95_latency_ms": version.p95_ms,
        "p99_latency_ms": version.p99_ms,
        "error_rate": version.errors / version.requests,
        "agreement": version.agreement,
    }


def _merged(records: Iterable[TelemetryRecord]) -> VersionTelemetry | None:
    """Windows of possibly several versions, merged as one."""
    relabelled = [
        replace(r, model=replace(r.model, version=0)) for r in records if r.model is not None
    ]
    found = aggregate(relabelled)
    return found[0] if found else None


def check_gates(
    gates: Sequence[Gate],
    new: VersionTelemetry | None,
    old: VersionTelemetry | None,
    min_requests: int,
) -> tuple[GateCheck, ...]:
    """Each gate on the new version's figures (and the previous version's, for relative
    gates); not evaluated, with the reason, where there is too little to judge."""
    now, before = figures(new), figures(old)
    new_requests = new.requests if new is not None else 0
    old_requests = old.requests if old is not None else 0
    checks = []
    for gate in gates:
        value, baseline = now[gate.metric], before[gate.metric]
        if new_requests < min_requests or value is None:
            checks.append(
                GateCheck(
                    gate.text,
                    detail=f"{new_requests} requests of the new version on the moved devices "
                    f"(at least {min_requests} are needed)"
                    if new_requests < min_requests
                    else f"no {gate.metric} figure reported (for agreement: a shadow version)",
                )
            )
            continue
        if gate.relative and (old_requests < min_requests or baseline is None):
            checks.append(
                GateCheck(
                    gate.text,
                    value=value,
                    detail=f"{old_requests} requests of the previous version on the same "
                    f"devices to compare with (at least {min_requests} are needed)",
                )
            )
            continue
        limit = gate.limit(baseline)
        assert limit is not None
        checks.append(
            GateCheck(
                gate.text,
                value=value,
                baseline=baseline or 0.0,
                limit=limit,
                passed=gate.holds(value, limit),
                evaluated=True,
            )
        )
    return tuple(checks)


def describe(check: GateCheck) -> str:
    if not check.evaluated:
        return f"{check.gate}: not judged ({check.detail})"
    verdict = "held" if check.passed else "breached"
    base = f", previous version {check.baseline:.4g}" if check.baseline else ""
    return f"{check.gate} {verdict}: {check.value:.4g} against a limit of {check.limit:.4g}{base}"


class RolloutEngine:
    """Starts, steps and stops rollouts; a thread steps the running ones every tick."""

    def __init__(
        self,
        fleet: Fleet,
        metadata: MetadataStore,
        data: DataStore,
        tuning: RolloutTuning | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.metadata = metadata
        self.data = data
        self.tuning = tuning or RolloutTuning()
        self.clock = clock
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        fleet.claims = self.claimed

    # operator actions --------------------------------------------------------------------
    def start_rollout(self, spec: RolloutSpec) -> Rollout:
        """Check everything, then record the rollout and move its first wave."""
        self._check_spec(spec)
        record = self.fleet.registry.get_version(spec.model, spec.version)
        with self._lock:
            devices = [
                d
                for d in self.fleet.devices(spec.selector)
                if not _revoked(self.metadata, d.device_id)
            ]
            if not devices:
                raise NotReady(self.fleet.no_match_message(spec.selector))
            # Every device must have an artifact it runs, and none may be ahead: both said
            # now, before anything moves.
            for d in devices:
                self.fleet.assignment_for(record, d.device_id, spec.target)
                current = d.desired.assignment(spec.model)
                if current is not None and current.version > spec.version:
                    raise NotReady(
                        f"{d.device_id} is assigned {spec.model} v{current.version}, above "
                        f"v{spec.version}: going back is `edgefleet rollback`, not a rollout"
                    )
            ids = {d.device_id for d in devices}
            busy = self.claimed(spec.model, ids)
            if busy:
                raise Conflict(busy)
            rollout_id = f"r-{self.metadata.count_rollouts() + 1}"
            ordered = sorted(devices, key=lambda d: wave_order(rollout_id, d.device_id))
            # Cumulative shares to device counts; a wave that would hold nobody (a small
            # fleet's 1%) is folded into the next, the first holds at least one device.
            members: list[RolloutDevice] = []
            waves: list[Wave] = []
            low = 0
            for share in spec.waves:
                high = min(len(ordered), max(1, math.ceil(share * len(ordered) - 1e-9)))
                if high <= low:
                    continue
                for d in ordered[low:high]:
                    current = d.desired.assignment(spec.model)
                    members.append(
                        RolloutDevice(d.device_id, len(waves), current.version if current else 0)
                    )
                waves.append(Wave(len(waves), share, high - low))
                low = high
            now = self.clock()
            rollout = Rollout(
                rollout_id,
                spec,
                RolloutState.RUNNING,
                now,
                now,
                0,
                tuple(waves),
                tuple(members),
            )
            self.metadata.put_rollout(rollout)
            log.info(
                "rollout %s: %s v%d to %d devices in %d waves",
                rollout_id,
                spec.model,
                spec.version,
                len(members),
                len(waves),
            )
            return self._step(rollout)

    def get(self, rollout_id: str) -> Rollout:
        rollout = self.metadata.get_rollout(rollout_id)
        if rollout is None:
            raise UnknownResource(f"no rollout {rollout_id[:40]!r}; see `edgefleet rollout list`")
        # What devices report moves between ticks: show it as it is now.
        return replace(rollout, devices=self._phases(rollout))

    def list(self, model: str = "") -> list[Rollout]:
        return self.metadata.list_rollouts(model)

    def pause(self, rollout_id: str, reason: str = "") -> Rollout:
        with self._lock:
            rollout = self.get(rollout_id)
            if rollout.state != RolloutState.RUNNING:
                raise NotReady(f"rollout {rollout_id} is {rollout.state.value}, not running")
            return self._save(
                replace(
                    rollout, state=RolloutState.PAUSED, reason=reason or "paused by an operator"
                )
            )

    def resume(self, rollout_id: str, reason: str = "") -> Rollout:
        """Running again: a wave waiting for its devices gets a fresh deadline, a baking
        wave bakes again from now (its gates are judged on what comes after)."""
        with self._lock:
            rollout = self.get(rollout_id)
            if rollout.state != RolloutState.PAUSED:
                raise NotReady(f"rollout {rollout_id} is {rollout.state.value}, not paused")
            now = self.clock()
            wave = rollout.waves[rollout.current_wave]
            if wave.state == WaveState.MOVING:
                wave = replace(wave, deadline_at=now + rollout.spec.wave_deadline_s)
            elif wave.state == WaveState.BAKING:
                wave = replace(wave, bake_until=now + rollout.spec.bake_s)
            rollout = replace(
                _with_wave(rollout, wave),
                state=RolloutState.RUNNING,
                reason=reason or "resumed by an operator",
            )
            self._save(rollout)
        self._wake.set()
        return rollout

    def abort(self, rollout_id: str, reason: str = "") -> Rollout:
        with self._lock:
            rollout = self.get(rollout_id)
            if rollout.state.finished:
                raise NotReady(
                    f"rollout {rollout_id} already {rollout.state.value}; to move devices back "
                    f"now use `edgefleet rollback {rollout.spec.model} --to N`"
                )
            if rollout.state == RolloutState.ABORTING:
                return rollout
            return self._abort(rollout, f"aborted by an operator: {reason or 'no reason given'}")

    def claimed(self, model: str, device_ids: Iterable[str]) -> str:
        """Why these devices of `model` are not free ("" when they are): a rollout that
        is not finished holds its devices."""
        wanted = set(device_ids)
        for r in self.metadata.list_rollouts(model, UNFINISHED):
            overlap = wanted & {d.device_id for d in r.devices}
            if overlap:
                return (
                    f"rollout {r.rollout_id} ({r.state.value}) is moving {model} on "
                    f"{len(overlap)} of these devices (e.g. {sorted(overlap)[0]}); abort it "
                    "or wait for it to finish"
                )
        return ""

    # the loop ----------------------------------------------------------------------------
    def start(self) -> RolloutEngine:
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tuning.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.tick()

    def tick(self) -> None:
        """Step every rollout that is running or aborting."""
        for rollout in self.metadata.list_rollouts(states=STEPPED):
            try:
                with self._lock:
                    current = self.metadata.get_rollout(rollout.rollout_id)
                    if current is not None:
                        try:
                            self._step(current)
                        except CloudError as err:
                            # What the fleet refuses now (a device whose hardware no artifact
                            # fits any more, ...) needs a person: say so, stop retrying.
                            self._hold(current, err)
            except Exception:
                log.exception("rollout %s: a step failed; trying again", rollout.rollout_id)

    def _hold(self, rollout: Rollout, err: CloudError) -> None:
        if rollout.state == RolloutState.RUNNING:
            log.warning("rollout %s paused: %s", rollout.rollout_id, err.message)
            self._save(
                replace(
                    rollout,
                    state=RolloutState.PAUSED,
                    reason=f"paused: {err.message} (fix it, then `edgefleet rollout resume`, "
                    "or abort)",
                )
            )
        else:  # aborting: sending devices back must not stop; it is tried again next tick
            log.warning("rollout %s: sending devices back failed: %s", rollout.rollout_id, err)

    # steps -------------------------------------------------------------------------------
    def _step(self, rollout: Rollout) -> Rollout:
        if rollout.state == RolloutState.ABORTING:
            return self._send_back(rollout)
        if rollout.state != RolloutState.RUNNING:
            return rollout
        spec = rollout.spec
        now = self.clock()
        wave = rollout.waves[rollout.current_wave]
        if wave.state == WaveState.PENDING:
            # Written first: a crash after it moves the same devices again on restart.
            wave = replace(
                wave,
                state=WaveState.MOVING,
                started_at=now,
                deadline_at=now + spec.wave_deadline_s,
            )
            rollout = self._save(_with_wave(rollout, wave))
        if wave.state == WaveState.MOVING:
            self._move(rollout, wave)
        devices = self._phases(rollout)
        rollout = replace(rollout, devices=devices)
        moved = rollout.moved()
        failed = [d for d in moved if d.phase == DevicePhase.FAILED]
        if moved and len(failed) / len(moved) > spec.max_failure:
            return self._abort(
                rollout,
                f"{len(failed)} of {len(moved)} moved devices failed "
                f"({len(failed) / len(moved):.1%}, over the {spec.max_failure:.1%} allowed): "
                + "; ".join(f"{d.device_id}: {d.error or 'failed'}" for d in failed[:3]),
            )
        if wave.state == WaveState.MOVING:
            members = rollout.wave_devices(wave.index)
            waiting = [
                d
                for d in members
                if d.phase in (DevicePhase.PENDING, DevicePhase.DOWNLOADING, DevicePhase.OFFLINE)
            ]
            if waiting and now >= wave.deadline_at:
                if spec.on_deadline == DeadlineAction.FAIL:
                    late = {d.device_id for d in waiting}
                    devices = tuple(
                        replace(d, phase=DevicePhase.FAILED, error="missed the wave's deadline")
                        if d.device_id in late
                        else d
                        for d in rollout.devices
                    )
                    rollout = replace(rollout, devices=devices)
                    moved = rollout.moved()
                    failed = [d for d in moved if d.phase == DevicePhase.FAILED]
                    if len(failed) / len(moved) > spec.max_failure:
                        return self._abort(
                            rollout,
                            f"wave {wave.index + 1}'s deadline passed with {len(waiting)} "
                            f"device(s) not on v{spec.version} "
                            f"({sum(d.phase == DevicePhase.OFFLINE for d in waiting)} offline); "
                            f"{len(failed)} of {len(moved)} moved devices count as failed, "
                            f"over the {spec.max_failure:.1%} allowed",
                        )
                waiting = []
            if not waiting:
                wave = replace(
                    wave, state=WaveState.BAKING, reported_at=now, bake_until=now + spec.bake_s
                )
                rollout = self._save(_with_wave(rollout, wave))
        if wave.state == WaveState.BAKING and now >= wave.bake_until:
            checks = self._checks(rollout)
            wave = replace(wave, checks=checks)
            breached = [c for c in checks if c.evaluated and not c.passed]
            if breached:
                return self._abort(
                    _with_wave(rollout, replace(wave, state=WaveState.FAILED, finished_at=now)),
                    "gate breached: " + "; ".join(describe(c) for c in breached),
                )
            unjudged = [c for c in checks if not c.evaluated]
            if unjudged:
                return self._save(
                    replace(
                        _with_wave(rollout, wave),
                        state=RolloutState.PAUSED,
                        reason="paused: a gate could not be judged: "
                        + "; ".join(describe(c) for c in unjudged)
                        + " (send traffic, then `edgefleet rollout resume`, or abort)",
                    )
                )
            wave = replace(wave, state=WaveState.PASSED, finished_at=now)
            rollout = _with_wave(rollout, wave)
            if wave.index + 1 == len(rollout.waves):
                return self._succeed(rollout)
            rollout = self._save(replace(rollout, current_wave=wave.index + 1))
            log.info(
                "rollout %s: wave %d of %d passed%s",
                rollout.rollout_id,
                wave.index + 1,
                len(rollout.waves),
                "".join(f"; {describe(c)}" for c in checks),
            )
            return self._step(rollout)
        return self._save(rollout) if devices != rollout.devices else rollout

    def _move(self, rollout: Rollout, wave: Wave) -> None:
        """Tell the wave's devices to run the version (those not told yet). With an
        agreement gate, the version each ran before shadows the new one, so that every
        request is answered by both and compared."""
        spec = rollout.spec
        todo, shadows = {}, {}
        for d in rollout.wave_devices(wave.index):
            desired = self.fleet.desired_state(d.device_id).assignment(spec.model)
            if desired is None or desired.version != spec.version:
                todo[d.device_id] = spec.version
                if _judges_agreement(spec) and d.previous_version:
                    shadows[d.device_id] = d.previous_version
        if todo:
            self.fleet.move(spec.model, todo, target=spec.target, shadows=shadows)

    def _succeed(self, rollout: Rollout) -> Rollout:
        spec = rollout.spec
        now = self.clock()
        if _judges_agreement(spec):
            # The previous versions' shadows were there to be compared: they go now.
            shadowed = [
                d.device_id
                for d in rollout.devices
                if (a := self.fleet.desired_state(d.device_id).assignment(spec.model)) is not None
                and a.version == spec.version
                and a.variants
            ]
            if shadowed:
                self.fleet.move(
                    spec.model, dict.fromkeys(shadowed, spec.version), target=spec.target
                )
        # Devices enrolled later get the version too, as after a deploy.
        self.metadata.assign(
            {}, Deployment(spec.model, dict(spec.selector), spec.version, spec.target, now)
        )
        log.info("rollout %s succeeded: %s v%d", rollout.rollout_id, spec.model, spec.version)
        return self._save(
            replace(
                rollout,
                state=RolloutState.SUCCEEDED,
                reason=f"every wave passed; {spec.model} v{spec.version} is the standing "
                "deployment of the selector",
            )
        )

    def _abort(self, rollout: Rollout, reason: str) -> Rollout:
        log.warning("rollout %s aborting: %s", rollout.rollout_id, reason)
        wave = rollout.waves[rollout.current_wave]
        if wave.state not in (WaveState.PASSED, WaveState.FAILED, WaveState.PENDING):
            rollout = _with_wave(
                rollout, replace(wave, state=WaveState.FAILED, finished_at=self.clock())
            )
        rollout = self._save(replace(rollout, state=RolloutState.ABORTING, reason=reason))
        return self._send_back(rollout)

    def _send_back(self, rollout: Rollout) -> Rollout:
        """Every moved device back to what it ran, as a signed rollback (or the model taken
        off where it was new); then aborted."""
        spec = rollout.spec
        back = {}
        for d in rollout.moved():
            if _revoked(self.metadata, d.device_id):
                continue
            desired = self.fleet.desired_state(d.device_id).assignment(spec.model)
            # Only what this rollout put there: a device moved elsewhere since keeps it.
            if desired is not None and desired.version == spec.version:
                back[d.device_id] = d.previous_version
        if back:
            self.fleet.move(spec.model, back, target="", rollback=True)
        rollout = replace(rollout, state=RolloutState.ABORTED)
        rollout = replace(rollout, devices=self._phases(rollout))
        log.warning(
            "rollout %s aborted: %d device(s) sent back (%s)",
            rollout.rollout_id,
            len(back),
            rollout.reason,
        )
        return self._save(rollout)

    # reading the fleet -------------------------------------------------------------------
    def _phases(self, rollout: Rollout) -> tuple[RolloutDevice, ...]:
        spec = rollout.spec
        started = {w.index for w in rollout.waves if w.state != WaveState.PENDING}
        if not started:
            return rollout.devices
        views = {d.device_id: d for d in self.fleet.devices()}
        back = rollout.state in (RolloutState.ABORTING, RolloutState.ABORTED)
        found = []
        for d in rollout.devices:
            view = views.get(d.device_id)
            if d.wave not in started or view is None:
                found.append(d)
                continue
            phase, error = _phase(view, spec.model, spec.version, d, back)
            found.append(replace(d, phase=phase, error=error))
        return tuple(found)

    def _checks(self, rollout: Rollout) -> tuple[GateCheck, ...]:
        spec = rollout.spec
        if not spec.gates:
            return ()
        active = {d.device_id: d for d in rollout.moved() if d.phase == DevicePhase.ACTIVE}
        since = rollout.created_at - self.tuning.baseline_lookback_s
        records = self.data.telemetry(spec.model, since=since, devices=set(active))
        fresh = [r for r in records if r.model is not None and r.model.end >= rollout.created_at]
        new = [r for r in fresh if r.model is not None and r.model.version == spec.version]
        old = [
            r
            for r in records
            if r.model is not None
            and r.model.version == active[r.device_id].previous_version
            and r.model.version != spec.version
            and not r.model.compared  # the previous version's own serving, not its shadowing
        ]
        # Agreement between the new version and the old one, whichever of the two shadowed
        # the other: comparisons are symmetric.
        compared = agreed = 0
        for r in fresh:
            w = r.model
            assert w is not None
            if w.compared and spec.version in (w.version, w.compared_with):
                compared += w.compared
                agreed += w.agreed
        merged = _merged(new)
        if merged is not None:
            merged = replace(merged, compared=compared, agreed=agreed)
        return check_gates(spec.gates, merged, _merged(old), self.tuning.min_requests)

    def _check_spec(self, spec: RolloutSpec) -> None:
        try:
            check_waves(list(spec.waves))
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        if spec.version < 1:
            raise InvalidRequest("a rollout needs the version to move to (--version N)")
        if not 0 <= spec.max_failure <= 1 or not math.isfinite(spec.max_failure):
            raise InvalidRequest("max failure is a share between 0% and 100%")
        if not 0 <= spec.bake_s <= 30 * 86_400 or not 0 < spec.wave_deadline_s <= 30 * 86_400:
            raise InvalidRequest(
                "bake is 0 to 30 days and a wave's deadline above 0, up to 30 days"
            )
        if spec.on_deadline not in (DeadlineAction.FAIL, DeadlineAction.SKIP):
            raise InvalidRequest("at a wave's deadline, late devices either fail or are skipped")
        if len(spec.gates) > MAX_GATES:
            raise InvalidRequest(f"at most {MAX_GATES} gates")
        for gate in spec.gates:
            if gate.metric not in GATE_METRICS:
                raise InvalidRequest(
                    f"no metric {gate.metric[:40]!r}; gates may name {', '.join(GATE_METRICS)}"
                )
            if gate.op not in ("<", "<=", ">", ">=") or not math.isfinite(gate.value):
                raise InvalidRequest(f"gate {gate.metric}: the operator is <, <=, > or >=")
        self.fleet.registry.get_version(spec.model, spec.version)  # UnknownResource if none

    def _save(self, rollout: Rollout) -> Rollout:
        rollout = replace(rollout, updated_at=self.clock())
        self.metadata.put_rollout(rollout)
        return rollout


def _judges_agreement(spec: RolloutSpec) -> bool:
    return any(g.metric == "agreement" for g in spec.gates)


def _with_wave(rollout: Rollout, wave: Wave) -> Rollout:
    waves = list(rollout.waves)
    waves[wave.index] = wave
    return replace(rollout, waves=tuple(waves))


def _revoked(metadata: MetadataStore, device_id: str) -> bool:
    record = metadata.get_device(device_id)
    return record is None or record.revoked


def _phase(
    view: Device, model: str, version: int, member: RolloutDevice, back: bool
) -> tuple[DevicePhase, str]:
    running = view.running(model)
    status = view.reported.model(model) if view.reported else None
    if back:
        if running == member.previous_version:
            return DevicePhase.ROLLED_BACK, ""
        wanted = member.previous_version
    else:
        if running == version:
            return DevicePhase.ACTIVE, ""
        if member.phase == DevicePhase.FAILED and member.error == "missed the wave's deadline":
            return member.phase, member.error
        wanted = version
    if status is not None and status.desired_version == wanted:
        if status.phase == ModelPhase.FAILED:
            return DevicePhase.FAILED, status.error
        if status.phase in (ModelPhase.DOWNLOADING, ModelPhase.ACTIVATING) and view.online:
            return DevicePhase.DOWNLOADING, ""
    if not view.online:
        return DevicePhase.OFFLINE, ""
    return DevicePhase.PENDING, ""
