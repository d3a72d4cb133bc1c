"""A model's serving across the fleet, from the telemetry windows devices sent: per version,
requests, errors, latency quantiles from merged histograms, merged input statistics, the
device time attributed to it (what a device-hour price turns into a cost), and, for a shadow,
how often it agreed with the primary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from edgefleet.core.data import (
    InputStats,
    LatencyHistogram,
    TelemetryRecord,
    VersionTelemetry,
    merge_inputs,
)


def aggregate(records: Iterable[TelemetryRecord]) -> list[VersionTelemetry]:
    """Per (model, version), newest version first."""
    groups: dict[tuple[str, int], list[TelemetryRecord]] = {}
    for record in records:
        if record.model is not None:
            groups.setdefault((record.model.model, record.model.version), []).append(record)
    found = []
    for (model, version), rows in groups.items():
        latency = LatencyHistogram()
        inputs: dict[str, InputStats] = {}
        targets: Counter[str] = Counter()
        requests = errors = captured = compared = agreed = 0
        against: Counter[int] = Counter()
        busy = device_seconds = 0.0
        start, end = float("inf"), 0.0
        for record in rows:
            w = record.model
            assert w is not None
            latency = latency.merged(w.latency)
            inputs = merge_inputs(inputs, w.inputs)
            targets[w.target] += w.requests
            requests += w.requests
            errors += w.errors
            captured += w.captured
            compared += w.compared
            agreed += w.agreed
            if w.compared:
                against[w.compared_with] += w.compared
            busy += w.busy_seconds
            device_seconds += w.attributed_seconds
            start, end = min(start, w.start), max(end, w.end)
        found.append(
            VersionTelemetry(
                model=model,
                version=version,
                target=targets.most_common(1)[0][0] if targets else "",
                devices=len({r.device_id for r in rows}),
                requests=requests,
                errors=errors,
                span_seconds=max(0.0, end - start),
                p50_ms=latency.quantile(0.50),
                p95_ms=latency.quantile(0.95),
                p99_ms=latency.quantile(0.99),
                latency=latency,
                inputs=tuple(inputs[name] for name in sorted(inputs)),
                busy_seconds=busy,
                device_seconds=device_seconds,
                captured=captured,
                compared=compared,
                agreed=agreed,
                compared_with=against.most_common(1)[0][0] if against else 0,
            )
        )
    return sorted(found, key=lambda v: -v.version)
