"""The agent's Prometheus endpoint: `/metrics` on a side port (off unless `metrics_port` is
set; on loopback unless `metrics_host` says otherwise).

Everything is read at scrape time from what the agent keeps anyway: the recorder's totals
per model version (requests, errors, captures, a latency histogram), the spool's and the
syncer's figures, the chunk store's transfer counts, the reconciler's counters and report,
and what the repository serves. Nothing is added to the request path but the recorder's
few integer additions, made whether metrics are on or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

import edgefleet
from agent.inference.limits import MemoryStats
from agent.inference.workers import WorkerFigures
from agent.reconciler import Reconciler
from agent.recorder import Recorder
from agent.runtime import ModelRepository
from agent.spool import CAPTURES, TELEMETRY, Spool
from agent.sync import Syncer
from edgefleet.core.data import LATENCY_BOUNDS_MS
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import ModelPhase
from edgefleet.core.metrics import MetricsEndpoint, SafeCollector, histogram, new_registry

VERSION_LABELS = ("model", "version", "target")


class AgentCollector(SafeCollector):
    """The agent's metrics, read from its parts at each scrape."""

    name = "agent metrics"

    def __init__(
        self,
        *,
        repository: ModelRepository,
        reconciler: Reconciler,
        recorder: Recorder,
        spool: Spool,
        syncer: Callable[[], Syncer | None],
        memory: Callable[[], MemoryStats],
        device_id: Callable[[], str],
        workers: Callable[[], WorkerFigures] | None = None,
    ) -> None:
        self.repository = repository
        self.workers = workers
        self.reconciler = reconciler
        self.recorder = recorder
        self.spool = spool
        self.syncer = syncer
        self.memory = memory
        self.device_id = device_id

    def sections(self) -> Sequence[Callable[[], Iterator[Metric]]]:
        return (
            self.agent,
            self.inference,
            self.inference_workers,
            self.capture,
            self.spool_metrics,
            self.sync,
            self.downloads,
            self.convergence,
        )

    def agent(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "edgefleet_agent_info",
            "This agent: its device id (empty until enrolled) and edgefleet's version.",
            labels=("device_id", "edgefleet_version"),
        )
        info.add_metric((self.device_id(), edgefleet.__version__), 1)
        yield info

    def inference(self) -> Iterator[Metric]:
        totals = sorted(self.recorder.totals().items())
        requests = CounterMetricFamily(
            "edgefleet_inference_requests",
            "Inference requests served per model version, failed ones included.",
            labels=VERSION_LABELS,
        )
        errors = CounterMetricFamily(
            "edgefleet_inference_errors",
            "Inference requests per model version that failed (bad input, a runtime error).",
            labels=VERSION_LABELS,
        )
        latency = HistogramMetricFamily(
            "edgefleet_inference_latency_seconds",
            "Time to serve a successful inference request, decoding to response, per model "
            "version.",
            labels=VERSION_LABELS,
        )
        captured = CounterMetricFamily(
            "edgefleet_inference_captured",
            "Inference requests captured for the cloud (under the model's capture policy).",
            labels=VERSION_LABELS,
        )
        for (model, version), t in totals:
            labels = (model, str(version), t.target)
            requests.add_metric(labels, t.requests)
            errors.add_metric(labels, t.errors)
            captured.add_metric(labels, t.captured)
            histogram(latency, labels, LATENCY_BOUNDS_MS, t.latency, t.latency_sum_ms / 1000, 1000)
        yield from (requests, errors, latency, captured)
        memory = self.memory()
        yield CounterMetricFamily(
            "edgefleet_inference_large_requests",
            "Requests over 1 MiB served (a few at a time, so memory stays bounded).",
            value=memory.large_requests,
        )
        yield CounterMetricFamily(
            "edgefleet_inference_refused_too_large",
            "Requests refused before parsing because they exceed their model's size limit.",
            value=memory.refused_over_limit,
        )
        loaded = GaugeMetricFamily(
            "edgefleet_model_loaded",
            "1 for each model version loaded for serving, with its execution provider.",
            labels=("model", "version", "provider"),
        )
        serving = GaugeMetricFamily(
            "edgefleet_model_serving_version",
            "The version requests without a version get, per model.",
            labels=("model",),
        )
        for name in self.repository.names():
            try:
                default = self.repository.default_version(name)
                models = [self.repository.get(name, v) for v in self.repository.versions(name)]
            except EdgefleetError:  # retired between the two reads
                continue
            serving.add_metric((name,), default)
            for m in models:
                loaded.add_metric((name, str(m.version), m.execution_provider), 1)
        yield from (loaded, serving)

    def inference_workers(self) -> Iterator[Metric]:
        """With inference_workers > 1: how many serve, how often one was restarted, and
        the requests each answered (from the statistics they share)."""
        if self.workers is None:
            return
        figures = self.workers()
        yield GaugeMetricFamily(
            "edgefleet_agent_inference_workers",
            "Inference worker processes serving (inference_workers configured; fewer while "
            "one restarts).",
            value=figures.serving,
        )
        yield CounterMetricFamily(
            "edgefleet_agent_inference_worker_restarts",
            "Inference worker processes that ended unasked and were started again.",
            value=figures.restarts,
        )
        requests = CounterMetricFamily(
            "edgefleet_inference_worker_requests",
            "Inference requests each worker process answered or failed (its restarts "
            "included), every model.",
            labels=("worker",),
        )
        for worker in figures.workers:
            requests.add_metric((str(worker.index),), worker.requests)
        yield requests

    def capture(self) -> Iterator[Metric]:
        stats = self.recorder.stats
        yield GaugeMetricFamily(
            "edgefleet_capture_queue_rows",
            "Captured requests waiting to be written to the spool.",
            value=self.recorder.queued,
        )
        dropped = CounterMetricFamily(
            "edgefleet_capture_dropped",
            "Captures not kept: the queue to the spool was full, or the row was over its "
            "size limit.",
            labels=("reason",),
        )
        dropped.add_metric(("queue_full",), stats.dropped_queue_full)
        dropped.add_metric(("too_large",), stats.dropped_too_large)
        yield dropped
        yield CounterMetricFamily(
            "edgefleet_telemetry_windows",
            "Telemetry rows written to the spool (one per model version and one for the "
            "device, per window).",
            value=stats.windows,
        )

    def spool_metrics(self) -> Iterator[Metric]:
        stats = self.spool.stats()
        yield GaugeMetricFamily(
            "edgefleet_spool_bytes", "Disk the spool takes (database and WAL).", value=stats.bytes
        )
        yield GaugeMetricFamily(
            "edgefleet_spool_budget_bytes",
            "Most disk the spool may take (0: no limit).",
            value=self.spool.budget_bytes,
        )
        pending = GaugeMetricFamily(
            "edgefleet_spool_pending_rows",
            "Rows in the spool the cloud has not acknowledged yet, per stream.",
            labels=("stream",),
        )
        pending.add_metric((TELEMETRY,), stats.telemetry_pending)
        pending.add_metric((CAPTURES,), stats.captures_pending)
        yield pending
        yield CounterMetricFamily(
            "edgefleet_spool_captures_written",
            "Captures written to the spool since it was made.",
            value=stats.captures_written,
        )
        yield CounterMetricFamily(
            "edgefleet_spool_captures_evicted",
            "Unsynced captures evicted, oldest first, to keep the spool in its budget (since "
            "the spool was made).",
            value=stats.captures_dropped,
        )

    def sync(self) -> Iterator[Metric]:
        syncer = self.syncer()
        if syncer is None:  # started without reconciling: nothing is sent
            return
        stats = syncer.stats
        yield CounterMetricFamily(
            "edgefleet_sync_batches", "Sync batches the cloud acknowledged.", value=stats.batches
        )
        yield CounterMetricFamily(
            "edgefleet_sync_rows",
            "Spool rows (telemetry and captures) sent in acknowledged batches.",
            value=stats.rows,
        )
        yield CounterMetricFamily(
            "edgefleet_sync_bytes", "Bytes of acknowledged sync batches.", value=stats.bytes
        )
        yield CounterMetricFamily(
            "edgefleet_sync_failures",
            "Sync passes that failed (cloud unreachable, a batch refused).",
            value=stats.failures,
        )
        yield GaugeMetricFamily(
            "edgefleet_sync_last_success_timestamp_seconds",
            "When a sync pass last succeeded, sending all it had (Unix time; 0: never).",
            value=stats.last_success_at,
        )

    def downloads(self) -> Iterator[Metric]:
        stats = self.reconciler.chunks.stats
        for name, help_, value in (
            (
                "edgefleet_download_fetched_bytes",
                "Artifact bytes downloaded from the cloud.",
                stats.bytes_fetched,
            ),
            (
                "edgefleet_download_resumed_bytes",
                "Artifact bytes not downloaded again: a partial chunk resumed where it stopped.",
                stats.bytes_resumed,
            ),
            (
                "edgefleet_download_skipped_bytes",
                "Artifact bytes not downloaded: chunks already held (shared with another version).",
                stats.bytes_skipped,
            ),
            (
                "edgefleet_download_manifest_bytes",
                "Signed manifests' bytes as they travelled (compressed).",
                stats.manifest_bytes,
            ),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        chunks = CounterMetricFamily(
            "edgefleet_download_chunks",
            "Artifact chunks downloaded (fetched) or found already held (skipped).",
            labels=("outcome",),
        )
        chunks.add_metric(("fetched",), stats.chunks_fetched)
        chunks.add_metric(("skipped",), stats.chunks_skipped)
        yield chunks

    def convergence(self) -> Iterator[Metric]:
        counters = self.reconciler.counters
        for name, help_, value in (
            ("edgefleet_reconcile_passes", "Reconcile passes run.", counters.passes),
            (
                "edgefleet_reconcile_failed_passes",
                "Reconcile passes that did not converge.",
                counters.failed_passes,
            ),
            (
                "edgefleet_model_activations",
                "Model versions activated (downloaded, verified, loaded, smoke-tested, switched).",
                counters.activations,
            ),
            (
                "edgefleet_model_rejections",
                "Model versions refused (verification, signature, load or smoke test failed).",
                counters.rejections,
            ),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        report = self.reconciler.build_report()
        yield GaugeMetricFamily(
            "edgefleet_observed_generation",
            "The desired-state generation this device last applied.",
            value=report.observed_generation,
        )
        yield GaugeMetricFamily(
            "edgefleet_device_error",
            "1 while the device has an error of its own to report (the cloud unreachable, a "
            "credential refused, a download failing).",
            value=1 if report.last_error else 0,
        )
        desired = GaugeMetricFamily(
            "edgefleet_model_desired_version",
            "The version the cloud wants this device to serve, per model.",
            labels=("model",),
        )
        phase = GaugeMetricFamily(
            "edgefleet_model_phase",
            "1 for the phase each model is in (downloading, activating, ready, failed).",
            labels=("model", "phase"),
        )
        converged = GaugeMetricFamily(
            "edgefleet_model_converged",
            "1 when the model serves its desired version (the version label), ready.",
            labels=("model", "version"),
        )
        # Never given a desired state: not converged to anything yet.
        everything = int(report.observed_generation > 0)
        for m in report.models:
            desired.add_metric((m.model,), m.desired_version)
            for p in ModelPhase:
                if p is not ModelPhase.UNSPECIFIED:
                    phase.add_metric((m.model, p.value), int(m.phase == p))
            done = m.phase == ModelPhase.READY and m.active_version == m.desired_version
            everything &= int(done)
            converged.add_metric((m.model, str(m.desired_version)), int(done))
        yield from (desired, phase, converged)
        yield GaugeMetricFamily(
            "edgefleet_converged",
            "1 when every model the device was given serves its desired version.",
            value=everything,
        )


def serve_metrics(
    *,
    host: str,
    port: int,
    repository: ModelRepository,
    reconciler: Reconciler,
    recorder: Recorder,
    spool: Spool,
    syncer: Callable[[], Syncer | None],
    memory: Callable[[], MemoryStats],
    device_id: Callable[[], str],
    workers: Callable[[], WorkerFigures] | None = None,
) -> MetricsEndpoint:
    """Serve the agent's metrics on host:port (0: a free port) until `stop()`."""
    registry = new_registry()
    registry.register(
        AgentCollector(
            repository=repository,
            reconciler=reconciler,
            recorder=recorder,
            spool=spool,
            syncer=syncer,
            memory=memory,
            device_id=device_id,
            workers=workers,
        )
    )
    return MetricsEndpoint(registry, host, port)
