"""What comes back from devices: captured inferences and telemetry (messages in
protos/fleet/v1/data.proto), one type each, and the arithmetic both ends share: latency
histograms and running input statistics that merge across windows and devices."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

# Latency bucket upper bounds in milliseconds: fine where edge inference lives (sub-ms to
# tens of ms), coarse beyond. A histogram has len(LATENCY_BOUNDS_MS) + 1 counts.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0,
    100.0, 150.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
)  # fmt: skip


@dataclass(frozen=True)
class CapturePolicy:
    """What a device captures of one model's inferences."""

    sample_rate: float = 0.0  # fraction of requests, 0..1
    below_confidence: float = 0.0  # also every request with top-1 probability under this
    max_row_bytes: int = 0  # 0: the agent's default

    @property
    def active(self) -> bool:
        return self.sample_rate > 0 or self.below_confidence > 0


@dataclass(frozen=True)
class InputBins:
    input: str
    edges: tuple[float, ...] = ()


@dataclass(frozen=True)
class Capture:
    seq: int
    model: str
    version: int
    request_id: str = ""
    at: float = 0.0
    latency_ms: float = 0.0
    inputs: bytes = b""  # a tensor set (edgefleet.core.golden)
    outputs: bytes = b""
    label: str = ""
    confidence: float = -1.0
    reason: str = ""
    device_id: str = ""  # set by the cloud
    id: int = 0  # the cloud's id of the row

    @property
    def size(self) -> int:
        return len(self.inputs) + len(self.outputs)


@dataclass(frozen=True)
class LatencyHistogram:
    # Empty: LATENCY_BOUNDS_MS, what every agent uses; 24 doubles a row saved on the wire.
    bounds_ms: tuple[float, ...] = ()
    counts: tuple[int, ...] = (0,) * (len(LATENCY_BOUNDS_MS) + 1)
    sum_ms: float = 0.0

    @property
    def bounds(self) -> tuple[float, ...]:
        return self.bounds_ms or LATENCY_BOUNDS_MS

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merged(self, other: LatencyHistogram) -> LatencyHistogram:
        if not other.count:
            return self
        if not self.count:
            return other
        if other.bounds != self.bounds:
            raise ValueError("latency histograms with different bounds cannot be merged")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return LatencyHistogram(self.bounds_ms, counts, self.sum_ms + other.sum_ms)

    def quantile(self, q: float) -> float:
        """The latency under which a fraction `q` of requests fell, interpolated within its
        bucket (0.0 without requests). Within a bucket's width: what fixed bins allow."""
        total = self.count
        if not total:
            return 0.0
        bounds = self.bounds
        rank = q * total
        seen = 0
        for index, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = bounds[index - 1] if index > 0 else 0.0
                high = bounds[index] if index < len(bounds) else bounds[-1] * 2
                return low + (high - low) * max(0.0, rank - seen) / n
            seen += n
        return bounds[-1]


def latency_histogram(samples_ms: Iterable[float]) -> LatencyHistogram:
    import bisect

    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    total = 0.0
    for value in samples_ms:
        counts[bisect.bisect_left(LATENCY_BOUNDS_MS, value)] += 1
        total += value
    return LatencyHistogram(LATENCY_BOUNDS_MS, tuple(counts), total)


@dataclass(frozen=True)
class ChannelStats:
    """Running statistics of one feature or channel (Welford: variance = m2 / count)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    histogram: tuple[int, ...] = ()

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def merged(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both sets together (Chan et al.'s parallel update)."""
        if not other.count:
            return self
        if not self.count:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        if self.histogram and other.histogram and len(self.histogram) == len(other.histogram):
            histogram = tuple(a + b for a, b in zip(self.histogram, other.histogram, strict=True))
        else:
            histogram = self.histogram or other.histogram
        return ChannelStats(
            n, mean, m2, min(self.min, other.min), max(self.max, other.max), histogram
        )


MAX_CHANNELS = 1024


def channel_stats(
    array: npt.NDArray[np.generic], edges: Sequence[float] = ()
) -> tuple[ChannelStats, ...]:
    """Statistics per channel (axis 1 of a rank >= 3 tensor: images), per feature (the last
    axis of a rank-2 float tensor: tables), or of the whole tensor otherwise."""
    values = channel_rows(array)
    if values is None:
        return ()
    count = values.shape[1]
    mean = values.mean(axis=1)
    m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
    low, high = values.min(axis=1), values.max(axis=1)
    histograms: list[tuple[int, ...]] = [()] * len(values)
    if edges:
        bins = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
        histograms = [tuple(int(n) for n in np.bincount(b, minlength=len(edges) + 1)) for b in bins]
    return tuple(
        ChannelStats(
            count, float(mean[i]), float(m2[i]), float(low[i]), float(high[i]), histograms[i]
        )
        for i in range(len(values))
    )


