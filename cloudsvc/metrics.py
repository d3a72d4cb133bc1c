"""The cloud's Prometheus endpoint: `/metrics` on a side port (off unless `metrics_port` is
set; on loopback unless `metrics_host` says otherwise).

Two kinds of figures. Events are counted as they happen, whether the endpoint is on or not
(a lock and a dict update per call): every RPC by method and status, with its duration,
from the one interceptor (edgefleet.core.rpc.CallGuard's `observe`), and each sync batch,
stored or refused, by `MeteredIngest`. State is read at scrape time from the stores:
devices by state, what each model version is desired on and running on, standing
deployments, jobs by state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import grpc
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

import edgefleet
from cloudsvc.drift import DriftMonitor
from cloudsvc.fleet import Fleet
from cloudsvc.ingest import Ingest
from cloudsvc.store.data import CAPTURES, TELEMETRY, DataStore
from cloudsvc.store.metadata import MetadataStore
from edgefleet.core.data import SyncAck
from edgefleet.core.errors import EdgefleetError, ErrorCode
from edgefleet.core.jobs import JobState
from edgefleet.core.metrics import (
    RPC_BUCKETS_S,
    MetricsEndpoint,
    SafeCollector,
    Tally,
    histogram,
    new_registry,
)
from edgefleet.core.rollouts import RolloutState
from protos.fleet.v1 import data_pb2

# Why a sync batch was refused, by the error's code (the message says which row and why).
REFUSALS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_ARGUMENT: "invalid",  # malformed, implausible or too large
    ErrorCode.PERMISSION_DENIED: "not_assigned",  # rows of a model the device never ran
    ErrorCode.FAILED_PRECONDITION: "out_of_sequence",  # a gap after the cloud's mark
}
JOB_STATES = tuple(s for s in JobState if s is not JobState.UNSPECIFIED)
ROLLOUT_STATES = tuple(s for s in RolloutState if s is not RolloutState.UNSPECIFIED)

_RPCS, _RPC_SECONDS = "rpcs", "rpc_seconds"
_BATCHES, _REFUSED, _ROWS, _STORED, _DUPLICATES, _BYTES = (
    "batches",
    "refused",
    "rows",
    "stored",
    "duplicates",
    "bytes",
)


class CloudMetrics(SafeCollector):
    """The cloud's counters, and its collector: what one CloudServer exports."""

    name = "cloud metrics"

    def __init__(
        self, fleet: Fleet, metadata: MetadataStore, *, drift: DriftMonitor | None = None
    ) -> None:
        self.fleet = fleet
        self.metadata = metadata
        self.drift_monitor = drift
        self.tally = Tally()

    # events -----------------------------------------------------------------------------
    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """CallGuard's observer: one call ended. `method` is a served method's full name (the
        guard never sees another), so the label values are bounded."""
        self.tally.add(_RPCS, (method, code.name))
        self.tally.observe(_RPC_SECONDS, (method,), seconds, RPC_BUCKETS_S)

    def batch_stored(self, request: data_pb2.SyncBatch, ack: SyncAck) -> None:
        tally = self.tally
        tally.add(_BATCHES)
        tally.add(_ROWS, (TELEMETRY,), len(request.telemetry))
        tally.add(_ROWS, (CAPTURES,), len(request.captures))
        tally.add(_STORED, (), ack.stored)
        tally.add(_DUPLICATES, (), ack.duplicates)
        tally.add(_BYTES, (), request.ByteSize())

    def batch_refused(self, err: EdgefleetError) -> None:
        self.tally.add(_REFUSED, (REFUSALS.get(err.code, err.code.name.lower()),))

    # the collector ----------------------------------------------------------------------
    def sections(self) -> Sequence[Callable[[], Iterator[Metric]]]:
        return (
            self.info,
            self.rpcs,
            self.ingest,
            self.devices,
            self.deployments,
            self.jobs,
            self.rollouts,
            self.drift,
        )

    def info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "edgefleet_cloud_info", "This cloud: edgefleet's version.", labels=("version",)
        )
        info.add_metric((edgefleet.__version__,), 1)
        yield info

    def rpcs(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "edgefleet_cloud_rpc_requests",
            "Calls to the cloud's services, by method and the status they ended with.",
            labels=("method", "code"),
        )
        for (method, code), n in sorted(self.tally.counts(_RPCS).items()):
            calls.add_metric((method, code), n)
        yield calls
        seconds = HistogramMetricFamily(
            "edgefleet_cloud_rpc_duration_seconds",
            "How long calls took, by method (for a stream, such as a watch or a chunk "
            "download: its lifetime).",
            labels=("method",),
        )
        for (method,), h in sorted(self.tally.histograms(_RPC_SECONDS).items()):
            histogram(seconds, (method,), h.bounds, h.counts, h.total)
        yield seconds

    def ingest(self) -> Iterator[Metric]:
        counts = self.tally.counts
        yield CounterMetricFamily(
            "edgefleet_cloud_sync_batches",
            "Sync batches from devices checked and stored.",
            value=counts(_BATCHES).get((), 0),
        )
        refused = CounterMetricFamily(
            "edgefleet_cloud_sync_refused",
            "Sync batches refused whole, by reason: invalid (malformed, implausible, too "
            "large), not_assigned (rows of a model version the device never ran), "
            "out_of_sequence (rows after a gap).",
            labels=("reason",),
        )
        found = counts(_REFUSED)
        for reason in sorted({*REFUSALS.values(), *(r for (r,) in found)}):
            refused.add_metric((reason,), found.get((reason,), 0))
        yield refused
        rows = CounterMetricFamily(
            "edgefleet_cloud_ingest_rows",
            "Rows in stored sync batches, per stream (resent ones included).",
            labels=("stream",),
        )
        received = counts(_ROWS)
        for stream in (TELEMETRY, CAPTURES):
            rows.add_metric((stream,), received.get((stream,), 0))
        yield rows
        yield CounterMetricFamily(
            "edgefleet_cloud_ingest_stored_rows",
            "Rows stored: each row a device sent, once.",
            value=counts(_STORED).get((), 0),
        )
        yield CounterMetricFamily(
            "edgefleet_cloud_ingest_duplicate_rows",
            "Rows a device sent again (its acknowledgement was lost), skipped.",
            value=counts(_DUPLICATES).get((), 0),
        )
        yield CounterMetricFamily(
            "edgefleet_cloud_ingest_bytes",
            "Bytes of stored sync batches.",
            value=counts(_BYTES).get((), 0),
        )

    def devices(self) -> Iterator[Metric]:
        states: Counter[str] = Counter()
        converged = 0
        versions: Counter[tuple[str, str, str]] = Counter()
        for device in self.fleet.devices():
            if device.revoked:
                states["revoked"] += 1
                continue
            states["online" if device.online else "offline"] += 1
            converged += int(device.converged)
            running = {m.model: m.active_version for m in device.models if m.active_version}
            for model, version in running.items():
                versions[(model, str(version), "running")] += 1
            for a in device.desired.assignments:
                versions[(a.model, str(a.version), "desired")] += 1
                if running.get(a.model) == a.version:
                    versions[(a.model, str(a.version), "converged")] += 1
        by_state = GaugeMetricFamily(
            "edgefleet_cloud_devices",
            "Enrolled devices by state: online (called within offline_after_s), offline, revoked.",
            labels=("state",),
        )
        for state in ("online", "offline", "revoked"):
            by_state.add_metric((state,), states[state])
        yield by_state
        yield GaugeMetricFamily(
            "edgefleet_cloud_devices_converged",
            "Devices (not revoked) that applied their desired state and run every desired version.",
            value=converged,
        )
        per_version = GaugeMetricFamily(
            "edgefleet_cloud_model_devices",
            "Devices (not revoked) per model version: desired (told to run it), running "
            "(report serving it), converged (both).",
            labels=("model", "version", "state"),
        )
        for labels, n in sorted(versions.items()):
            per_version.add_metric(labels, n)
        yield per_version

    def deployments(self) -> Iterator[Metric]:
        standing = Counter((d.model, str(d.version)) for d in self.fleet.deployments())
        family = GaugeMetricFamily(
            "edgefleet_cloud_deployments",
            "Standing deployments per model version (one per selector).",
            labels=("model", "version"),
        )
        for labels, n in sorted(standing.items()):
            family.add_metric(labels, n)
        yield family

    def jobs(self) -> Iterator[Metric]:
        states = Counter(j.state for j in self.metadata.list_jobs(limit=1_000_000))
        family = GaugeMetricFamily(
            "edgefleet_cloud_jobs",
            "Fine-tune and compile jobs by state.",
            labels=("state",),
        )
        for state in JOB_STATES:
            family.add_metric((state.value,), states[state])
        yield family

    def rollouts(self) -> Iterator[Metric]:
        found = self.metadata.list_rollouts()
        states = Counter(r.state for r in found)
        family = GaugeMetricFamily(
            "edgefleet_cloud_rollouts", "Rollouts by state.", labels=("state",)
        )
        for state in ROLLOUT_STATES:
            family.add_metric((state.value,), states[state])
        yield family
        # Devices of the rollouts under way, by phase as last stepped: what a dashboard
        # follows during a rollout (finished ones drop out).
        phases = GaugeMetricFamily(
            "edgefleet_cloud_rollout_devices",
            "Devices of each rollout not yet finished, by phase.",
            labels=("rollout", "model", "version", "phase"),
        )
        for r in found:
            if r.state.finished:
                continue
            counts = r.counts()
            for phase, n in counts.items():
                phases.add_metric((r.rollout_id, r.spec.model, str(r.spec.version), phase), n)
        yield phases

    def drift(self) -> Iterator[Metric]:
        if self.drift_monitor is None:
            return
        # The monitor's last check: what it computed anyway, read here without recomputing.
        gauge = GaugeMetricFamily(
            "edgefleet_drift_psi",
            "Largest PSI of a version's input channels against its training baseline over "
            "drift.window_s, per scope: fleet or device:<id> (scopes with enough values).",
            labels=("model", "version", "scope"),
        )
        for labels, value in sorted(self.drift_monitor.gauges().items()):
            gauge.add_metric(labels, value)
        yield gauge
        alerts = CounterMetricFamily(
            "edgefleet_drift_alerts",
            "Drift alerts raised (PSI reached drift.psi_threshold), per model, version, scope.",
            labels=("model", "version", "scope"),
        )
        for labels, n in sorted(self.drift_monitor.alert_counts().items()):
            alerts.add_metric(labels, n)
        yield alerts


class MeteredIngest(Ingest):
    """Ingest that counts what it stores and refuses."""

    def __init__(self, data: DataStore, metadata: MetadataStore, metrics: CloudMetrics) -> None:
        super().__init__(data, metadata)
        self.metrics = metrics

    def sync(self, device_id: str, request: data_pb2.SyncBatch) -> SyncAck:
        try:
            ack = super().sync(device_id, request)
        except EdgefleetError as err:
            self.metrics.batch_refused(err)
            raise
        self.metrics.batch_stored(request, ack)
        return ack


def serve_metrics(metrics: CloudMetrics, host: str, port: int) -> MetricsEndpoint:
    """Serve the cloud's metrics on host:port (0: a free port) until `stop()`."""
    registry = new_registry()
    registry.register(metrics)
    return MetricsEndpoint(registry, host, port)
