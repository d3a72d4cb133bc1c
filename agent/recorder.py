"""What the agent records of the inferences it serves: captures (under each model's policy,
from the cloud's desired state) and telemetry windows (counts, errors, a latency histogram,
input statistics, busy time), written to the spool off the request's path.

The request's thread does only what must happen there: a random draw, the confidence of a
classifier's output when the policy asks for it, a few counters, and (for a captured
request, or up to `stats_per_second` requests a second per version) copying tensors or
summing them. Everything else, building rows and writing them to SQLite in batches, runs on
the recorder's own thread.

With inference worker processes (agent.inference.workers), each worker's recorder does the
request's part and hands what it counted and captured over (``hand_over``) to the agent's
own recorder (``take_over``), the only one with a thread and a spool.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import psutil

from agent.spool import CAPTURES, TELEMETRY, Spool
from edgefleet.core.data import (
    LATENCY_BOUNDS_MS,
    CapturePolicy,
    ChannelStats,
    DeviceWindow,
    InputStats,
    LatencyHistogram,
    ModelWindow,
    TelemetryRecord,
    channel_stats,
)
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import Assignment
from edgefleet.core.golden import tensor_set_bytes
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import data_pb2

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]


def top1_confidence(outputs: Sequence[Array]) -> float:
    """The lowest top-1 probability over a classifier's rows (its first 2-D float output,
    softmax applied where it is not one already); -1 when there is no such output."""
    for out in outputs:
        y = np.asarray(out)
        if y.dtype.kind != "f" or y.ndim != 2 or y.shape[1] < 2 or y.shape[0] == 0:
            continue
        y = y.astype(np.float64, copy=False)
        sums = y.sum(axis=1)
        if not (y.min() >= 0 and np.allclose(sums, 1.0, atol=1e-3)):
            shifted = np.exp(y - y.max(axis=1, keepdims=True))
            y = shifted / shifted.sum(axis=1, keepdims=True)
        return float(y.max(axis=1).min())
    return -1.0


@dataclass
class VersionTotals:
    """One model version's requests since the recorder started, never reset (what the
    Prometheus endpoint reads; agent.metrics)."""

    target: str = ""
    requests: int = 0  # errors included
    errors: int = 0
    captured: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    latency_sum_ms: float = 0.0


@dataclass
class _Window:
    """One model version's telemetry since the last flush."""

    model: str
    version: int
    target: str
    start: float
    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    latency_sum_ms: float = 0.0
    busy_seconds: float = 0.0
    captured: int = 0
    inputs: dict[str, tuple[ChannelStats, ...]] = field(default_factory=dict)
    edges: dict[str, tuple[float, ...]] = field(default_factory=dict)
    stats_second: int = 0
    stats_in_second: int = 0
    totals: VersionTotals = field(default_factory=VersionTotals)
    compared: int = 0
    agreed: int = 0
    compared_with: int = 0

    def add_stats(self, name: str, stats: tuple[ChannelStats, ...]) -> None:
        have = self.inputs.get(name)
        if have is None or len(have) != len(stats):
            self.inputs[name] = stats
        else:
            self.inputs[name] = tuple(a.merged(b) for a, b in zip(have, stats, strict=True))

    def window(self, end: float, attributed: float) -> ModelWindow:
        return ModelWindow(
            self.model,
            self.version,
            self.start,
            end,
            self.requests,
            self.errors,
            LatencyHistogram((), tuple(self.latency), self.latency_sum_ms),
            tuple(
                InputStats(name, stats, self.edges.get(name, ()))
                for name, stats in sorted(self.inputs.items())
            ),
            self.busy_seconds,
            self.captured,
            attributed,
            self.target,
            self.compared,
            self.agreed,
            self.compared_with,
        )


@dataclass(frozen=True)
class _Model:
    policy: CapturePolicy | None
    bins: Mapping[str, tuple[float, ...]]
    target: str


@dataclass
class RecorderStats:
    captured: int = 0
    dropped_queue_full: int = 0
    dropped_too_large: int = 0
    windows: int = 0


