"""Which of a version's artifacts a device runs, and why: the fastest target that passed the
accuracy gate and pays on the device's hardware. Plain and torch-free: the fleet calls it
for each device at each assignment and keeps the reason with the desired state, for the
operator (`edgefleet devices`).

GPU targets go where the device has their execution provider. On a CPU, INT8 pays only
with integer dot-product instructions (x86 VNNI or AMX, ARM dotprod or i8mm); without them
it can be slower than FP32. An INT8 artifact exists only when it passed the accuracy gate
at compile time, and its latency (like FP32's) was measured on the cloud's CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from edgefleet.core.fleet import INT8_CPU_FEATURES, Capabilities
from edgefleet.core.versions import Artifact

FP32_TARGET = "onnx-cpu-fp32"
INT8_TARGET = "onnx-cpu-int8"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
OPERATOR = "chosen by the operator"


@dataclass(frozen=True)
class TargetChoice:
    target: str
    reason: str


def gpu_provider(target: str) -> str:
    """The execution provider a GPU target needs on the device; "" for a CPU target."""
    if target.startswith("tensorrt"):
        return TENSORRT_PROVIDER
    if "cuda" in target or "gpu" in target:
        return CUDA_PROVIDER
    return ""


def choose_target(
    artifacts: Sequence[Artifact],
    caps: Capabilities,
    operator_target: str = "",
    why_not_built: Callable[[str], str] | None = None,
) -> TargetChoice | None:
    """The target a device with `caps` runs of these artifacts, with the reason; None when
    none fits. An operator's target wins when the version has it. `why_not_built(target)`
    says what became of a target the version lacks ("" when nothing is known)."""
    if operator_target:
        if any(a.target == operator_target for a in artifacts):
            return TargetChoice(operator_target, OPERATOR)
        return None
    # Agents run ONNX graphs; a TensorRT plan is for TensorRT's own runtime.
    onnx = {a.target: a for a in artifacts if a.format == "onnx"}
    providers = set(caps.execution_providers)
    # TensorRT first, then CUDA: as fast as the device's GPU goes.
    for wanted in (TENSORRT_PROVIDER, CUDA_PROVIDER):
        for target in sorted(onnx):
            if gpu_provider(target) == wanted and wanted in providers:
                return TargetChoice(target, f"the device has {wanted}")
    fp32, int8 = onnx.get(FP32_TARGET), onnx.get(INT8_TARGET)
    if int8 is not None and (fp32 is None or _int8_pays(int8, fp32, caps)):
        return TargetChoice(INT8_TARGET, _int8_reason(int8, fp32, caps))
    if fp32 is not None:
        return TargetChoice(FP32_TARGET, _fp32_reason(int8, fp32, caps, why_not_built))
    others = sorted(t for t in onnx if not gpu_provider(t))
    if others:
        return TargetChoice(others[0], "the only artifact of this version the device runs")
    return None


def _p50(artifact: Artifact) -> float | None:
    value = artifact.metrics.get("latency_p50_ms")
    return float(value) if value is not None and value > 0 else None


def _int8_features(caps: Capabilities) -> tuple[str, ...]:
    """The INT8 instructions the device says its CPU has, of the names known here: another
    name proves nothing, and no other text a device sends reaches the operator's reason."""
    reported = caps.cpu_features.int8 if caps.cpu_features is not None else ()
    return tuple(f for f in INT8_CPU_FEATURES if f in reported)


def _int8_pays(int8: Artifact, fp32: Artifact, caps: Capabilities) -> bool:
    if not _int8_features(caps):
        return False
    fast, slow = _p50(int8), _p50(fp32)
    return slow is None or (fast is not None and fast < slow)


def _gate(metrics: Mapping[str, float]) -> str:
    if "accuracy_drop" not in metrics:
        return "no accuracy gate measured it"
    change = f"{-metrics['accuracy_drop'] * 100:+.2f} pts"
    if "accuracy" in metrics:
        return f"passed the accuracy gate (accuracy {metrics['accuracy']:.2%}, {change})"
    return f"passed the accuracy gate ({change})"


def _int8_reason(int8: Artifact, fp32: Artifact | None, caps: Capabilities) -> str:
    if fp32 is None:
        return f"the only CPU artifact ({FP32_TARGET} not built); {_gate(int8.metrics)}"
    fast, slow = _p50(int8), _p50(fp32)
    if slow is None:
        speed = "FP32 latency not measured"
    elif fast is not None:
        speed = f"INT8 p50 {fast:.3g} ms vs FP32 {slow:.3g} ms on the cloud ({slow / fast:.1f}x)"
    else:  # unreachable: _int8_pays wants INT8's latency when FP32's is known
        speed = "INT8 latency not measured"
    return f"CPU has {', '.join(_int8_features(caps))}; {speed}; {_gate(int8.metrics)}"


def _fp32_reason(
    int8: Artifact | None,
    fp32: Artifact,
    caps: Capabilities,
    why_not_built: Callable[[str], str] | None,
) -> str:
    if int8 is None:
        why = why_not_built(INT8_TARGET) if why_not_built is not None else ""
        return f"{INT8_TARGET} not built" + (
            f": {why}" if why else f" for v{fp32.version} (`edgefleet compile` can build it)"
        )
    if caps.cpu_features is None:
        return "the device did not report its CPU's int8 features: INT8 might be slower"
    if not _int8_features(caps):
        return "CPU has no VNNI/dotprod: INT8 would be slower"
    fast, slow = _p50(int8), _p50(fp32)
    if fast is None:
        return "INT8 latency not measured, FP32's is: INT8 might be slower"
    return f"INT8 measured slower than FP32 on the cloud (p50 {fast:.3g} ms vs {slow:.3g} ms)"
