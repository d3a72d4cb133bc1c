"""Validation and calibration data as ONNX Runtime feeds, and what jobs measure with them:
accuracy of a compiled file and its batch-1 latency. Torch-free."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloudsvc.sessions import open_session
from compilers.sampling import Score

Feeds = dict[str, npt.NDArray[np.generic]]
"""Input name -> array, every array batched along axis 0."""

EVALUATION_FILE = "evaluation.npz"
_LABELS, _CLASSES, _VAL, _CAL = "labels", "class_names", "val:", "cal:"


@dataclass(frozen=True)
class EvaluationData:
    """What a version keeps to be compiled again later: held-out inputs and labels (the
    accuracy gate of INT8/FP16) and typical training inputs (static INT8 calibration)."""

    validation: Feeds
    labels: npt.NDArray[np.int64]
    calibration: Feeds
    class_names: tuple[str, ...]

    def save(self, path: Path) -> None:
        arrays: dict[str, npt.NDArray[np.generic]] = {
            _LABELS: self.labels,
            _CLASSES: np.array(self.class_names),
        }
        arrays |= {_VAL + k: v for k, v in self.validation.items()}
        arrays |= {_CAL + k: v for k, v in self.calibration.items()}
        with path.open("wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> EvaluationData:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                validation={k[len(_VAL) :]: data[k] for k in data.files if k.startswith(_VAL)},
                labels=data[_LABELS].astype(np.int64),
                calibration={k[len(_CAL) :]: data[k] for k in data.files if k.startswith(_CAL)},
                class_names=tuple(str(c) for c in data[_CLASSES]),
            )


def rows(feeds: Mapping[str, npt.NDArray[np.generic]]) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: Mapping[str, npt.NDArray[np.generic]], start: int, stop: int) -> Feeds:
    return {k: np.ascontiguousarray(v[start:stop]) for k, v in feeds.items()}


def batches(feeds: Mapping[str, npt.NDArray[np.generic]], size: int) -> Iterator[Feeds]:
    for start in range(0, rows(feeds), size):
        yield take(feeds, start, start + size)


def accuracy_evaluator(
    feeds: Feeds,
    labels: npt.NDArray[np.int64],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    batch_size: int = 64,
) -> Callable[[Path], Score]:
    """`evaluate(path) -> Score`: accuracy of the first output's argmax over the held-out
    feeds, with each example's verdict (the gate's confidence intervals need them)."""

    def evaluate(path: Path) -> Score:
        run = open_session(path, providers)
        predictions = [
            np.asarray(run.run(None, batch)[0]).argmax(axis=1)
            for batch in batches(feeds, batch_size)
        ]
        correct = np.concatenate(predictions) == labels
        return Score(float(correct.mean()), correct)

    return evaluate


def latency_ms(
    path: Path,
    feed: Feeds,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    seconds: float = 1.0,
    max_runs: int = 500,
) -> tuple[float, float]:
    """(p50, p99) milliseconds of one run on `feed`, one thread, after a warm-up."""
    run = open_session(path, providers)
    for _ in range(5):
        run.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_runs and (len(times) < 20 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]
