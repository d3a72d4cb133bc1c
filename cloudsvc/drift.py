"""Drift: how far devices' inputs moved from what a version was trained on.

A fine-tuned version keeps its training inputs' statistics (`ModelVersion.baseline`: per
input and channel, a histogram in fixed bins `edges`, with an underflow and an overflow
bucket). Devices count their own inputs in the same bins in every telemetry window, so the
cloud compares like with like:

- **PSI** (population stability index) per channel, between the baseline's histogram and
  the summed histograms of a device's windows in the time window (and of every device's,
  for the fleet): sum over bins of (a - e) * ln(a / e), with a and e the device's and the
  baseline's proportions. A bin empty on one side counts as EPSILON (1e-4) of it, so one
  empty bin gives a large but finite PSI; proportions are not renormalised after that (the
  error is at most EPSILON per bin). A scope's PSI is its largest channel's.
- **KS** per channel where raw values exist: the baseline has no raw samples, only its
  histogram, so sampled captures' values (reason "sampled": random, where low-confidence
  captures would be biased towards hard inputs) are compared with the baseline
  histogram's CDF, linear within each bin, with the underflow and overflow masses at the
  outer edges (those buckets have no width to spread them over). The statistic is the
  exact supremum against that CDF; the p-value is the one-sample Kolmogorov distribution's
  (scipy's `kstwo` when installed, else the asymptotic series with Stephens' correction).
  It assumes independent values, which pixels of one image are not: read the statistic as
  the effect size and the p-value as optimistic.

`DriftMonitor` checks every baselined version every `drift.interval_s` over the last
`drift.window_s` and alerts once per (model, version, device or fleet) while its PSI stays
at or over `drift.psi_threshold`: a WARNING log line, the metrics, a webhook POST, and each
subscriber's callback (the closed loop subscribes there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

import edgefleet
from cloudsvc.errors import InvalidRequest, NotReady, UnknownResource
from cloudsvc.registry import check_name
from cloudsvc.settings import DriftSettings
from cloudsvc.store.data import CaptureQuery, DataStore
from cloudsvc.store.metadata import MetadataStore
from edgefleet.core.data import (
    NO_DATA,
    TOO_FEW,
    ChannelDrift,
    ChannelStats,
    DriftAlert,
    DriftReport,
    DriftScope,
    InputStats,
    ModelWindow,
    TelemetryRecord,
    VersionDrift,
    channel_rows,
    psi_verdict,
)
from edgefleet.core.golden import tensors_from_bytes
from edgefleet.core.versions import ModelVersion
from edgefleet.core.wire import to_jsonable

log = logging.getLogger(__name__)

EPSILON = 1e-4  # the proportion an empty bin counts as (PSI's ln(0) otherwise)
SAMPLED = "sampled"  # the capture reason of random samples (agent/recorder.py)
KS_MAX_VALUES = 20_000  # values per channel and scope the KS test reads at most
DEVICE_CHANNELS = 16  # a device row keeps its worst channels; the fleet row keeps them all
MAX_WINDOW_S = 366 * 86_400

Subscriber = Callable[[DriftAlert], None]


# the arithmetic ---------------------------------------------------------------------------


def psi(expected: Sequence[int], actual: Sequence[int]) -> float:
    """Population stability index of `actual` counts against `expected` ones in the same
    bins (0.0 when either side is empty: nothing to compare)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"histograms of {len(e)} and {len(a)} bins cannot be compared")
    e_total, a_total = e.sum(), a.sum()
    if e_total <= 0 or a_total <= 0:
        return 0.0
    e = np.maximum(e / e_total, EPSILON)
    a = np.maximum(a / a_total, EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def _histogram_cdf(
    edges: Sequence[float], counts: Sequence[int]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The edges and the baseline CDF's value at each (right limit at the first edge: the
    underflow mass; left limit at the last: one less the overflow mass)."""
    e = np.asarray(edges, dtype=np.float64)
    h = np.asarray(counts, dtype=np.float64)
    total = h.sum()
    inner = np.concatenate(([0.0], np.cumsum(h[1:-1])))
    return e, (h[0] + inner) / total


def ks_statistic(
    values: npt.NDArray[np.float64], edges: Sequence[float], counts: Sequence[int]
) -> float:
    """sup |Fn - F0|: Fn the values' empirical CDF, F0 the histogram's CDF (linear within
    bins, under- and overflow at the outer edges). Between consecutive values and edges
    both are monotone and Fn is constant, so the supremum is at one of them, from the left
    or the right: evaluating both limits there is exact."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    if not n:
        return 0.0
    e, cum = _histogram_cdf(edges, counts)
    points = np.unique(np.concatenate((x, e)))
    inside = np.interp(points, e, cum)
    f0_at = np.where(points < e[0], 0.0, np.where(points >= e[-1], 1.0, inside))
    f0_before = np.where(points <= e[0], 0.0, np.where(points > e[-1], 1.0, inside))
    fn_at = np.searchsorted(x, points, side="right") / n
    fn_before = np.searchsorted(x, points, side="left") / n
    return float(max(np.max(np.abs(fn_at - f0_at)), np.max(np.abs(fn_before - f0_before))))


def kolmogorov_sf(d: float, n: int) -> float:
    """P(D_n >= d) for the one-sample statistic of n values against a known continuous
    CDF: scipy's exact `kstwo` when installed, else Kolmogorov's asymptotic series with
    Stephens' small-sample correction (Numerical Recipes' `probks`)."""
    if n <= 0:
        return 1.0
    try:
        from scipy.stats import kstwo  # type: ignore[import-untyped]
    except ImportError:
        return kolmogorov_asymptotic(d, n)
    return float(min(1.0, max(0.0, kstwo.sf(d, n))))


def kolmogorov_asymptotic(d: float, n: int) -> float:
    root = math.sqrt(n)
    lam = (root + 0.12 + 0.11 / root) * d
    if lam < 0.2:  # the series converges slowly there, towards 1
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2.0 * (-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return min(1.0, max(0.0, total))


# one version ------------------------------------------------------------------------------


def _same_edges(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-9, atol=0.0))


def _usable(baseline: InputStats) -> bool:
    bins = len(baseline.edges) + 1
    return len(baseline.edges) >= 1 and all(
        len(c.histogram) == bins and sum(c.histogram) > 0 for c in baseline.channels
    )


@dataclass
class _Channel:
    histogram: npt.NDArray[np.int64]
    stats: ChannelStats = field(default_factory=ChannelStats)


Key = tuple[str, int]  # (input, channel)
Samples = Mapping[Key, npt.NDArray[np.float64]]


def scope_drift(
    baseline: Sequence[InputStats],
    windows: Iterable[ModelWindow],
    *,
    device_id: str = "",
    min_count: int = 1,
    samples: Samples | None = None,
    keep: int = 0,
) -> DriftScope:
    """Drift of `windows` (one device's, or many merged) against `baseline`. Only windows
    counted in the baseline's own edges are compared (a window binned otherwise, or with a
    histogram of the wrong size, would compare unlike bins); `keep` > 0 keeps that many of
    the worst channels."""
    inputs = {b.input: b for b in baseline if _usable(b)}
    channels: dict[Key, _Channel] = {
        (b.input, i): _Channel(np.zeros(len(b.edges) + 1, dtype=np.int64))
        for b in inputs.values()
        for i in range(len(b.channels))
    }
    count = 0
    for w in windows:
        count += 1
        for stats in w.inputs:
            base = inputs.get(stats.input)
            if base is None or not _same_edges(stats.edges, base.edges):
                continue
            for i, c in enumerate(stats.channels[: len(base.channels)]):
                if len(c.histogram) != len(base.edges) + 1:
                    continue
                acc = channels[(stats.input, i)]
                acc.histogram += np.asarray(c.histogram, dtype=np.int64)
                acc.stats = acc.stats.merged(replace(c, histogram=()))
    found = []
    for (name, i), acc in channels.items():
        base_channel = inputs[name].channels[i]
        values = samples.get((name, i)) if samples else None
        ks = p = -1.0
        if values is not None and len(values):
            ks = ks_statistic(values, inputs[name].edges, base_channel.histogram)
            p = kolmogorov_sf(ks, len(values))
        found.append(
            ChannelDrift(
                input=name,
                channel=i,
                psi=psi(base_channel.histogram, acc.histogram.tolist()),
                count=int(acc.histogram.sum()),
                mean=acc.stats.mean,
                baseline_mean=base_channel.mean,
                ks=ks,
                ks_pvalue=p,
                ks_samples=0 if values is None else len(values),
            )
        )
    found.sort(key=lambda c: (-c.psi, c.input, c.channel))
    judged = [c for c in found if c.count >= min_count] or [c for c in found if c.count]
    worst = max((c.psi for c in judged), default=0.0)
    most = max((c.count for c in found), default=0)
    return DriftScope(
        device_id=device_id,
        windows=count,
        psi=worst,
        verdict=psi_verdict(worst, most, min_count),
        channels=tuple(found[:keep] if keep > 0 else found),
    )


def sampled_values(
    baseline: Sequence[InputStats], captures: Iterable[bytes], per_capture: int, seed: int = 0
) -> dict[Key, npt.NDArray[np.float64]]:
    """Values per (input, channel) of captured input tensor sets, split into channels as
    telemetry splits them, at most `per_capture` of each channel from each capture (drawn
    at random, reproducibly) so that one large image cannot outweigh the rest."""
    shapes = {b.input: len(b.channels) for b in baseline if _usable(b)}
    found: dict[Key, list[npt.NDArray[np.float64]]] = {}
    rng = np.random.default_rng(seed)
    for raw in captures:
        try:
            arrays = tensors_from_bytes(raw)
        except Exception:  # a device's bytes: one that does not parse is skipped, not fatal
            continue
        for name, array in arrays.items():
            if name not in shapes:
                continue
            rows = channel_rows(array)
            if rows is None or rows.shape[0] != shapes[name]:
                continue
            for i, row in enumerate(rows):
                row = row[np.isfinite(row)]
                if len(row) > per_capture:
                    row = rng.choice(row, per_capture, replace=False)
                found.setdefault((name, i), []).append(row)
    return {k: np.concatenate(v) for k, v in found.items()}


def version_drift(
    version: ModelVersion,
    records: Iterable[TelemetryRecord],
    *,
    min_count: int = 1,
    samples: Mapping[str, Samples] | None = None,
) -> VersionDrift:
    """One version's drift per device (worst first) and for the fleet; `samples` by device."""
    by_device: dict[str, list[ModelWindow]] = {}
    for record in records:
        w = record.model
        if w is not None and w.model == version.model and w.version == version.version:
            by_device.setdefault(record.device_id, []).append(w)
    samples = samples or {}
    devices = [
        scope_drift(
            version.baseline,
            windows,
            device_id=device_id,
            min_count=min_count,
            samples=samples.get(device_id),
            keep=DEVICE_CHANNELS,
        )
        for device_id, windows in by_device.items()
    ]
    pooled: dict[Key, npt.NDArray[np.float64]] = {}
    for per_device in samples.values():
        for key, values in per_device.items():
            pooled[key] = np.concatenate((pooled[key], values)) if key in pooled else values
    fleet = scope_drift(
        version.baseline,
        (w for windows in by_device.values() for w in windows),
        min_count=min_count,
        samples=pooled,
    )
    devices.sort(key=lambda d: (-d.psi, d.device_id))
    return VersionDrift(version.model, version.version, fleet, tuple(devices))


# the monitor ------------------------------------------------------------------------------


AlertKey = tuple[str, int, str]  # (model, version, device id or "" for the fleet)


class DriftMonitor:
    """Drift of every baselined version, on demand (`report`) and every `interval_s` on
    its own thread (`start`/`stop`), alerting once per scope until it clears."""

    def __init__(
        self,
        metadata: MetadataStore,
        data: DataStore,
        settings: DriftSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metadata = metadata
        self.data = data
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._active: dict[AlertKey, DriftAlert] = {}
        self._psi: dict[tuple[str, str, str], float] = {}
        self._alerts: Counter[tuple[str, str, str]] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.webhook: Webhook | None = None
        if settings.webhook_url is not None:
            self.webhook = Webhook(
                settings.webhook_url.get_secret_value(),
                insecure=settings.webhook_insecure,
                timeout_s=settings.webhook_timeout_s,
                retries=settings.webhook_retries,
            )
            self.subscribe(self.webhook.send)

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(alert)` for each new alert, on the monitor's thread, in the order
        subscribed. It should return quickly (hand slow work to a thread of its own); what
        it raises is logged and does not stop the others."""
        with self._lock:
            self._subscribers.append(callback)

    # reading ----------------------------------------------------------------------------
    def baselined(self, model: str) -> list[ModelVersion]:
        """The model's versions with a training baseline, newest first."""
        return sorted(
            (v for v in self.metadata.list_versions(model) if v.baseline),
            key=lambda v: -v.version,
        )

    def report(
        self, model: str, version: int = 0, window_s: float = 0.0, *, ks: bool = True
    ) -> DriftReport:
        """Drift of `model`'s baselined versions (or of `version` alone) over the last
        `window_s` seconds (0: drift.window_s); `ks` reads sampled captures for KS too."""
        check_name("model", model)
        if not math.isfinite(window_s) or not 0 <= window_s <= MAX_WINDOW_S:
            raise InvalidRequest(
                f"the window must be 0 (the cloud's drift.window_s) to {MAX_WINDOW_S} "
                f"seconds, not {window_s!r}"
            )
        if self.metadata.get_model(model) is None:
            raise UnknownResource(f"model {model} does not exist; see `edgefleet models list`")
        if version:
            record = self.metadata.get_version(model, version)
            if record is None:
                raise UnknownResource(f"{model} has no version {version}")
            if not record.baseline:
                raise NotReady(
                    f"{model} v{version} has no training baseline to compare with: versions "
                    "made by `edgefleet finetune` have one, pushed ONNX files do not"
                )
            versions = [record]
        else:
            versions = self.baselined(model)
        until = self.clock()
        since = until - (window_s or self.settings.window_s)
        records = self.data.telemetry(model, since) if versions else []
        drifts = []
        for v in versions:
            samples = self._samples(v, since) if ks else None
            drifts.append(
                version_drift(v, records, min_count=self.settings.min_count, samples=samples)
            )
        return DriftReport(model, since, until, self.settings.psi_threshold, tuple(drifts))

    def _samples(self, version: ModelVersion, since: float) -> dict[str, Samples]:
        limit = self.settings.ks_max_captures
        if not limit:
            return {}
        per_capture = max(16, KS_MAX_VALUES // limit)
        rows: dict[str, list[bytes]] = {}
        query = CaptureQuery(version.model, version.version, since, limit=limit)
        for capture in self.data.captures(query):
            if capture.reason == SAMPLED:
                rows.setdefault(capture.device_id, []).append(capture.inputs)
        return {
            device: sampled_values(version.baseline, raw, per_capture, seed=version.version)
            for device, raw in rows.items()
        }

    def gauges(self) -> dict[tuple[str, str, str], float]:
        """The last check's PSI per (model, version, scope), judged scopes only."""
        with self._lock:
            return dict(self._psi)

    def alert_counts(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._alerts)

    def active(self) -> list[DriftAlert]:
        with self._lock:
            return list(self._active.values())

    # checking ---------------------------------------------------------------------------
    def check(self) -> list[DriftAlert]:
        """One pass over every baselined version: update the gauges, raise the alerts that
        are new, clear the ones that recovered; the new alerts."""
        settings = self.settings
        clear_below = settings.psi_threshold * settings.clear_ratio
        gauges: dict[tuple[str, str, str], float] = {}
        seen: dict[AlertKey, DriftScope] = {}
        for model in self.metadata.list_models():
            if not self.baselined(model.name):
                continue
            for v in self.report(model.name, ks=False).versions:
                for scope in (v.fleet, *v.devices):
                    if scope.verdict in (NO_DATA, TOO_FEW):
                        continue
                    gauges[(v.model, str(v.version), scope.scope)] = scope.psi
                    seen[(v.model, v.version, scope.device_id)] = scope
        now = self.clock()
        raised: list[DriftAlert] = []
        with self._lock:
            self._psi = gauges
            for key, alert in list(self._active.items()):
                now_at = seen.get(key)
                if now_at is None or now_at.psi < clear_below:
                    del self._active[key]
                    log.info(
                        "drift cleared: %s v%d %s (PSI %s)",
                        key[0],
                        key[1],
                        alert.scope,
                        f"{now_at.psi:.3f}"
                        if now_at
                        else "not measured: no telemetry in the window",
                    )
            for key, scope in seen.items():
                if key in self._active or scope.psi < settings.psi_threshold:
                    continue
                worst = scope.channels[0]
                alert = DriftAlert(
                    key[0],
                    key[1],
                    key[2],
                    worst.input,
                    worst.channel,
                    scope.psi,
                    settings.psi_threshold,
                    now,
                )
                self._active[key] = alert
                self._alerts[(key[0], str(key[1]), alert.scope)] += 1
                raised.append(alert)
            subscribers = list(self._subscribers)
        for alert in raised:
            log.warning(
                "drift: %s v%d %s input %s channel %d PSI %.3f >= %.3f",
                alert.model,
                alert.version,
                alert.scope,
                alert.input,
                alert.channel,
                alert.psi,
                alert.threshold,
            )
            for callback in subscribers:
                try:
                    callback(alert)
                except Exception:
                    log.exception("drift: a subscriber failed on an alert (%r)", callback)
        return raised

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.check()
            except Exception:  # a store closing or failing: the next pass tries again
                log.exception("drift: a check failed")

    def start(self) -> DriftMonitor:
        if not self.settings.enabled or self._thread is not None:
            return self
        if self.webhook is not None:
            self.webhook.start()
        self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop checking (a check under way finishes first) and the webhook's sender."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.webhook is not None:
            self.webhook.stop(timeout)


# the webhook ------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could carry the alert to plain http or another host: a 3xx is a failure.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class Webhook:
    """POSTs each alert as JSON to a URL, from its own thread and a bounded queue, so the
    monitor (and ingest, which never waits for the monitor) never waits on the network."""

    QUEUE = 256

    def __init__(
        self, url: str, *, insecure: bool = False, timeout_s: float = 5.0, retries: int = 3
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise InvalidRequest("a drift webhook needs an https:// URL with a host")
        if parts.scheme == "http" and not insecure:
            raise InvalidRequest(
                "the drift webhook is plain http: set drift.webhook_insecure to allow it"
            )
        self.url = url
        self.host = parts.hostname  # what logs name: the path and query may hold a secret
        self.timeout_s = timeout_s
        self.retries = retries
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[DriftAlert | None] = queue.Queue(self.QUEUE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(_NoRedirects())

    def send(self, alert: DriftAlert) -> None:
        """Queue the alert (a subscriber: returns at once). A full queue drops it, logged."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            log.warning(
                "drift webhook %s: %d alerts waiting; dropped %s v%d %s",
                self.host,
                self.QUEUE,
                alert.model,
                alert.version,
                alert.scope,
            )

    @staticmethod
    def body(alert: DriftAlert) -> bytes:
        return json.dumps(
            {"event": "edgefleet.drift", **to_jsonable(alert), "scope": alert.scope},
            sort_keys=True,
        ).encode()

    def post(self, alert: DriftAlert) -> bool:
        """POST one alert, retrying `retries` times 1, 2, 4... s apart (30 s at most);
        whether it was delivered. Stopping cuts the waits short."""
        request = urllib.request.Request(
            self.url,
            data=self.body(alert),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"edgefleet/{edgefleet.__version__}",
            },
        )
        for attempt in range(self.retries + 1):
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    response.read(1 << 16)
                self.sent += 1
                return True
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "code", None) or getattr(err, "reason", None) or err
                log.warning(
                    "drift webhook %s: POST of %s v%d %s failed (try %d of %d): %s",
                    self.host,
                    alert.model,
                    alert.version,
                    alert.scope,
                    attempt + 1,
                    self.retries + 1,
                    reason,
                )
            if attempt < self.retries and self._stop.wait(min(30.0, 2.0**attempt)):
                break
        self.failed += 1
        return False

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            self.post(alert)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drift-webhook", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (a POST under way may take timeout_s), then end the thread;
        retry waits end at once."""
        if self._thread is None:
            return
        self._stop.set()
        with contextlib.suppress(queue.Full):  # the thread is gone: nothing to wake
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None