def channel_rows(array: npt.NDArray[np.generic]) -> npt.NDArray[np.float64] | None:
    """The values of each channel or feature as the rows of a 2-D float64 array, split as
    `channel_stats` splits them (drift's KS test reads captured inputs the same way); None
    for a tensor with no numbers (strings, empty)."""
    x = np.asarray(array)
    if x.dtype.kind not in "fiub" or x.size == 0:
        return None
    if x.ndim >= 3 and x.shape[1] <= MAX_CHANNELS:
        rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    elif x.ndim == 2 and x.dtype.kind == "f" and x.shape[1] <= MAX_CHANNELS:
        rows = x.T
    else:
        rows = x.reshape(1, -1)
    return rows.astype(np.float64, copy=False)


def baseline_stats(name: str, array: npt.NDArray[np.generic], bins: int = 16) -> InputStats:
    """A training set's statistics of one input, with `bins` equal-width histogram bins
    between its 0.5% and 99.5% quantiles (outliers count in the outer bins): what devices
    summarise their inputs against."""
    x = np.asarray(array, dtype=np.float64)
    low, high = np.quantile(x, [0.005, 0.995]) if x.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    edges = tuple(float(e) for e in np.linspace(low, high, bins + 1))
    return InputStats(name, channel_stats(array, edges), edges)


@dataclass(frozen=True)
class InputStats:
    input: str
    channels: tuple[ChannelStats, ...] = ()
    edges: tuple[float, ...] = ()

    def merged(self, other: InputStats) -> InputStats:
        if not other.channels:
            return self
        if not self.channels:
            return other
        if len(self.channels) != len(other.channels):
            return self  # a different layout (another version's): not the same input
        channels = tuple(a.merged(b) for a, b in zip(self.channels, other.channels, strict=True))
        return replace(self, channels=channels)


def merge_inputs(
    into: Mapping[str, InputStats], more: Sequence[InputStats]
) -> dict[str, InputStats]:
    merged = dict(into)
    for stats in more:
        merged[stats.input] = merged[stats.input].merged(stats) if stats.input in merged else stats
    return merged


@dataclass(frozen=True)
class ModelWindow:
    """One model version's serving over a window of time on one device."""

    model: str
    version: int
    start: float
    end: float
    requests: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    inputs: tuple[InputStats, ...] = ()
    busy_seconds: float = 0.0
    captured: int = 0
    attributed_seconds: float = 0.0
    target: str = ""
    # A shadow version's requests compared with the primary's answers, how many agreed,
    # and the primary's version (0: nothing compared).
    compared: int = 0
    agreed: int = 0
    compared_with: int = 0


@dataclass(frozen=True)
class DeviceWindow:
    """The device's own use of resources over a window."""

    start: float
    end: float
    cpu_seconds: float = 0.0
    cpus: int = 0
    rss_bytes: int = 0
    memory_available_bytes: int = 0
    accelerator_percent: float = -1.0
    spool_bytes: int = 0
    captures_pending: int = 0
    captures_dropped: int = 0


@dataclass(frozen=True)
class TelemetryRecord:
    seq: int
    model: ModelWindow | None = None
    device: DeviceWindow | None = None
    device_id: str = ""  # set by the cloud

    @property
    def end(self) -> float:
        window = self.model or self.device
        return window.end if window is not None else 0.0


@dataclass(frozen=True)
class SyncAck:
    telemetry_through: int = 0
    captures_through: int = 0
    stored: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class VersionRows:
    version: int
    rows: int


@dataclass(frozen=True)
class DataSet:
    """The captured rows of one model, as `captures:<model>` names them."""

    name: str
    model: str
    rows: int = 0
    labelled: int = 0
    bytes: int = 0
    devices: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    versions: tuple[VersionRows, ...] = ()
    labels: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptureLabel:
    capture_id: int
    label: str


