"""Per model version inference statistics, as Triton's ModelStatistics reports them.

Measured by the data plane on every request, whichever transport carried it:

- success / fail: requests answered / refused after their model was found, with their whole
  time in the server (from admission to the answer built);
- queue: from admission (when the request's bytes were in) to the start of its own work,
  which includes waiting for a large-request slot;
- compute_input: decoding and checking the inputs (and reading shared memory);
- compute_infer: the model's run (with dynamic batching, including the wait for a busy model);
- compute_output: classification, shared-memory writes and encoding the answer;
- inference_count: inferences made: rows for a model whose dimension 0 is its batch (Triton's
  max_batch_size > 0), else one a request; execution_count: model runs (fewer than
  requests when the dynamic batcher ran several together).

Each version's figures are guarded by their own lock (a handful of integer additions a
request).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class VersionFigures:
    """A snapshot of one version's statistics."""

    name: str
    version: int
    last_inference_ms: int  # milliseconds since the epoch; 0: never
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class VersionStats:
    """One version's running figures; thread-safe."""

    __slots__ = (
        "_executions",
        "_fail",
        "_infer_ns",
        "_inferences",
        "_input_ns",
        "_last_ms",
        "_lock",
        "_output_ns",
        "_queue_ns",
        "_success",
        "name",
        "version",
    )

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self._last_ms = 0
        self._inferences = 0
        self._executions = 0
        self._success = [0, 0]
        self._fail = [0, 0]
        self._queue_ns = 0
        self._input_ns = 0
        self._infer_ns = 0
        self._output_ns = 0

    def succeeded(
        self,
        *,
        rows: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        total_ns: int,
        executions: int = 1,
    ) -> None:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._last_ms = now_ms
            self._inferences += rows
            self._executions += executions
            self._success[0] += 1
            self._success[1] += total_ns
            self._queue_ns += queue_ns
            self._input_ns += input_ns
            self._infer_ns += infer_ns
            self._output_ns += output_ns

    def failed(self, total_ns: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._last_ms = now_ms
            self._fail[0] += 1
            self._fail[1] += total_ns

    def figures(self, executions: int | None = None) -> VersionFigures:
        """A consistent snapshot; `executions` overrides the run count (the batcher's)."""
        with self._lock:
            n = self._success[0]
            return VersionFigures(
                name=self.name,
                version=self.version,
                last_inference_ms=self._last_ms,
                inference_count=self._inferences,
                execution_count=self._executions if executions is None else executions,
                success=Duration(n, self._success[1]),
                fail=Duration(self._fail[0], self._fail[1]),
                queue=Duration(n, self._queue_ns),
                compute_input=Duration(n, self._input_ns),
                compute_infer=Duration(n, self._infer_ns),
                compute_output=Duration(n, self._output_ns),
            )


class ModelStatistics:
    """The statistics of every model version served, by (name, version)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_version: dict[tuple[str, int], VersionStats] = {}

    def of(self, name: str, version: int) -> VersionStats:
        key = (name, version)
        stats = self._by_version.get(key)
        if stats is None:
            with self._lock:
                stats = self._by_version.get(key)
                if stats is None:
                    stats = VersionStats(name, version)
                    self._by_version = {**self._by_version, key: stats}
        return stats

    def keep(self, loaded: set[tuple[str, int]]) -> None:
        """Forget the versions no longer served (Triton drops an unloaded model's figures)."""
        with self._lock:
            if any(key not in loaded for key in self._by_version):
                self._by_version = {k: v for k, v in self._by_version.items() if k in loaded}
