"""The cloud's one way to open an ONNX Runtime session (push checks, golden samples, job
measurements): one thread each, explicit providers, a clear error for a file that does not
load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from cloudsvc.errors import BadModel

CPU = ("CPUExecutionProvider",)


def providers_for(wanted: Sequence[str]) -> list[str]:
    """Those of a target's execution providers this machine's ONNX Runtime has, in order;
    the CPU where it has none of them."""
    have = set(ort.get_available_providers())
    return [p for p in wanted if p in have] or ["CPUExecutionProvider"]


def open_session(path: Path, providers: Sequence[str] = CPU) -> ort.InferenceSession:
    """A one-thread session on `providers` (ONNX Runtime lists Azure first unless told);
    BadModel naming ONNX Runtime's reason when the model does not load."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as err:  # ORT raises several private types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadModel(
            f"ONNX Runtime cannot load {path.name}: {reason}. Check that the file is a "
            "complete ONNX model, or push with skip_verify if only the device can load it"
        ) from None
