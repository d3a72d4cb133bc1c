"""Rollouts: a version moved across a fleet in waves, each wave gated on what its devices
report (messages in protos/admin/v1/rollout.proto; the engine in cloudsvc/rollouts.py).

One type each, for the engine, the metadata store, the client and the CLI.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.core.wire import WireEnum


class RolloutState(WireEnum):
    UNSPECIFIED = "unknown"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ABORTING = "aborting"  # moved devices are being sent back; a restart finishes it
    ABORTED = "aborted"

    @property
    def finished(self) -> bool:
        return self in (RolloutState.SUCCEEDED, RolloutState.ABORTED)


class WaveState(WireEnum):
    UNSPECIFIED = "unknown"
    PENDING = "pending"
    MOVING = "moving"  # its devices were told; waiting until each reports
    BAKING = "baking"  # every device reported (or the deadline came): serving for a while
    PASSED = "passed"
    FAILED = "failed"


class DevicePhase(WireEnum):
    UNSPECIFIED = "unknown"
    PENDING = "pending"  # not told yet, or told and not yet reporting the version
    DOWNLOADING = "downloading"  # fetching, verifying or activating the version
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled back"
    OFFLINE = "offline"


class DeadlineAction(WireEnum):
    """What a wave's deadline does to devices that have not reported the version by then."""

    UNSPECIFIED = "unknown"
    FAIL = "fail"  # count them as failed (the failure threshold decides)
    SKIP = "skip"  # leave them to converge later and go on without them


# What a gate may name: figures of the new version on the moved devices, each compared with
# the previous version's on the same devices where the gate is relative.
GATE_METRICS = {
    "p50_latency_ms": "p50 latency (ms)",
    "p95_latency_ms": "p95 latency (ms)",
    "p99_latency_ms": "p99 latency (ms)",
    "error_rate": "errors / requests",
    "agreement": "share of shadowed requests whose answers agree",
}
RATE_METRICS = {"error_rate", "agreement"}
_GATE = re.compile(
    r"^\s*(?P<metric>[a-z0-9_]+)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<sign>[+-])?(?P<value>\d+(?:\.\d+)?)(?P<percent>%)?\s*$"
)


@dataclass(frozen=True)
class Gate:
    """`metric op value`: absolute (`error_rate<0.5%`, `agreement>=0.97`,
    `p95_latency_ms<40`) or, with a sign, relative to the previous version on the same
    devices (`p95_latency_ms<+20%`: at most 20% above it)."""

    metric: str
    op: str
    value: float  # absolute: in the metric's unit (rates as fractions); relative: a fraction
    relative: bool = False

    @property
    def text(self) -> str:
        if self.relative:
            return f"{self.metric}{self.op}{self.value * 100:+g}%"
        if self.metric in RATE_METRICS and self.value < 0.1:
            return f"{self.metric}{self.op}{self.value * 100:g}%"
        return f"{self.metric}{self.op}{self.value:g}"

    def limit(self, baseline: float | None) -> float | None:
        """The bound the new figure is held to (None: relative, with nothing to compare)."""
        if not self.relative:
            return self.value
        if baseline is None:
            return None
        return baseline * (1 + self.value)

    def holds(self, value: float, limit: float) -> bool:
        return {
            "<": value < limit,
            "<=": value <= limit,
            ">": value > limit,
            ">=": value >= limit,
        }[self.op]


def parse_gate(text: str) -> Gate:
    """A gate as a user writes it; ValueError says what is wrong."""
    match = _GATE.match(text)
    if match is None:
        raise ValueError(
            f"gate {text[:80]!r}: write METRIC OP VALUE, e.g. 'p95_latency_ms<+20%', "
            "'error_rate<0.5%', 'agreement>=0.97'"
        )
    metric = match["metric"]
    if metric not in GATE_METRICS:
        raise ValueError(
            f"gate {text[:80]!r}: no metric {metric!r}; gates may name {', '.join(GATE_METRICS)}"
        )
    value = float(match["value"])
    if match["sign"]:
        if not match["percent"]:
            raise ValueError(
                f"gate {text[:80]!r}: a relative gate is a percentage of the previous "
                "version's figure, e.g. '+20%'"
            )
        change = value / 100 * (-1 if match["sign"] == "-" else 1)
        return Gate(metric, match["op"], change, relative=True)
    if match["percent"]:
        if metric not in RATE_METRICS:
            raise ValueError(f"gate {text[:80]!r}: {metric} is not a rate; give a number")
        value /= 100
    if metric in RATE_METRICS and value > 1:
        raise ValueError(f"gate {text[:80]!r}: {metric} is between 0 and 1 (or 0-100%)")
    return Gate(metric, match["op"], value)