@dataclass(frozen=True)
class VersionTelemetry:
    """One version's serving across the devices that ran it."""

    model: str
    version: int
    target: str = ""
    devices: int = 0
    requests: int = 0
    errors: int = 0
    span_seconds: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    inputs: tuple[InputStats, ...] = ()
    busy_seconds: float = 0.0
    device_seconds: float = 0.0
    captured: int = 0
    # As a shadow: requests compared with the primary's answers, how many agreed, and the
    # primary version most of them were compared with.
    compared: int = 0
    agreed: int = 0
    compared_with: int = 0

    @property
    def agreement(self) -> float | None:
        """The share of compared requests on which this version agreed with the primary
        (None: nothing was compared): what the rollout gate `agreement` reads."""
        return self.agreed / self.compared if self.compared else None

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.span_seconds if self.span_seconds > 0 else 0.0

    def cost_per_1000(self, price_per_device_hour: float) -> float:
        """What 1,000 of its inferences cost at `price_per_device_hour` (0 with none)."""
        if not self.requests:
            return 0.0
        return price_per_device_hour * self.device_seconds / 3600 / self.requests * 1000


def parse_since(text: str) -> float:
    """A moment as users write it: a date (2026-11-30), a time (2026-11-30T08:00, UTC unless
    it says otherwise) or unix seconds; "" is the beginning. ValueError says what to give."""
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        pass
    try:
        # 3.10's fromisoformat takes no Z suffix (3.11's does): spell it +00:00.
        when = dt.datetime.fromisoformat(
            text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        )
    except ValueError:
        raise ValueError(
            f"{text[:40]!r}: give a date (2026-11-30), a time (2026-11-30T08:00) or unix seconds"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


# drift ------------------------------------------------------------------------------------

# The usual reading of a population stability index (PSI): under 0.1 the inputs are as in
# training, 0.1 to 0.2 they moved a little, 0.2 and over they moved enough to question the
# model's accuracy. A rule of thumb from credit scoring, not a law: the alert threshold
# (the cloud's `drift.psi_threshold`) is a setting.
PSI_MODERATE = 0.1
PSI_DRIFTED = 0.2
STABLE, MODERATE, DRIFTED, TOO_FEW, NO_DATA = "stable", "moderate", "drifted", "too few", "no data"


def psi_verdict(psi: float, count: int, min_count: int = 1) -> str:
    """How a PSI reads: stable (< 0.1), moderate (< 0.2), drifted; "no data" without values
    and "too few" under `min_count` of them (a histogram of a handful of values is noise)."""
    if count <= 0:
        return NO_DATA
    if count < min_count:
        return TOO_FEW
    return STABLE if psi < PSI_MODERATE else MODERATE if psi < PSI_DRIFTED else DRIFTED


@dataclass(frozen=True)
class ChannelDrift:
    """One channel (or feature) of one input: how far its values moved from the baseline."""

    input: str
    channel: int
    psi: float = 0.0
    count: int = 0  # values behind the histogram compared with the baseline's
    mean: float = 0.0
    baseline_mean: float = 0.0
    # KS of sampled captures against the baseline's histogram CDF (cloudsvc.drift says
    # how); -1 and 0 samples where no captured values were found.
    ks: float = -1.0
    ks_pvalue: float = -1.0
    ks_samples: int = 0


@dataclass(frozen=True)
class DriftScope:
    """Drift of one device (or, with no device_id, the fleet's windows merged) over a window."""

    device_id: str = ""
    windows: int = 0  # telemetry windows behind it
    psi: float = 0.0  # the largest of its channels'
    verdict: str = NO_DATA
    channels: tuple[ChannelDrift, ...] = ()  # largest PSI first

    @property
    def scope(self) -> str:
        """Its name in metrics, alerts and tables: "fleet" or "device:<id>"."""
        return f"device:{self.device_id}" if self.device_id else "fleet"


@dataclass(frozen=True)
class VersionDrift:
    model: str
    version: int
    fleet: DriftScope = field(default_factory=DriftScope)
    devices: tuple[DriftScope, ...] = ()  # largest PSI first


@dataclass(frozen=True)
class DriftReport:
    """A model's drift per version with a training baseline, over [since, until]."""

    model: str
    since: float = 0.0
    until: float = 0.0
    threshold: float = PSI_DRIFTED  # the PSI at which the cloud alerts
    versions: tuple[VersionDrift, ...] = ()  # newest first


@dataclass(frozen=True)
class DriftAlert:
    """A scope's PSI reached the threshold: raised once, until it falls back under it."""

    model: str
    version: int
    device_id: str  # "": the fleet
    input: str  # the worst channel's
    channel: int
    psi: float
    threshold: float
    at: float  # unix seconds

    @property
    def scope(self) -> str:
        return f"device:{self.device_id}" if self.device_id else "fleet"