@dataclass(frozen=True)
class Handover:
    """What a worker process's recorder counted and captured since its last hand-over
    (agent.inference.workers): its open windows and queued captures, taken out of it, so that
    the control process's recorder, the only one that writes the spool, counts each request
    once. With the worker's CPU time since then and its memory, for the device window."""

    windows: tuple[_Window, ...] = ()
    captures: tuple[bytes, ...] = ()  # serialized data_pb2.Capture rows
    dropped_queue_full: int = 0
    dropped_too_large: int = 0
    cpu_seconds: float = 0.0
    rss: int = 0

    @property
    def empty(self) -> bool:
        return not (self.windows or self.captures or self.dropped_queue_full)


class Recorder:
    def __init__(
        self,
        spool: Spool,
        *,
        telemetry_interval_s: float = 60.0,
        stats_per_second: int = 20,
        max_row_bytes: int = 4 << 20,
        queue_rows: int = 10_000,
        flush_interval_s: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.telemetry_interval_s = telemetry_interval_s
        self.stats_per_second = stats_per_second
        self.max_row_bytes = max_row_bytes
        self.stats = RecorderStats()
        self._queue: deque[data_pb2.Capture] = deque()
        self._queue_rows = queue_rows
        self._flush_interval = flush_interval_s
        self._rng = rng or random.Random()
        self._models: dict[str, _Model] = {}
        self._windows: dict[tuple[str, int], _Window] = {}
        self._totals: dict[tuple[str, int], VersionTotals] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_flush = time.time()
        self._cpu_mark = _process_cpu()
        # A device window counts the captures evicted in it (the spool counts since it began).
        self._dropped_mark = spool.stats().captures_dropped
        # Worker processes (hand_over / take_over): what was handed over so far, their CPU
        # time not yet in a device window, and their memory by worker.
        self._handed = RecorderStats()
        self._taken_cpu = 0.0
        self._rss: dict[int, int] = {}

    # what the cloud asks for ------------------------------------------------------------
    def configure(self, assignments: Sequence[Assignment]) -> None:
        """The capture policy and input bins of each model, from the accepted desired state."""
        self._models = {
            a.model: _Model(a.capture, {b.input: tuple(b.edges) for b in a.bins}, a.target)
            for a in assignments
        }

    # on the request's thread ------------------------------------------------------------
    def observe(
        self,
        name: str,
        version: int,
        feeds: Mapping[str, Array],
        output_names: Sequence[str],
        outputs: Sequence[Array],
        started: float,
        *,
        request_id: str = "",
        label: str = "",
    ) -> None:
        """A request served: count it, and capture it if the model's policy says so."""
        now = time.time()
        elapsed = time.perf_counter() - started
        latency_ms = elapsed * 1000
        spec = self._models.get(name)
        with self._lock:
            window = self._window(name, version, spec, now)
            window.requests += 1
            window.busy_seconds += elapsed
            window.latency_sum_ms += latency_ms
            bucket = _bucket(latency_ms)
            window.latency[bucket] += 1
            totals = window.totals
            totals.requests += 1
            totals.latency[bucket] += 1
            totals.latency_sum_ms += latency_ms
            second = int(now)
            if window.stats_second != second:
                window.stats_second, window.stats_in_second = second, 0
            measure = window.stats_in_second < self.stats_per_second
            window.stats_in_second += int(measure)
        if measure:
            bins = spec.bins if spec else {}
            for input_name, array in feeds.items():
                stats = channel_stats(array, bins.get(input_name, ()))
                if stats:
                    with self._lock:
                        # The window open now: the one counted above may have been flushed
                        # meanwhile, and what is added to it after that would be lost.
                        window = self._window(name, version, spec, now)
                        window.add_stats(input_name, stats)
                        window.edges[input_name] = bins.get(input_name, ())
        policy = spec.policy if spec else None
        if policy is None or not policy.active:
            return
        sampled = policy.sample_rate > 0 and self._rng.random() < policy.sample_rate
        confidence = -1.0
        if policy.below_confidence > 0 or sampled:
            confidence = top1_confidence(outputs)
        low = 0 <= confidence < policy.below_confidence
        if not (sampled or low):
            return
        size = sum(int(np.asarray(a).nbytes) for a in (*feeds.values(), *outputs))
        if size > (policy.max_row_bytes or self.max_row_bytes):
            self.stats.dropped_too_large += 1
            return
        row = data_pb2.Capture(
            model=name,
            version=version,
            request_id=request_id[:256],
            at=now,
            latency_ms=latency_ms,
            inputs=tensor_set_bytes(dict(feeds)),
            outputs=tensor_set_bytes(dict(zip(output_names, outputs, strict=True))),
            label=label[:256],
            confidence=confidence,
            reason="low-confidence" if low else "sampled",
        )
        with self._lock:
            if len(self._queue) >= self._queue_rows:
                self.stats.dropped_queue_full += 1
                return
            self._queue.append(row)
            window = self._window(name, version, spec, now)  # as above: the open one
            window.captured += 1
            window.totals.captured += 1
            self.stats.captured += 1

    def shadowed(
        self, name: str, version: int, primary_version: int, started: float, agreed: bool
    ) -> None:
        """A shadow ran a copy of a request the primary answered: its latency counts in its
        own version's window, with the comparison. Its inputs are the primary's (counted
        there) and shadows capture nothing."""
        now = time.time()
        elapsed = time.perf_counter() - started
        latency_ms = elapsed * 1000
        bucket = _bucket(latency_ms)
        with self._lock:
            window = self._window(name, version, self._models.get(name), now)
            window.requests += 1
            window.busy_seconds += elapsed
            window.latency_sum_ms += latency_ms
            window.latency[bucket] += 1
            window.compared += 1
            window.agreed += int(agreed)
            window.compared_with = primary_version
            totals = window.totals
            totals.requests += 1
            totals.latency[bucket] += 1
            totals.latency_sum_ms += latency_ms

    def failed(self, name: str, version: int) -> None:
        now = time.time()
        with self._lock:
            window = self._window(name, version, self._models.get(name), now)
            window.requests += 1
            window.errors += 1
            window.totals.requests += 1
            window.totals.errors += 1

    def _window(self, name: str, version: int, spec: _Model | None, now: float) -> _Window:
        key = (name, version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(
                name, version, spec.target if spec else "", min(now, self._last_flush)
            )
            window.totals = self._totals.setdefault(key, VersionTotals())
            window.totals.target = window.totals.target or window.target
        return window

    def totals(self) -> dict[tuple[str, int], VersionTotals]:
        """A copy of each model version's totals since the start, by (model, version)."""
        with self._lock:
            return {k: replace(v, latency=list(v.latency)) for k, v in self._totals.items()}

    @property
    def queued(self) -> int:
        """Captures waiting for the recorder's thread to write them to the spool."""
        return len(self._queue)

    # worker processes (agent.inference.workers) ----------------------------------------
    def hand_over(self) -> Handover:
        """Take the open windows and queued captures out of this recorder (a worker
        process's, whose thread is never started): what was counted since the last call."""
        with self._lock:
            windows = tuple(replace(w, totals=VersionTotals()) for w in self._windows.values())
            self._windows = {}
            rows = tuple(row.SerializeToString() for row in self._queue)
            self._queue.clear()
        now, then = replace(self.stats), self._handed
        self._handed = now
        return Handover(
            windows,
            rows,
            now.dropped_queue_full - then.dropped_queue_full,
            now.dropped_too_large - then.dropped_too_large,
        )

    def take_over(self, handover: Handover, source: int = 0) -> None:
        """Add a worker's hand-over (`source`: the worker's number) to the open windows and
        the capture queue, as if its requests had been observed here."""
        now = time.time()
        rows = [data_pb2.Capture.FromString(raw) for raw in handover.captures]
        with self._lock:
            self._taken_cpu += handover.cpu_seconds
            if handover.rss:
                self._rss[source] = handover.rss
            for w in handover.windows:
                mine = self._window(w.model, w.version, self._models.get(w.model), now)
                totals = mine.totals
                mine.requests += w.requests
                mine.errors += w.errors
                mine.busy_seconds += w.busy_seconds
                mine.latency_sum_ms += w.latency_sum_ms
                mine.captured += w.captured
                for i, n in enumerate(w.latency):
                    mine.latency[i] += n
                    totals.latency[i] += n
                totals.requests += w.requests
                totals.errors += w.errors
                totals.captured += w.captured
                totals.latency_sum_ms += w.latency_sum_ms
                for name, stats in w.inputs.items():
                    mine.add_stats(name, stats)
                    mine.edges[name] = w.edges.get(name, ())
                if w.compared:
                    mine.compared += w.compared
                    mine.agreed += w.agreed
                    mine.compared_with = w.compared_with
            self.stats.dropped_queue_full += handover.dropped_queue_full
            self.stats.dropped_too_large += handover.dropped_too_large
            for row in rows:
                if len(self._queue) >= self._queue_rows:
                    self.stats.dropped_queue_full += 1
                    window = self._window(row.model, row.version, self._models.get(row.model), now)
                    window.captured -= 1
                    window.totals.captured -= 1
                    continue
                self._queue.append(row)
                self.stats.captured += 1

    def forget(self, source: int) -> None:
        """A worker is gone: its memory no longer counts in the device window."""
        with self._lock:
            self._rss.pop(source, None)

    # on the recorder's thread -----------------------------------------------------------
    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, name="edgefleet-recorder", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # Windows shorter than the write interval are honoured too.
        while not self._stop.wait(min(self._flush_interval, self.telemetry_interval_s)):
            try:
                self.write_captures()
                if time.time() - self._last_flush >= self.telemetry_interval_s:
                    self.flush_telemetry()
            except EdgefleetError as err:
                log.warning("recording: %s", err.message)
            except Exception:
                log.exception("recording failed; serving is not affected")

    def write_captures(self) -> int:
        with self._lock:
            rows = list(self._queue)
            self._queue.clear()
        if rows:
            self.spool.append(CAPTURES, rows)
        return len(rows)

    def flush_telemetry(self) -> int:
        """Close the current windows: one row per model version served, one for the
        device; returns how many rows."""
        now = time.time()
        with self._lock:
            windows = list(self._windows.values())
            self._windows = {}
            start, self._last_flush = self._last_flush, now
            taken, self._taken_cpu = self._taken_cpu, 0.0
            workers_rss = sum(self._rss.values())
        cpu = _process_cpu()
        cpu_seconds, self._cpu_mark = cpu - self._cpu_mark + taken, cpu
        busy = sum(w.busy_seconds for w in windows)
        requests = sum(w.requests for w in windows)
        span = now - start
        records = []
        for w in windows:
            share = (
                w.busy_seconds / busy if busy > 0 else (w.requests / requests if requests else 0)
            )
            records.append(TelemetryRecord(0, model=w.window(now, span * share)))
        device = self._device_window(start, now, cpu_seconds, workers_rss)
        records.append(TelemetryRecord(0, device=device))
        self.spool.append(TELEMETRY, [to_proto(r, data_pb2.TelemetryRecord) for r in records])
        self.stats.windows += len(records)
        return len(records)

    def _device_window(
        self, start: float, end: float, cpu_seconds: float, workers_rss: int = 0
    ) -> DeviceWindow:
        spool = self.spool.stats()
        dropped = spool.captures_dropped - self._dropped_mark
        self._dropped_mark = spool.captures_dropped
        memory = psutil.virtual_memory()
        return DeviceWindow(
            start,
            end,
            cpu_seconds,
            os.cpu_count() or 1,
            int(psutil.Process().memory_info().rss) + workers_rss,
            int(memory.available),
            -1.0,
            spool.bytes,
            spool.captures_pending,
            dropped,
        )

    def stop(self) -> None:
        """Write what is queued and the open telemetry windows, then stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.write_captures()
            self.flush_telemetry()
        except EdgefleetError as err:
            log.warning("recording at stop: %s", err.message)


def _bucket(latency_ms: float) -> int:
    return bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system
