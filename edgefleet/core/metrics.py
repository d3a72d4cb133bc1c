"""What the agent's and the cloud's Prometheus endpoints share: a registry of the process's
own (never prometheus-client's global one, so several agents and clouds in one process keep
their figures apart), an HTTP side port serving `/metrics` from a thread, and the pieces
collectors are made of.

Collectors read, at scrape time, what the code keeps anyway (counters, stats, the state
store), so turning metrics on adds nothing to the request path.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from edgefleet.core.errors import Unavailable

log = logging.getLogger(__name__)

# Seconds; Prometheus' own default buckets with a finer start and a longer tail (downloads
# and watch streams are RPCs too).
RPC_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost", "[::1]") or host.startswith("127.")


def exposure_warning(host: str, setting: str = "metrics_host") -> str:
    """What the start-up log says when /metrics is reachable from the network."""
    if is_loopback(host):
        return ""
    return (
        f"WARNING: metrics are open to every host that reaches {host}, without authentication "
        "or TLS: anyone on the network can read the names of the models, their versions and "
        f"request rates; bind {setting} to 127.0.0.1 and scrape through a tunnel or a local "
        "Prometheus agent unless this network is trusted"
    )


def new_registry() -> CollectorRegistry:
    """A registry of this process's own, with the process, GC and platform collectors that
    the global default registry would have had."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """`/metrics` of one registry on host:port, served by a thread until `stop()`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        settings: tuple[str, str] = ("metrics_host", "metrics_port"),
    ) -> None:
        self.registry = registry
        self.host = host
        try:
            server, thread = start_http_server(port, host, registry=registry)
        except OSError as err:
            raise Unavailable(
                f"cannot serve metrics on {_join(host, port)}: {err.strerror or err}; choose "
                f"another {settings[1]} (0 picks a free one), or a {settings[0]} that is an "
                "address of this machine"
            ) from None
        self._server: WSGIServer = server
        self._thread = thread
        self.port: int = server.server_port
        self.warning = exposure_warning(host, settings[0])
        log.info("metrics on http://%s/metrics", self.address)
        if self.warning:
            log.warning(self.warning)

    @property
    def address(self) -> str:
        return _join(self.host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class SafeCollector(Collector):
    """A collector made of sections, each read on its own: one that fails (a store closing
    under a scrape at shutdown, say) is logged and left out, and the others still answer."""

    name = "metrics"

    def sections(self) -> Sequence[Callable[[], Iterable[Metric]]]:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        for section in self.sections():
            try:
                found = list(section())
            except Exception as err:
                log.warning(
                    "%s: %s left out of this scrape: %s: %s",
                    self.name,
                    getattr(section, "__name__", "a section"),
                    type(err).__name__,
                    err,
                )
                continue
            yield from found


def histogram(
    family: HistogramMetricFamily,
    labels: Sequence[str],
    bounds: Sequence[float],
    counts: Sequence[int],
    total: float,
    divisor: float = 1.0,
) -> None:
    """Add one histogram from per-bucket counts (len(bounds) + 1 of them, the last one over
    every bound) to `family`, bounds divided by `divisor` (milliseconds to seconds: 1000)."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(bounds, counts, strict=False):
        running += n
        buckets.append((repr(float(bound / divisor)), running))
    running += sum(counts[len(bounds) :])
    buckets.append(("+Inf", running))
    family.add_metric(list(labels), buckets, total)


@dataclass
class Histogram:
    """Counts per bucket and a sum, kept by the caller under its own lock."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class Tally:
    """Counters and histograms by label values, thread-safe: what events add to between
    scrapes (RPCs, sync batches)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, tuple[str, ...]], float] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], Histogram] = {}

    def add(self, name: str, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        key = (name, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def observe(
        self, name: str, labels: tuple[str, ...], value: float, bounds: tuple[float, ...]
    ) -> None:
        key = (name, labels)
        with self._lock:
            found = self._histograms.get(key)
            if found is None:
                found = self._histograms[key] = Histogram(bounds)
            found.observe(value)

    def counts(self, name: str) -> dict[tuple[str, ...], float]:
        with self._lock:
            return {labels: n for (metric, labels), n in self._counts.items() if metric == name}

    def histograms(self, name: str) -> dict[tuple[str, ...], Histogram]:
        with self._lock:
            return {
                labels: Histogram(h.bounds, list(h.counts), h.total)
                for (metric, labels), h in self._histograms.items()
                if metric == name
            }
