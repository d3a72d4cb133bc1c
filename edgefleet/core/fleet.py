"""The fleet's concepts: what a device is and can run, what the cloud wants it to run, and
what it reports. One type each, for the cloud, the agent and the client (messages in
protos/fleet/v1/fleet.proto and protos/admin/v1/admin.proto); the agent's core speaks these,
its cloud link converts at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.core.data import CapturePolicy, InputBins
from edgefleet.core.wire import WireEnum

# CPU instructions that make INT8 inference pay (integer dot products): x86 VNNI and AMX,
# ARM's dot-product and int8 matrix-multiply extensions. Names as /proc/cpuinfo spells them.
INT8_CPU_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class CpuFeatures:
    """What the device's CPU has for integer inference, as the agent read it."""

    # Those of INT8_CPU_FEATURES the CPU has (every core of it); empty: none of them.
    int8: tuple[str, ...] = ()


@dataclass(frozen=True)
class Capabilities:
    arch: str = ""
    os: str = ""
    # ONNX Runtime execution providers available on the device, best first.
    execution_providers: tuple[str, ...] = ()
    memory_bytes: int = 0
    agent_version: str = ""
    hostname: str = ""
    onnxruntime_version: str = ""
    # None: unknown (an older agent, or no /proc/cpuinfo to read: macOS, some containers).
    cpu_features: CpuFeatures | None = None


@dataclass(frozen=True)
class Variant:
    """A second version of an assigned model served beside its primary: a share of its
    traffic (A/B, `weight` in [0, 1)) or, as a shadow, a copy of every request whose outputs
    are compared with the primary's and never returned (weight 0)."""

    version: int
    target: str
    manifest_digest: str
    weight: float = 0.0
    shadow: bool = False


@dataclass(frozen=True)
class TrafficVariant:
    """What an operator asks of a variant (`edgefleet traffic`); the cloud picks each
    device's artifact of it."""

    version: int
    weight: float = 0.0
    shadow: bool = False


@dataclass(frozen=True)
class Assignment:
    """The version (and its artifact) of one model a device should run: the primary, which
    answers what its variants do not take (1 - their weights)."""

    model: str
    version: int
    target: str
    manifest_digest: str
    # An operator's rollback: the device may go below the highest version it ran.
    rollback: bool = False
    # What of its inferences the device captures (None: nothing).
    capture: CapturePolicy | None = None
    # Histogram bins of the version's inputs, from its training data.
    bins: tuple[InputBins, ...] = ()
    # Other versions served beside the primary (A/B share or shadow); empty: none.
    variants: tuple[Variant, ...] = ()
    # Why the cloud chose `target` for this device, for the operator (`edgefleet devices`).
    # Cloud-side only: cleared before the desired state is signed; devices ignore it.
    target_reason: str = ""

    def digests(self) -> set[str]:
        """The manifests the device needs for this model: the primary's and its variants'."""
        return {self.manifest_digest, *(v.manifest_digest for v in self.variants)}


@dataclass(frozen=True)
class DesiredState:
    """What one device should run; `generation` grows by one at each change. The cloud
    stamps `issued_at` and `expires_at` (unix seconds) when it signs it for the device."""

    device_id: str
    generation: int = 0
    assignments: tuple[Assignment, ...] = ()
    issued_at: float = 0.0
    expires_at: float = 0.0

    def assignment(self, model: str) -> Assignment | None:
        return next((a for a in self.assignments if a.model == model), None)

    def with_assignment(self, assignment: Assignment) -> DesiredState:
        """The next generation: `assignment` in place of this model's current one."""
        kept = tuple(a for a in self.assignments if a.model != assignment.model)
        models = tuple(sorted((*kept, assignment), key=lambda a: a.model))
        return DesiredState(self.device_id, self.generation + 1, models)

    def without(self, model: str) -> DesiredState:
        """The next generation, with `model` no longer to run."""
        kept = tuple(a for a in self.assignments if a.model != model)
        return DesiredState(self.device_id, self.generation + 1, kept)

    def digests(self) -> set[str]:
        return {d for a in self.assignments for d in a.digests()}


