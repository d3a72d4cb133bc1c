"""The half of the parity check that runs in a spawned child: ONNX Runtime only.

Kept free of torch so the child starts in well under a second, and in its own process so a
crash inside ONNX Runtime (or a graph that exhausts memory) fails the check, not the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import numpy as np
import numpy.typing as npt
import onnxruntime as ort


@dataclass(frozen=True)
class OutputVerdict:
    name: str
    max_abs_diff: float  # nan when any compared value was nan or inf on one side only
    mismatched: int  # values outside atol + rtol * |expected|, over all samples
    total: int
    sample: int  # index of the input where the worst difference occurred
    rtol: float
    atol: float
    shape_problem: str = ""  # non-empty when shapes or output counts disagree


def compare(
    onnx_path: str,
    feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    expected: Sequence[Sequence[npt.NDArray[np.generic]]],
    default: tuple[float, float],
    overrides: Mapping[str, tuple[float, float]],
) -> list[OutputVerdict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    verdicts = {
        name: OutputVerdict(name, 0.0, 0, 0, 0, *overrides.get(name, default)) for name in names
    }
    for index, (feed, want_all) in enumerate(zip(feeds, expected, strict=True)):
        got_all = session.run(names, dict(feed))
        if len(want_all) != len(names):
            problem = (
                f"torch returned {len(want_all)} outputs where the ONNX graph has {len(names)}"
            )
            first = verdicts[names[0]]
            return [
                OutputVerdict(
                    first.name, float("nan"), 0, 0, index, first.rtol, first.atol, problem
                )
            ]
        for name, want, have in zip(names, want_all, got_all, strict=True):
            seen = verdicts[name]
            if seen.shape_problem:
                continue
            if want.shape != have.shape:
                problem = f"shape {list(have.shape)} where torch gave {list(want.shape)}"
                verdicts[name] = replace(
                    seen, max_abs_diff=float("nan"), sample=index, shape_problem=problem
                )
                continue
            want64 = np.asarray(want, dtype=np.float64)
            have64 = np.asarray(have, dtype=np.float64)
            same = (want64 == have64) | (np.isnan(want64) & np.isnan(have64))
            diff = np.where(same, 0.0, np.abs(have64 - want64))
            bad = int(np.count_nonzero(~(diff <= seen.atol + seen.rtol * np.abs(want64))))
            max_diff = float(np.max(diff)) if diff.size else 0.0
            worse = np.isnan(max_diff) and not np.isnan(seen.max_abs_diff)
            worse = worse or max_diff > seen.max_abs_diff
            verdicts[name] = replace(
                seen,
                max_abs_diff=max_diff if worse else seen.max_abs_diff,
                sample=index if worse else seen.sample,
                mismatched=seen.mismatched + bad,
                total=seen.total + int(diff.size),
            )
    return list(verdicts.values())


def run(
    conn: Connection,
    onnx_path: str,
    feeds: Sequence[Mapping[str, npt.NDArray[np.generic]]],
    expected: Sequence[Sequence[npt.NDArray[np.generic]]],
    default: tuple[float, float],
    overrides: Mapping[str, tuple[float, float]],
) -> None:
    """Child entry point: send back the verdicts, or the error text if ORT refused."""
    try:
        conn.send(("ok", compare(onnx_path, feeds, expected, default, overrides)))
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()
