"""ONNX Runtime offline graph optimisation: optimise once in the cloud, not at every load.

Only the `basic` and `extended` levels are offered: `all` adds layout transformations
specific to the compiling CPU, which a device with another CPU may not run well or at all.
`extended` adds fusions into ORT contrib ops (com.microsoft domain), which every ORT build
runs but other ONNX runtimes do not.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from compilers.errors import CompileRefused
from compilers.layout import save_per_tensor
from edgefleet.core.compat import StrEnum


class OptimizationLevel(StrEnum):
    BASIC = "basic"  # constant folding, redundant node removal: portable ONNX
    EXTENDED = "extended"  # plus fusions (Conv+Add+Relu, Gelu, attention...) into ORT ops


_LEVELS = {
    OptimizationLevel.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    OptimizationLevel.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def optimize_graph(
    src: Path,
    dst: Path,
    *,
    level: OptimizationLevel = OptimizationLevel.EXTENDED,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    per_tensor: bool = True,
) -> Path:
    """Optimise `src` with ONNX Runtime for `providers` and write the result to `dst`.

    With `per_tensor` (the default) each initializer lands in its own file beside `dst`
    (see `compilers.layout`); otherwise `dst` is one self-contained file.
    """
    if not src.is_file():
        raise CompileRefused(f"no ONNX model at {src}")
    available = set(ort.get_available_providers())
    missing = [p for p in providers if p not in available]
    if missing:
        raise CompileRefused(
            f"cannot optimise for {missing}: this ONNX Runtime build has only "
            f"{sorted(available)}; optimise for CPUExecutionProvider or on a machine with them"
        )
    with tempfile.TemporaryDirectory(prefix="edgefleet-optimize-") as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = _LEVELS[OptimizationLevel(level)]
        options.optimized_model_filepath = str(optimized)
        # ORT writes weights into its own single file; we re-lay them out per tensor below.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "weights.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "0"
        )
        try:
            ort.InferenceSession(str(src), options, providers=list(providers))
        except Exception as err:  # ORT raises its own Fail/InvalidGraph types
            raise CompileRefused(f"ONNX Runtime could not optimise {src.name}: {err}") from err
        model = onnx.load(str(optimized))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if per_tensor:
        save_per_tensor(model, dst)
    else:
        onnx.save(model, str(dst))
    return dst
