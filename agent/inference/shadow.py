"""Shadow inference: after the primary version answered a request, the same inputs run on a
shadow version, off the request's path, and its outputs are compared with the primary's and
dropped. A bounded queue and one worker thread: when the shadow cannot keep up, requests are
skipped (and counted), never queued without end, and never slow the primary's answers beyond
the CPU the shadow takes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from agent.recorder import Recorder
from agent.runtime import LoadedModel

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]

# Non-classifier outputs agree when close at these tolerances (fp32 vs int8 builds of one
# version differ by far less; different weights by far more).
RTOL = 1e-3
ATOL = 1e-4


def agree(primary: Sequence[Array], shadow: Sequence[Array]) -> bool:
    """Whether the shadow gave the primary's answer: the same top-1 class in every row for a
    classifier (a float first output whose last axis holds two or more scores), else every
    output close (rtol 1e-3, atol 1e-4). Different shapes never agree."""
    if len(primary) != len(shadow) or not primary:
        return False
    first, other = np.asarray(primary[0]), np.asarray(shadow[0])
    if first.shape != other.shape:
        return False
    if first.dtype.kind == "f" and first.ndim >= 2 and first.shape[-1] >= 2:
        return bool(np.array_equal(first.argmax(axis=-1), other.argmax(axis=-1)))
    for a, b in zip(primary, shadow, strict=True):
        x, y = np.asarray(a), np.asarray(b)
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc" or y.dtype.kind in "fc":
            if not np.allclose(x, y, rtol=RTOL, atol=ATOL):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


@dataclass
class ShadowStats:
    queued: int = 0
    run: int = 0
    skipped: int = 0  # the queue was full
    failed: int = 0
    compared: int = 0
    agreed: int = 0


@dataclass(frozen=True)
class _Job:
    shadow: LoadedModel
    primary_version: int
    feeds: Mapping[str, Array]
    output_names: tuple[str, ...]
    primary_outputs: Sequence[Array]


class ShadowRunner:
    """Runs shadow copies of requests on its own thread; `submit` never blocks."""

    def __init__(self, recorder: Recorder | None = None, *, queue_size: int = 64) -> None:
        self._recorder = recorder
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.stats = ShadowStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="edgefleet-shadow", daemon=True)
        self._thread.start()

    def submit(
        self,
        shadow: LoadedModel,
        primary_version: int,
        feeds: Mapping[str, Array],
        output_names: Sequence[str],
        primary_outputs: Sequence[Array],
    ) -> bool:
        """Queue a copy of a served request for the shadow; False (counted) when full."""
        job = _Job(shadow, primary_version, feeds, tuple(output_names), primary_outputs)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.stats.skipped += 1
            return False
        with self._lock:
            self.stats.queued += 1
        return True

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._one(job)
            except Exception:  # the shadow must never take the server down
                log.exception("shadow run of %s v%d failed", job.shadow.name, job.shadow.version)

    def _one(self, job: _Job) -> None:
        shadow, recorder = job.shadow, self._recorder
        started = time.perf_counter()
        try:
            outputs = shadow.run(dict(job.feeds), job.output_names)
        except Exception as err:  # a shadow that fails is counted, whatever it raised
            with self._lock:
                self.stats.failed += 1
            if recorder is not None:
                recorder.failed(shadow.name, shadow.version)
            if not isinstance(err, AgentError):
                log.warning("shadow %s v%d: %s", shadow.name, shadow.version, err)
            return
        same = agree(job.primary_outputs, outputs)
        with self._lock:
            self.stats.run += 1
            self.stats.compared += 1
            self.stats.agreed += int(same)
        if recorder is not None:
            recorder.shadowed(shadow.name, shadow.version, job.primary_version, started, same)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued copy ran (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                s = self.stats
                if s.run + s.failed >= s.queued:
                    return True
            time.sleep(0.005)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the copies queued so far; the thread is a daemon, so a shadow stuck in
        a long run does not hold the process."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