@dataclass(frozen=True)
class Deployment:
    """A standing intent: devices whose labels contain `selector` run `model` v`version`,
    those enrolled later included (a replaced device at a site gets what the site runs)."""

    model: str
    selector: Mapping[str, str]
    version: int
    target: str = ""
    created_at: float = 0.0
    rollback: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """One standing deployment per model and selector: a new one replaces it."""
        return self.model, tuple(sorted(self.selector.items()))


class ModelPhase(WireEnum):
    """Where a device is with one model."""

    UNSPECIFIED = "unknown"
    DOWNLOADING = "downloading"  # fetching chunks of the desired version
    ACTIVATING = "activating"  # verifying, loading and smoke-testing the staged version
    READY = "ready"  # the desired version serves
    FAILED = "failed"  # the desired version was refused; the active one (if any) serves on


@dataclass(frozen=True)
class ModelStatus:
    """What a device reports for one model."""

    model: str
    active_version: int = 0
    active_digest: str = ""
    previous_version: int = 0
    desired_version: int = 0
    phase: ModelPhase = ModelPhase.UNSPECIFIED
    error: str = ""
    execution_provider: str = ""


@dataclass(frozen=True)
class ReportedState:
    """What a device runs and how it is, as it last reported."""

    device_id: str
    observed_generation: int = 0
    models: tuple[ModelStatus, ...] = ()
    capabilities: Capabilities | None = None
    last_error: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    inference_endpoint: str = ""
    reported_at: float = 0.0  # set by the cloud when it receives the report

    def model(self, name: str) -> ModelStatus | None:
        return next((m for m in self.models if m.model == name), None)


@dataclass(frozen=True)
class MqttAccess:
    """Where and as whom a device reaches the cloud's MQTT broker (desired-state notices,
    its status and telemetry). The password is a secret, as the device token is."""

    url: str
    username: str
    password: str


@dataclass(frozen=True)
class Enrollment:
    """What a device gets for an enrollment token (never keys to trust: those are
    provisioned out of band)."""

    device_id: str
    device_token: str
    # Mutual TLS: the device's client certificate (PEM) and the port to call with it.
    certificate: bytes = b""
    device_port: int = 0
    # The cloud's MQTT broker and this device's account on it; None when it has none.
    mqtt: MqttAccess | None = None


@dataclass(frozen=True)
class Device:
    """An enrolled device as an operator sees it."""

    device_id: str
    labels: Mapping[str, str]
    capabilities: Capabilities
    online: bool
    last_seen_at: float
    enrolled_at: int
    desired: DesiredState
    reported: ReportedState | None = None
    revoked: bool = False

    @property
    def models(self) -> tuple[ModelStatus, ...]:
        return self.reported.models if self.reported else ()

    @property
    def inference_endpoint(self) -> str:
        return self.reported.inference_endpoint if self.reported else ""

    @property
    def reported_generation(self) -> int:
        return self.reported.observed_generation if self.reported else 0

    @property
    def last_error(self) -> str:
        """The device's own error (cannot reach a chunk, ...), as it last reported."""
        return self.reported.last_error if self.reported else ""

    @property
    def converged(self) -> bool:
        """The device observed its desired generation and runs every desired version."""
        if self.reported_generation < self.desired.generation:
            return False
        return all(self.running(a.model) == a.version for a in self.desired.assignments)

    @property
    def errors(self) -> list[str]:
        """What is wrong on the device: its own error, then each failing model's."""
        found = [self.last_error] if self.last_error else []
        found += [f"{m.model} v{m.desired_version}: {m.error}" for m in self.models if m.error]
        return found

    def running(self, model: str) -> int:
        """The version of `model` serving on the device (0: none)."""
        status = self.reported.model(model) if self.reported else None
        return status.active_version if status else 0
