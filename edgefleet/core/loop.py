"""The closed loop: drift (or an operator) starts a warm-started fine-tune of the running
version on labelled captures plus its original data; the candidate is scored beside the
running version on held-out captures it never trained on, and rolled out as a canary only
when it is better (messages in protos/admin/v1/loop.proto; the controller in
cloudsvc/loop.py).

One type each, for the controller, the metadata store, the client and the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.core.stats import wilson_interval
from edgefleet.core.wire import WireEnum

DEFAULT_MIN_NEW_ROWS = 50
DEFAULT_HOLDOUT = 0.2
DEFAULT_COOLDOWN_S = 6 * 3600.0
# Rollout settings when neither the loop nor the model's last rollout says otherwise.
DEFAULT_WAVES = (0.1, 0.5, 1.0)
DEFAULT_GATES = ("p95_latency_ms<+20%", "error_rate<1%")
DEFAULT_BAKE_S = 600.0
MANUAL, DRIFT = "manual", "drift"


class RunState(WireEnum):
    UNSPECIFIED = "unknown"
    WAITING = "waiting"  # too few labelled rows (or none held out): re-checked every tick
    SUBMITTING = "submitting"  # queueing the fine-tune (a restart finds it or queues it)
    TRAINING = "training"  # the fine-tune job is queued or running
    EVALUATING = "evaluating"  # scoring both versions on the held-out rows
    ROLLING_OUT = "rolling out"  # the candidate won: starting its rollout
    ROLLED_OUT = "rolled out"  # its rollout started (an ordinary rollout from here on)
    REJECTED = "rejected"  # the candidate was not better: the running version stays
    STOPPED = "stopped"  # disabled by an operator, or something the loop cannot get past
    FAILED = "failed"  # the fine-tune failed

    @property
    def finished(self) -> bool:
        return self in (
            RunState.ROLLED_OUT,
            RunState.REJECTED,
            RunState.STOPPED,
            RunState.FAILED,
        )


@dataclass(frozen=True)
class LoopConfig:
    """A model's loop, as the operator set it. Empty rollout settings (waves, gates, bake,
    selector) take the model's last rollout's, else the defaults above."""

    model: str
    data: str  # captures:MODEL[@V][?since=&label=]: its labelled rows train and are held out
    enabled: bool = True
    on_drift: bool = True  # a drift alert starts a run (else only `edgefleet loop run`)
    # labelled rows captured (a higher capture id) since the last run that trained
    min_new_rows: int = DEFAULT_MIN_NEW_ROWS
    holdout: float = DEFAULT_HOLDOUT  # share of labelled rows held out, by capture id
    margin: float = 0.0  # candidate accuracy must beat the running one's by more than this
    cooldown_s: float = DEFAULT_COOLDOWN_S  # no drift-started run within this of the last
    waves: tuple[float, ...] = ()
    gates: tuple[str, ...] = ()
    bake_s: float = 0.0
    selector: Mapping[str, str] = field(default_factory=dict)
    updated_at: float = 0.0


@dataclass(frozen=True)
class LoopTrigger:
    """What started a run: a drift alert's figures, or an operator (`kind` "manual")."""

    kind: str
    version: int = 0  # the version the alert was about
    device_id: str = ""  # "": the fleet
    input: str = ""
    channel: int = 0
    psi: float = 0.0
    threshold: float = 0.0
    at: float = 0.0

    def describe(self) -> str:
        if self.kind != DRIFT:
            return "started by an operator"
        scope = f"device {self.device_id}" if self.device_id else "the fleet"
        return (
            f"drift of v{self.version} on {scope}: input {self.input} channel {self.channel} "
            f"PSI {self.psi:.3f} >= {self.threshold:g}"
        )


@dataclass(frozen=True)
class HoldoutScore:
    """A version's accuracy on the held-out rows, with its 95% (Wilson) interval."""

    version: int
    accuracy: float
    count: int
    correct: int
    low: float
    high: float

    @classmethod
    def of(cls, version: int, correct: int, count: int) -> HoldoutScore:
        low, high = wilson_interval(correct, count)
        return cls(version, correct / count if count else 0.0, count, correct, low, high)

    def describe(self) -> str:
        return (
            f"v{self.version} {self.accuracy:.1%} ({self.correct}/{self.count}, 95% "
            f"{self.low:.1%}-{self.high:.1%})"
        )


@dataclass(frozen=True)
class LoopRun:
    """One run of a model's loop; every step is recorded before it acts."""

    model: str
    number: int
    state: RunState
    trigger: LoopTrigger
    started_at: float
    updated_at: float = 0.0
    finished_at: float = 0.0
    parent_version: int = 0  # the running version: warm-start source and the one to beat
    captured_rows: int = 0  # captured rows in the loop's data set (labelled or not)
    labelled_rows: int = 0  # of them, with a label
    new_rows: int = 0  # labelled rows new since the last run that trained
    train_rows: int = 0  # labelled rows the fine-tune may use (the held-out ones left out)
    holdout_rows: int = 0  # labelled rows held out for the comparison
    through_id: int = 0  # the highest capture id the run reads
    job_id: str = ""
    candidate_version: int = 0
    running: HoldoutScore | None = None
    candidate: HoldoutScore | None = None
    decision: str = ""  # "promote" or "keep"
    rollout_id: str = ""
    reason: str = ""  # what it waits for, why it stopped, or what was decided and why


@dataclass(frozen=True)
class Loop:
    """A model's loop: its settings, its runs (newest first) and the last thing it did
    outside a run (an alert ignored in the cooldown, say)."""

    config: LoopConfig
    runs: tuple[LoopRun, ...] = ()
    note: str = ""

    @property
    def active(self) -> LoopRun | None:
        return next((r for r in self.runs if not r.state.finished), None)
