"""TensorRT engines from ONNX, through TensorRT's documented Python API.

Selected only where `import tensorrt` works (a machine with an NVIDIA GPU and TensorRT
installed); everywhere else `require_tensorrt` raises TargetUnavailableError naming the
targets that do work. An engine is specific to the GPU model and TensorRT version that
built it, so build on the kind of device that will run it. The timing cache (kernel timings
measured while building) is loaded before and saved after every build, so later builds of
similar networks on the same machine skip most of the measuring.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from compilers.errors import CompileRefused, TargetUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes the engine accepts (min..max) and the one it is tuned for (opt)."""

    min: int = 1
    opt: int = 8
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise CompileRefused(
                f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}"
            )


def tensorrt_available() -> bool:
    """Whether the `tensorrt` Python package can be imported here."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        importlib.import_module("tensorrt")
    except Exception:  # installed but broken (no driver, wrong CUDA): not usable
        return False
    return True


def require_tensorrt(target: str = "tensorrt-fp16") -> ModuleType:
    """The `tensorrt` module, or TargetUnavailableError saying what to use instead."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as err:
        raise TargetUnavailableError(
            f"target {target} needs TensorRT (the `tensorrt` Python package on a machine with "
            f"an NVIDIA GPU), which cannot be imported here ({type(err).__name__}: {err}): "
            "use onnx-gpu-fp16 or onnx-cpu-fp32 instead, or compile on a GPU worker"
        ) from err


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    timing_cache: Path,
    fp16: bool = True,
    batch: BatchProfile = BatchProfile(),
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Parse `onnx_path`, build a serialised engine into `engine_path`; return it.

    Every network input must have a dynamic first (batch) dimension and static others; the
    optimisation profile covers `batch`. `timing_cache` is read if it exists and rewritten
    with what this build measured.
    """
    trt: Any = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag to say so.
    flags = 0
    if int(str(trt.__version__).split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileRefused(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16: the engine will mostly run FP32 kernels")
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise CompileRefused(
                f"input {tensor.name!r} has shape {shape}: TensorRT engines here need a dynamic "
                "batch dimension first and static others; export with a dynamic batch only"
            )
        rest = tuple(shape[1:])
        profile.set_shape(tensor.name, (batch.min, *rest), (batch.opt, *rest), (batch.max, *rest))
    config.add_optimization_profile(profile)

    cached = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cached)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileRefused(
            f"TensorRT could not build an engine for {onnx_path.name}: see the TensorRT log "
            "above; a smaller batch profile or workspace may help"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def run_engine(engine_path: Path, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run a serialised engine on each feed (input name -> numpy array); the outputs.

    TensorRT 10's named-tensor API with torch CUDA tensors as the buffers, so no pycuda is
    needed where torch is installed with CUDA.
    """
    trt: Any = require_tensorrt()
    import numpy as np
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise CompileRefused(
            f"TensorRT could not load {engine_path.name}: engines only run with the TensorRT "
            "version and GPU model that built them"
        )
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    stream = torch.cuda.current_stream()
    results = []
    for feed in feeds:
        held = {}  # buffers must outlive the launch
        for name, array in feed.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
            held[name] = tensor
        for name in outputs:
            dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name))))
            out = torch.empty(
                tuple(context.get_tensor_shape(name)), dtype=dtype.dtype, device="cuda"
            )
            context.set_tensor_address(name, out.data_ptr())
            held[name] = out
        if not context.execute_async_v3(stream.cuda_stream):
            raise CompileRefused(f"TensorRT failed to run {engine_path.name}")
        stream.synchronize()
        results.append({name: held[name].cpu().numpy() for name in outputs})
    return results


def engine_evaluator(
    feeds: dict[str, Any], labels: Any, batch_size: int = 64
) -> Callable[[Path], float]:
    """`evaluate(engine_path) -> accuracy` of the first output's argmax on held-out feeds."""
    import numpy as np

    count = len(next(iter(feeds.values())))
    chunks = [
        {k: v[start : start + batch_size] for k, v in feeds.items()}
        for start in range(0, count, batch_size)
    ]

    def evaluate(path: Path) -> float:
        outputs = run_engine(path, chunks)
        predictions = np.concatenate([next(iter(o.values())).argmax(axis=1) for o in outputs])
        return float((predictions == labels).mean())

    return evaluate
