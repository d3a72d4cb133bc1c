"""The closed loop: drift -> fine-tune -> held-out comparison -> canary, with a human able
to stop it at every step.

When a model's loop is enabled (`edgefleet loop enable NAME --data captures:NAME ...`), a
drift alert on the model (or `edgefleet loop run NAME`) starts a run:

1. **waiting**: only captures that carry a label train (the label a client sent with its
   request, or one attached later with `edgefleet data label`); the model's own outputs
   never do. The run counts the labelled rows of the loop's data set, holds out a share of
   them (`holdout`, chosen by a hash of each row's capture id, so the same rows are held out
   by every reader) and waits, saying so, until at least `min_new_rows` labelled rows were
   captured (a capture id above the one it read) since the last run that trained, and some
   are held out. Checked every tick.
2. **submitting / training**: a fine-tune of the running version's own job settings, on the
   labelled rows not held out (up to the capture id counted, so what it trains on is what
   the run says) plus the running version's original training data, warm-started from the
   running version's weights (lineage: `warm_start_from`).
3. **evaluating**: the running version and the candidate, each from its FP32 artifact in
   ONNX Runtime, on the held-out rows: accuracy, n and a 95% Wilson interval each. The
   candidate is promoted only if its accuracy beats the running version's by more than
   `margin` (0: strictly better; a tie keeps the running version).
4. **rolling out**: an ordinary rollout (pause, abort) of the candidate, its first wave the
   canary, with the loop's waves, gates and bake, else the model's last rollout's, else
   10%,50%,100% with `p95_latency_ms<+20%` and `error_rate<1%`.

Each step records the run's state before it acts, so a cloud restarted at any moment goes
on from there (a job queued but not yet recorded is found by its description) or says
honestly why it cannot. `edgefleet loop disable NAME` cancels the run's queued or running
fine-tune and ends the run: no rollout is started after that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from cloudsvc.errors import Conflict, InvalidRequest, NotReady, UnknownResource
from cloudsvc.jobs.captures import CaptureSource, held_out, parse
from cloudsvc.jobs.manager import JobManager
from cloudsvc.jobs.spec import FineTuneParams, FineTuneSpec, spec_from_json
from cloudsvc.registry import DEFAULT_TARGET, Registry, check_name
from cloudsvc.rollouts import RolloutEngine
from cloudsvc.sessions import open_session
from cloudsvc.store.data import CaptureQuery, DataStore
from cloudsvc.store.metadata import MetadataStore
from edgefleet.core.data import DriftAlert
from edgefleet.core.golden import tensors_from_bytes
from edgefleet.core.jobs import JobState
from edgefleet.core.loop import (
    DEFAULT_BAKE_S,
    DEFAULT_GATES,
    DEFAULT_WAVES,
    DRIFT,
    MANUAL,
    HoldoutScore,
    Loop,
    LoopConfig,
    LoopRun,
    LoopTrigger,
    RunState,
)
from edgefleet.core.rollouts import RolloutSpec, check_waves, parse_gate

log = logging.getLogger(__name__)

MAX_HOLDOUT = 0.5
MAX_REASON = 500
EVAL_BATCH = 256
RUN_TAG = "closed loop"  # the fine-tune's description starts "closed loop MODEL run N"


def _tag(model: str, number: int) -> str:
    return f"{RUN_TAG} {model} run {number}:"


def check_config(config: LoopConfig) -> LoopConfig:
    """The settings, checked; InvalidRequest says what to fix."""
    check_name("model", config.model)
    source = parse(config.data) if config.data.startswith("captures:") else None
    if source is None:
        raise InvalidRequest(
            f"the loop trains on labelled captures: give --data captures:{config.model} (with "
            f"filters, e.g. captures:{config.model}?since=2026-11-30), not {config.data[:80]!r}"
        )
    if source.holdout or source.through:
        raise InvalidRequest(
            "the loop chooses the held-out rows itself: give --holdout, not holdout= or "
            "through= in --data"
        )
    if config.min_new_rows < 1:
        raise InvalidRequest("--min-new-rows is at least 1 (labelled rows new since the last run)")
    if not 0 < config.holdout <= MAX_HOLDOUT:
        raise InvalidRequest(
            f"--holdout is the share of labelled rows held out: above 0 and at most "
            f"{MAX_HOLDOUT:.0%}, not {config.holdout!r}"
        )
    if not 0 <= config.margin < 1:
        raise InvalidRequest(
            f"--margin is an accuracy difference from 0 to below 1 (0.02: two points), "
            f"not {config.margin!r}"
        )
    for value, name in ((config.cooldown_s, "--cooldown"), (config.bake_s, "--bake")):
        if not 0 <= value <= 366 * 86_400:
            raise InvalidRequest(f"{name} is 0 to a year in seconds, not {value!r}")
    if config.waves:
        try:
            check_waves(config.waves)
        except ValueError as err:
            raise InvalidRequest(f"--waves: {err}") from None
    for gate in config.gates:
        try:
            parse_gate(gate)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
    if len(config.gates) > 16 or len(config.selector) > 64:
        raise InvalidRequest("a loop has at most 16 gates and 64 selector labels")
    return config


class ClosedLoop:
    """Every model's loop: operator actions (enable, disable, run, read) from any thread,
    drift alerts handed over by the monitor, and the runs' steps on its own thread."""

    def __init__(
        self,
        metadata: MetadataStore,
        data: DataStore,
        registry: Registry,
        jobs: JobManager,
        rollouts: RolloutEngine,
        *,
        tick_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metadata = metadata
        self.data = data
        self.registry = registry
        self.jobs = jobs
        self.rollouts = rollouts
        self.tick_s = tick_s
        self.clock = clock
        self._lock = threading.RLock()
        self._alerts: queue.SimpleQueue[DriftAlert] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # operator actions --------------------------------------------------------------------
    def enable(self, config: LoopConfig) -> Loop:
        config = check_config(config)
        if self.metadata.get_model(config.model) is None:
            raise UnknownResource(
                f"model {config.model} does not exist; see `edgefleet models list`"
            )
        with self._lock:
            current = self.metadata.get_loop(config.model)
            note = f"enabled at {_when(self.clock())}"
            self.metadata.put_loop(
                Loop(replace(config, enabled=True, updated_at=self.clock()), note=note)
            )
            if current is None:
                log.info("loop %s enabled", config.model)
        return self.get(config.model)

    def disable(self, model: str, reason: str = "") -> Loop:
        """Off: a run under way ends stopped, its queued or running fine-tune cancelled; a
        rollout it already started stays (an ordinary one: pause or abort it)."""
        with self._lock:
            loop = self.get(model, 1)
            why = f"disabled by an operator: {reason[:MAX_REASON] or 'no reason given'}"
            run = loop.active
            if run is not None:
                self._stop_run(run, why)
            self.metadata.put_loop(
                Loop(replace(loop.config, enabled=False, updated_at=self.clock()), note=why)
            )
        log.info("loop %s disabled", model)
        return self.get(model)

    def run_now(self, model: str, reason: str = "") -> Loop:
        """Start a run now, without waiting for drift (and without the cooldown)."""
        with self._lock:
            loop = self.get(model, 1)
            if not loop.config.enabled:
                raise NotReady(f"the loop of {model} is disabled; `edgefleet loop enable` it")
            if loop.active is not None:
                raise Conflict(
                    f"run {loop.active.number} of {model}'s loop is {loop.active.state.value}; "
                    "wait for it or `edgefleet loop disable` to stop it"
                )
            self._start_run(loop, LoopTrigger(MANUAL, at=self.clock()))
        self._wake.set()
        return self.get(model)

    def get(self, model: str, runs: int = 20) -> Loop:
        loop = self._loop(model)
        return replace(loop, runs=tuple(self.metadata.list_loop_runs(model, runs or 20)))

    def loops(self) -> list[Loop]:
        return [
            replace(loop, runs=tuple(self.metadata.list_loop_runs(loop.config.model, 1)))
            for loop in self.metadata.list_loops()
        ]

    def _loop(self, model: str) -> Loop:
        check_name("model", model)
        loop = self.metadata.get_loop(model)
        if loop is None:
            raise UnknownResource(
                f"{model} has no loop; `edgefleet loop enable {model} --data captures:{model}`"
            )
        return loop

    # drift ------------------------------------------------------------------------------
    def on_alert(self, alert: DriftAlert) -> None:
        """The drift monitor's callback: hand the alert to the loop's thread."""
        self._alerts.put(alert)
        self._wake.set()

    def _alert(self, alert: DriftAlert) -> None:
        with self._lock:
            loop = self.metadata.get_loop(alert.model)
            if loop is None or not loop.config.enabled or not loop.config.on_drift:
                return
            trigger = LoopTrigger(
                DRIFT,
                alert.version,
                alert.device_id,
                alert.input,
                alert.channel,
                alert.psi,
                alert.threshold,
                alert.at,
            )
            runs = self.metadata.list_loop_runs(alert.model, 1)
            active = next((r for r in runs if not r.state.finished), None)
            if active is not None:
                self._note(loop, f"{trigger.describe()}: run {active.number} is under way")
                return
            if runs and self.clock() < runs[0].started_at + loop.config.cooldown_s:
                until = runs[0].started_at + loop.config.cooldown_s
                self._note(loop, f"{trigger.describe()}: ignored, cooldown until {_when(until)}")
                return
            self._start_run(loop, trigger)

    def _note(self, loop: Loop, text: str) -> None:
        self.metadata.put_loop(replace(loop, note=f"{_when(self.clock())} {text}"[:MAX_REASON]))
        log.info("loop %s: %s", loop.config.model, text)

    def _start_run(self, loop: Loop, trigger: LoopTrigger) -> LoopRun:
        model = loop.config.model
        last = self.metadata.list_loop_runs(model, 1)
        now = self.clock()
        run = LoopRun(
            model,
            (last[0].number if last else 0) + 1,
            RunState.WAITING,
            trigger,
            now,
            now,
            parent_version=self._running_version(model),
            reason="counting labelled rows",
        )
        self.metadata.put_loop_run(run)
        log.info("loop %s: run %d started (%s)", model, run.number, trigger.describe())
        return run

    # the thread -------------------------------------------------------------------------
    def start(self) -> ClosedLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="closed-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a store closing or failing: the next tick tries again
                log.exception("closed loop: a step failed")
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def tick(self) -> None:
        """Hand over the alerts that came, then take every active run one step on."""
        while True:
            try:
                alert = self._alerts.get_nowait()
            except queue.Empty:
                break
            self._alert(alert)
        for loop in self.metadata.list_loops():
            runs = self.metadata.list_loop_runs(loop.config.model, 1)
            if runs and not runs[0].state.finished:
                try:
                    self.step(runs[0].model)
                except Exception as err:
                    log.exception("closed loop: %s run %d", runs[0].model, runs[0].number)
                    with self._lock:
                        self._end(runs[0], RunState.STOPPED, f"internal error: {err}")

    def step(self, model: str) -> LoopRun | None:
        """One step of the model's active run (None when it has none)."""
        with self._lock:
            loop = self.metadata.get_loop(model)
            runs = self.metadata.list_loop_runs(model, 1)
            if loop is None or not runs or runs[0].state.finished:
                return None
            run = runs[0]
            if not loop.config.enabled:
                return self._stop_run(run, "the loop is disabled")
            state = run.state
            if state == RunState.WAITING:
                return self._wait_or_submit(loop.config, run)
            if state == RunState.SUBMITTING:
                return self._resume_submit(loop.config, run)
            if state == RunState.TRAINING:
                return self._follow_job(run)
            if state == RunState.EVALUATING:
                return self._evaluate(loop.config, run)
            if state == RunState.ROLLING_OUT:
                return self._roll_out(loop.config, run)
            return self._end(run, RunState.STOPPED, f"unknown state {state.value}")

    # steps ------------------------------------------------------------------------------
    def _save(self, run: LoopRun, **changes: object) -> LoopRun:
        updated = replace(run, updated_at=self.clock(), **changes)  # type: ignore[arg-type]
        self.metadata.put_loop_run(updated)
        return updated

    def _end(self, run: LoopRun, state: RunState, reason: str) -> LoopRun:
        now = self.clock()
        log.info("loop %s run %d %s: %s", run.model, run.number, state.value, reason)
        return self._save(run, state=state, reason=reason[:MAX_REASON], finished_at=now)

    def _stop_run(self, run: LoopRun, why: str) -> LoopRun:
        if run.job_id:
            with contextlib.suppress(NotReady, InvalidRequest, UnknownResource):
                if not self.jobs.get(run.job_id).state.finished:
                    self.jobs.cancel(run.job_id)
                    why += f"; fine-tune {run.job_id} cancelled"
        return self._end(run, RunState.STOPPED, why)

    def _count(self, config: LoopConfig, after: int) -> dict[str, int]:
        """Rows of the loop's data: captured, labelled, labelled with an id above `after`
        (new), held out, and the highest id."""
        source = parse(config.data)
        query = CaptureQuery(source.model, source.version, source.since, label=source.label)
        captured = labelled = new = holdout = through = 0
        for row in self.data.captures(query):
            captured += 1
            through = max(through, row.id)
            if row.label:
                labelled += 1
                new += row.id > after
                holdout += held_out(row.id, config.holdout)
        return {
            "captured_rows": captured,
            "labelled_rows": labelled,
            "new_rows": new,
            "holdout_rows": holdout,
            "train_rows": labelled - holdout,
            "through_id": through,
        }

    def _wait_or_submit(self, config: LoopConfig, run: LoopRun) -> LoopRun:
        previous = next(
            (
                r
                for r in self.metadata.list_loop_runs(run.model, 0)
                if r.number < run.number and r.job_id
            ),
            None,
        )
        counts = self._count(config, previous.through_id if previous else 0)
        labelled, holdout, new = counts["labelled_rows"], counts["holdout_rows"], counts["new_rows"]
        captured, through = counts["captured_rows"], counts["through_id"]
        since = f" since run {previous.number}" if previous else ""
        if new < config.min_new_rows or not holdout or labelled - holdout < 1:
            missing = (
                f"{new} new labelled rows{since}, {config.min_new_rows} needed"
                if new < config.min_new_rows
                else "no labelled row is held out yet to compare the versions on"
            )
            reason = (
                f"waiting for labels: {labelled} of {captured} captured rows carry a label "
                f"({missing}); unlabelled rows never train. Send a label with requests, or "
                "export, label and `edgefleet data label` them"
            )
            if reason != run.reason or any(getattr(run, k) != v for k, v in counts.items()):
                return self._save(run, reason=reason, **counts)
            return run
        parent = run.parent_version
        try:
            spec = self._spec(config, run, parent, through)
        except (NotReady, UnknownResource, InvalidRequest) as err:
            return self._end(replace(run, **counts), RunState.STOPPED, str(err))  # type: ignore[arg-type]
        run = self._save(
            run,
            state=RunState.SUBMITTING,
            reason=f"queueing a fine-tune warm-started from v{parent}",
            **counts,
        )
        return self._submit(run, spec)

    def _submit(self, run: LoopRun, spec: FineTuneSpec) -> LoopRun:
        try:
            job = self.jobs.submit(spec)
        except (NotReady, UnknownResource, InvalidRequest) as err:
            return self._end(run, RunState.STOPPED, f"the fine-tune was refused: {err}")
        return self._save(
            run,
            state=RunState.TRAINING,
            job_id=job.job_id,
            reason=f"fine-tune {job.job_id} on {run.train_rows} labelled rows plus the "
            f"original data, warm-started from v{run.parent_version}",
        )

    def _resume_submit(self, config: LoopConfig, run: LoopRun) -> LoopRun:
        """A run cut off while queueing: its job if it was queued, else queue it now."""
        tag = _tag(run.model, run.number)
        for job in self.jobs.list(run.model, limit=100):
            request = json.loads(job.request_json)
            if str(request.get("description", "")).startswith(tag):
                return self._save(
                    run, state=RunState.TRAINING, job_id=job.job_id, reason="found its fine-tune"
                )
        try:
            spec = self._spec(config, run, run.parent_version, run.through_id)
        except (NotReady, UnknownResource, InvalidRequest) as err:
            return self._end(run, RunState.STOPPED, str(err))
        return self._submit(run, spec)

    def _spec(self, config: LoopConfig, run: LoopRun, parent: int, through: int) -> FineTuneSpec:
        """The running version's own fine-tune, on the loop's labelled rows (held-out ones
        left out, up to `through`) plus its original data, warm-started from it."""
        if not parent:
            raise NotReady(f"{run.model} has no version to start from")
        version = self.registry.get_version(run.model, parent)
        lineage = version.lineage
        job = self.metadata.get_job(lineage.job_id) if lineage and lineage.job_id else None
        original = spec_from_json(job.request_json) if job is not None else None
        if not isinstance(original, FineTuneSpec):
            raise NotReady(
                f"{run.model} v{parent} was not fine-tuned by this cloud (pushed, or its job is "
                "gone): the loop needs its training settings and data; fine-tune it with "
                "`edgefleet finetune` first"
            )
        source = parse(config.data)
        captures = replace(source, holdout=config.holdout, through=through)
        kept = tuple(r for r in original.data_references if not r.startswith("captures:"))
        params = original.params
        if original.search and lineage is not None:
            params = FineTuneParams.parse(dict(lineage.hyperparameters), "the parent's settings")
        return original.model_copy(
            update={
                "data": captures.reference(),
                "extra_data": kept,
                "params": params,
                "search": (),
                "parent_version": parent,
                "warm_start": True,
                "description": f"{_tag(run.model, run.number)} {run.trigger.describe()}; "
                f"warm start from v{parent}",
            }
        )

    def _follow_job(self, run: LoopRun) -> LoopRun:
        job = self.jobs.get(run.job_id)
        if not job.state.finished:
            return run
        if job.state == JobState.SUCCEEDED:
            return self._save(
                run,
                state=RunState.EVALUATING,
                candidate_version=job.result_version,
                reason=f"candidate v{job.result_version}: scoring it and v{run.parent_version} "
                f"on {run.holdout_rows} held-out rows",
            )
        if job.state == JobState.CANCELLED:
            return self._end(run, RunState.STOPPED, f"fine-tune {job.job_id} was cancelled")
        return self._end(run, RunState.FAILED, f"fine-tune {job.job_id} failed: {job.error}")

    def _evaluate(self, config: LoopConfig, run: LoopRun) -> LoopRun:
        inputs, labels = self._holdout(config, run.through_id)
        if not labels:
            return self._end(run, RunState.STOPPED, "the held-out rows are gone")
        running = self.score(run.model, run.parent_version, inputs, labels)
        candidate = self.score(run.model, run.candidate_version, inputs, labels)
        better = candidate.accuracy > running.accuracy + config.margin
        margin = f"by more than {config.margin:.1%}" if config.margin else "strictly"
        verdict = (
            f"candidate {candidate.describe()} beats running {running.describe()} {margin}"
            if better
            else f"candidate {candidate.describe()} does not beat running {running.describe()} "
            f"{margin} (a tie keeps the running version): v{run.parent_version} stays"
        )
        run = self._save(
            run,
            running=running,
            candidate=candidate,
            decision="promote" if better else "keep",
            state=RunState.ROLLING_OUT if better else run.state,
            reason=verdict,
        )
        if not better:
            return self._end(run, RunState.REJECTED, verdict)
        return self._roll_out(config, run)

    def _roll_out(self, config: LoopConfig, run: LoopRun) -> LoopRun:
        for rollout in self.rollouts.list(run.model):
            if rollout.spec.version == run.candidate_version and rollout.created_at >= (
                run.started_at
            ):
                return self._end(
                    replace(run, rollout_id=rollout.rollout_id),
                    RunState.ROLLED_OUT,
                    f"{run.reason}; rollout {rollout.rollout_id} found",
                )
        spec = self._rollout_spec(config, run.model, run.candidate_version)
        try:
            rollout = self.rollouts.start_rollout(spec)
        except (NotReady, UnknownResource, InvalidRequest, Conflict) as err:
            return self._end(run, RunState.STOPPED, f"{run.reason}; no rollout: {err}")
        first = rollout.waves[0].size if rollout.waves else 0
        return self._end(
            replace(run, rollout_id=rollout.rollout_id),
            RunState.ROLLED_OUT,
            f"{run.reason}; rollout {rollout.rollout_id} started, a canary of {first} "
            "device(s) first (pause or abort it like any rollout)",
        )

    def _rollout_spec(self, config: LoopConfig, model: str, version: int) -> RolloutSpec:
        last = next(iter(reversed(self.rollouts.list(model))), None)
        gates = (
            tuple(parse_gate(g) for g in config.gates)
            if config.gates
            else last.spec.gates
            if last is not None and last.spec.gates
            else tuple(parse_gate(g) for g in DEFAULT_GATES)
        )
        selector: Mapping[str, str] = config.selector or (
            last.spec.selector if last is not None else self._deployed_selector(model)
        )
        return RolloutSpec(
            model,
            version,
            dict(selector),
            config.waves or (last.spec.waves if last is not None else DEFAULT_WAVES),
            config.bake_s or (last.spec.bake_s if last is not None else DEFAULT_BAKE_S),
            last.spec.max_failure if last is not None else 0.05,
            gates,
            target=last.spec.target if last is not None else "",
        )

    def _deployed_selector(self, model: str) -> Mapping[str, str]:
        deployments = [d for d in self.metadata.list_deployments() if d.model == model]
        return deployments[-1].selector if deployments else {}

    def _running_version(self, model: str) -> int:
        """The version most of the model's devices are assigned (the newer on a tie), else
        the newest version."""
        counts: Counter[int] = Counter()
        for device in self.metadata.list_devices():
            if device.revoked:
                continue
            assigned = self.metadata.get_desired(device.device_id).assignment(model)
            if assigned is not None:
                counts[assigned.version] += 1
        if counts:
            return max(counts, key=lambda v: (counts[v], v))
        record = self.metadata.get_model(model)
        return record.latest_version if record else 0

    # the held-out comparison --------------------------------------------------------------
    def _holdout(
        self, config: LoopConfig, through: int
    ) -> tuple[dict[str, list[np.ndarray]], list[str]]:
        """The held-out labelled rows (inputs by name, one label per example)."""
        source: CaptureSource = parse(config.data)
        inputs: dict[str, list[np.ndarray]] = {}
        labels: list[str] = []
        for row in self.data.captures(source.query()):
            if row.id > through or not held_out(row.id, config.holdout):
                continue
            try:
                arrays = tensors_from_bytes(row.inputs)
            except Exception:  # a device's bytes: a row that does not parse is skipped
                continue
            sizes = {len(a) for a in arrays.values()}
            if len(sizes) != 1:
                continue
            for name, array in arrays.items():
                inputs.setdefault(name, []).append(array)
            labels.extend([row.label] * sizes.pop())
        return inputs, labels

    def score(
        self, model: str, version: int, inputs: Mapping[str, list[np.ndarray]], labels: list[str]
    ) -> HoldoutScore:
        """`version`'s accuracy on labelled examples, from its FP32 artifact in ONNX
        Runtime (a label the version has no class for counts as a miss)."""
        record = self.registry.get_version(model, version)
        artifact = record.artifact(DEFAULT_TARGET)
        if artifact is None:
            raise NotReady(f"{model} v{version} has no {DEFAULT_TARGET} artifact to score")
        with tempfile.TemporaryDirectory(prefix="loop-score-") as tmp:
            folder = Path(tmp)
            manifest = self.registry.materialize(artifact.manifest_digest, folder)
            names = json.loads(manifest.preprocessing.params.get("class_names", "[]") or "[]")
            if not names and record.lineage is not None:
                names = list(record.lineage.class_names)
            session = open_session(folder / "model.onnx")
            wanted = [i.name for i in session.get_inputs()]
            feeds = {k: np.concatenate(v) for k, v in inputs.items()}
            if set(wanted) != set(feeds) and len(wanted) == len(feeds) == 1:
                feeds = {wanted[0]: next(iter(feeds.values()))}
            if set(wanted) != set(feeds):
                raise NotReady(
                    f"{model} v{version} takes inputs {wanted}; the held-out captures hold "
                    f"{sorted(feeds)}"
                )
            output = session.get_outputs()[0].name
            correct = 0
            for start in range(0, len(labels), EVAL_BATCH):
                batch = {
                    k: np.ascontiguousarray(v[start : start + EVAL_BATCH]) for k, v in feeds.items()
                }
                logits = session.run([output], batch)[0]
                for offset, index in enumerate(np.argmax(logits, axis=1)):
                    predicted = names[int(index)] if int(index) < len(names) else None
                    correct += predicted == labels[start + offset]
        return HoldoutScore.of(version, correct, len(labels))


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
