"""The device targets an artifact can be compiled for, as data.

A profile says which runtime executes the artifact, at what precision, which ONNX Runtime
execution providers a device needs, and which compile steps produce it. Adding a target is
adding a profile here and, if it needs a new step, teaching `compilers.compile` that step.
"""

from __future__ import annotations

from dataclasses import dataclass

from compilers.errors import UnknownTargetError
from edgefleet.core.compat import StrEnum


class Runtime(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Step(StrEnum):
    """One transformation of the source ONNX graph, in the order a profile lists them."""

    OPTIMIZE = "optimize"  # ONNX Runtime offline graph optimisation
    QUANTIZE_INT8 = "quantize-int8"  # static QDQ for CNNs, dynamic for MatMul-heavy graphs
    CONVERT_FP16 = "convert-fp16"  # weights and activations to float16, fp32 inputs/outputs
    BUILD_TENSORRT_ENGINE = "build-tensorrt-engine"  # serialised engine with FP16 kernels


@dataclass(frozen=True)
class TargetProfile:
    name: str
    runtime: Runtime
    precision: Precision
    # ONNX Runtime providers the device needs, in preference order (empty: not ORT).
    providers: tuple[str, ...]
    steps: tuple[Step, ...]
    needs_gpu: bool
    # Python module the *compiling* machine must be able to import for this target.
    requires_module: str | None
    artifact_file: str  # the primary file of the compiled artifact
    description: str

    @property
    def changes_numerics(self) -> bool:
        """Whether the compiled artifact can score differently from the FP32 source."""
        return self.precision is not Precision.FP32


TARGETS: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile(
            name="onnx-cpu-fp32",
            runtime=Runtime.ONNXRUNTIME,
            precision=Precision.FP32,
            providers=("CPUExecutionProvider",),
            steps=(Step.OPTIMIZE,),
            needs_gpu=False,
            requires_module=None,
            artifact_file="model.onnx",
            description="ONNX Runtime on any CPU, full precision, graph optimised offline",
        ),
        TargetProfile(
            name="onnx-cpu-int8",
            runtime=Runtime.ONNXRUNTIME,
            precision=Precision.INT8,
            providers=("CPUExecutionProvider",),
            steps=(Step.QUANTIZE_INT8,),
            needs_gpu=False,
            requires_module=None,
            artifact_file="model.onnx",
            description=(
                "ONNX Runtime on CPU with INT8 weights: static QDQ (BatchNorm folded, "
                "calibrated, per-channel, integer convolutions checked) for CNNs, dynamic for "
                "transformer-like graphs"
            ),
        ),
        TargetProfile(
            name="onnx-gpu-fp16",
            runtime=Runtime.ONNXRUNTIME,
            precision=Precision.FP16,
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            steps=(Step.OPTIMIZE, Step.CONVERT_FP16),
            needs_gpu=True,
            requires_module=None,
            artifact_file="model.onnx",
            description="ONNX Runtime with CUDA, float16 inside, float32 inputs and outputs",
        ),
        TargetProfile(
            name="tensorrt-fp16",
            runtime=Runtime.TENSORRT,
            precision=Precision.FP16,
            providers=(),
            steps=(Step.BUILD_TENSORRT_ENGINE,),
            needs_gpu=True,
            requires_module="tensorrt",
            artifact_file="model.plan",
            description=(
                "a TensorRT engine with FP16 kernels; engines are specific to the GPU model "
                "and TensorRT version they were built with"
            ),
        ),
    )
}


def known_targets() -> tuple[str, ...]:
    return tuple(TARGETS)


def resolve_target(name: str) -> TargetProfile:
    """The profile called `name`; UnknownTargetError listing the known ones otherwise."""
    try:
        return TARGETS[name.strip().lower()]
    except KeyError:
        raise UnknownTargetError(
            f"unknown compile target {name!r}: choose one of {', '.join(TARGETS)}"
        ) from None