def parse_waves(text: str) -> tuple[float, ...]:
    """'1%,10%,50%,100%' (or fractions) as increasing cumulative shares ending at 1."""
    shares = []
    for part in text.split(","):
        part = part.strip()
        try:
            share = float(part.removesuffix("%")) / (100 if part.endswith("%") else 1)
        except ValueError:
            raise ValueError(
                f"wave {part[:20]!r} is not a share: write e.g. 1%,10%,50%,100%"
            ) from None
        shares.append(share)
    check_waves(shares)
    return tuple(shares)


def check_waves(shares: tuple[float, ...] | list[float]) -> None:
    if not shares or len(shares) > 20:
        raise ValueError("a rollout has 1 to 20 waves")
    if any(not (0 < s <= 1) or not math.isfinite(s) for s in shares):
        raise ValueError("each wave is a share of the devices above 0% and at most 100%")
    if any(b <= a for a, b in itertools.pairwise(shares)):
        raise ValueError("waves are cumulative shares and must grow: e.g. 1%,10%,50%,100%")
    if shares[-1] != 1:
        raise ValueError("the last wave must be 100%: a rollout ends with every device moved")


@dataclass(frozen=True)
class RolloutSpec:
    """What a user asks for."""

    model: str
    version: int
    selector: Mapping[str, str] = field(default_factory=dict)
    waves: tuple[float, ...] = (1.0,)
    bake_s: float = 600.0
    max_failure: float = 0.05  # of the devices moved so far
    gates: tuple[Gate, ...] = ()
    wave_deadline_s: float = 1800.0
    on_deadline: DeadlineAction = DeadlineAction.FAIL
    target: str = ""


@dataclass(frozen=True)
class GateCheck:
    """A gate's last evaluation: the new version's figure against its limit."""

    gate: str
    value: float = 0.0
    baseline: float = 0.0  # the previous version's figure (relative gates)
    limit: float = 0.0
    passed: bool = False
    evaluated: bool = False  # false: not enough data to judge (see detail)
    detail: str = ""


@dataclass(frozen=True)
class RolloutDevice:
    device_id: str
    wave: int
    previous_version: int = 0  # what it ran before (0: the model was new to it)
    phase: DevicePhase = DevicePhase.PENDING
    error: str = ""


@dataclass(frozen=True)
class Wave:
    index: int
    share: float  # cumulative share of the rollout's devices moved once this wave is done
    size: int  # devices in this wave
    state: WaveState = WaveState.PENDING
    started_at: float = 0.0
    deadline_at: float = 0.0
    reported_at: float = 0.0
    bake_until: float = 0.0
    finished_at: float = 0.0
    checks: tuple[GateCheck, ...] = ()


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    spec: RolloutSpec
    state: RolloutState = RolloutState.RUNNING
    created_at: float = 0.0
    updated_at: float = 0.0
    current_wave: int = 0
    waves: tuple[Wave, ...] = ()
    devices: tuple[RolloutDevice, ...] = ()  # in the rollout's fixed order
    reason: str = ""  # why it paused, aborted or ended

    def wave_devices(self, index: int) -> tuple[RolloutDevice, ...]:
        return tuple(d for d in self.devices if d.wave == index)

    def moved(self) -> tuple[RolloutDevice, ...]:
        """Devices of every wave that started."""
        started = {w.index for w in self.waves if w.state != WaveState.PENDING}
        return tuple(d for d in self.devices if d.wave in started)

    def counts(self, devices: tuple[RolloutDevice, ...] | None = None) -> dict[str, int]:
        """Devices per phase (every phase named, zeros included)."""
        found = {p.value: 0 for p in DevicePhase if p != DevicePhase.UNSPECIFIED}
        for d in self.devices if devices is None else devices:
            found[d.phase.value] = found.get(d.phase.value, 0) + 1
        return found
