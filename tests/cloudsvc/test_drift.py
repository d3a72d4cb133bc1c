"""Drift: PSI and KS against hand-computed values; the monitor alerting once on a device
whose inputs moved (telemetry windows ingested as devices send them), not on a stable one,
and clearing; the webhook as a real HTTP server receives it; and `GetDrift` and `edgefleet
drift` end to end against a real cloud."""

from __future__ import annotations

import http.server
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from cloudsvc.drift import (
    EPSILON,
    DriftMonitor,
    Webhook,
    kolmogorov_asymptotic,
    kolmogorov_sf,
    ks_statistic,
    psi,
    scope_drift,
)
from cloudsvc.errors import InvalidRequest
from cloudsvc.ingest import Ingest
from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings, DriftSettings
from cloudsvc.store.data import Batch, MemoryDataStore
from cloudsvc.store.memory import MemoryMetadataStore
from edgefleet.cli import cli
from edgefleet.client import AdminClient
from edgefleet.core.data import (
    DriftAlert,
    InputStats,
    ModelWindow,
    TelemetryRecord,
    baseline_stats,
    channel_stats,
)
from edgefleet.core.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.core.golden import tensor_set_bytes
from edgefleet.core.versions import ModelVersion
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import data_pb2
from tests.scrape import scrape

from .conftest import ADMIN_TOKEN

FEATURES = 4
SHIFTED = 2  # the feature that moves on the drifted device
ROWS = 400  # inputs per telemetry window


# the arithmetic ---------------------------------------------------------------------------


def test_psi_matches_hand_computed_values() -> None:
    # (0.8-0.5) ln(0.8/0.5) + (0.2-0.5) ln(0.2/0.5) = 0.3 * 0.470004 + 0.3 * 0.916291
    assert psi([50, 50], [80, 20]) == pytest.approx(0.4158883, abs=1e-6)
    # An empty baseline bin counts as EPSILON: (0.5-1) ln(0.5) + (0.5-1e-4) ln(0.5/1e-4)
    assert EPSILON == 1e-4
    assert psi([100, 0], [50, 50]) == pytest.approx(4.6043185, abs=1e-6)
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)  # same proportions
    assert psi([0, 0], [3, 4]) == psi([3, 4], [0, 0]) == 0.0  # nothing to compare
    with pytest.raises(ValueError, match="cannot be compared"):
        psi([1, 2], [1, 2, 3])


def test_ks_against_the_histogram_cdf() -> None:
    # A baseline uniform on [0, 1] (two inner bins, nothing outside).
    edges, counts = [0.0, 0.5, 1.0], [0, 10, 10, 0]
    assert ks_statistic(np.array([0.5]), edges, counts) == pytest.approx(0.5)
    assert ks_statistic(np.array([0.25, 0.75]), edges, counts) == pytest.approx(0.25)
    # Under- and overflow masses sit at the outer edges: F0 is 0.5 on [0, 1).
    assert ks_statistic(np.array([0.5, 0.5]), [0.0, 1.0], [5, 0, 5]) == pytest.approx(0.5)
    assert ks_statistic(np.array([]), edges, counts) == 0.0


def test_without_scipy_the_asymptotic_series_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # what an install without it sees
    assert kolmogorov_sf(0.05, 300) == kolmogorov_asymptotic(0.05, 300)


def test_ks_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    # Exactly scipy's one-sample statistic against the uniform CDF, values outside included.
    x = np.random.default_rng(1).uniform(-0.2, 1.1, 500)
    expected = stats.kstest(np.clip(x, 0, 1), "uniform").statistic
    assert ks_statistic(x, [0.0, 0.5, 1.0], [0, 10, 10, 0]) == pytest.approx(expected)
    # With scipy installed the p-value is the exact distribution's, near the asymptotic one.
    assert kolmogorov_sf(0.05, 300) == pytest.approx(float(stats.kstwo.sf(0.05, 300)))
    assert kolmogorov_asymptotic(0.05, 300) == pytest.approx(kolmogorov_sf(0.05, 300), abs=0.01)
    # n = 1: one value u with D = max(u, 1 - u), so P(D >= d) = 2(1 - d) for d >= 1/2.
    assert kolmogorov_sf(0.75, 1) == pytest.approx(0.5)


def test_ks_p_values() -> None:
    # Kolmogorov's limit: P(K > 1) = 0.2699996...; lambda = (sqrt(n) + 0.12 + 0.11/sqrt(n)) d.
    n = 10_000
    d = 1.0 / (100 + 0.12 + 0.11 / 100)
    assert kolmogorov_asymptotic(d, n) == pytest.approx(0.2699996, abs=1e-6)
    assert kolmogorov_asymptotic(0.001, 10) == 1.0
    assert kolmogorov_sf(0.5, 0) == 1.0


# the monitor ------------------------------------------------------------------------------


def training() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((5000, FEATURES)).astype(np.float32)


BASELINE = baseline_stats("x", training())


def inputs(seed: int, shift: float = 0.0, rows: int = ROWS) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)
    x[:, SHIFTED] += shift
    return x


def window(seq: int, end: float, x: np.ndarray, version: int = 1) -> data_pb2.TelemetryRecord:
    """A telemetry window as an agent sends it: statistics in the baseline's bins."""
    stats = InputStats("x", channel_stats(x, BASELINE.edges), BASELINE.edges)
    record = TelemetryRecord(
        seq, ModelWindow("clf", version, end - 60, end, requests=len(x), inputs=(stats,))
    )
    return to_proto(record, data_pb2.TelemetryRecord)


class _Peaks(MemoryMetadataStore):
    def peaks(self, device_id: str) -> dict[str, int]:
        return {"clf": 2}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_scope_drift_compares_only_windows_in_the_baselines_bins() -> None:
    x = inputs(1, shift=2.0)
    good = ModelWindow(
        "clf", 1, 0, 60, inputs=(InputStats("x", channel_stats(x, BASELINE.edges), BASELINE.edges),)
    )
    other_bins = ModelWindow(
        "clf", 1, 0, 60, inputs=(InputStats("x", channel_stats(x, (0.0, 1.0)), (0.0, 1.0)),)
    )
    scope = scope_drift((BASELINE,), [good, other_bins], min_count=100)
    assert scope.windows == 2
    worst = scope.channels[0]
    assert (worst.input, worst.channel, worst.count) == ("x", SHIFTED, ROWS)  # one window's
    assert worst.mean == pytest.approx(float(x[:, SHIFTED].mean()), abs=1e-5)
    assert scope.psi == worst.psi > 1.0 and scope.verdict == "drifted"
    assert [c.ks for c in scope.channels] == [-1.0] * FEATURES  # no captures: no KS
    assert scope_drift((BASELINE,), [good], min_count=ROWS + 1).verdict == "too few"
    assert scope_drift((BASELINE,), []).verdict == "no data"


def monitor_with_data(
    settings: DriftSettings | None = None,
) -> tuple[DriftMonitor, Ingest, Clock]:
    metadata = _Peaks()
    metadata.add_version(ModelVersion("clf", 1, "", 0, "", baseline=(BASELINE,)))
    metadata.add_version(ModelVersion("clf", 2, "", 0, ""))  # pushed: no baseline
    data = MemoryDataStore()
    clock = Clock()
    return (
        DriftMonitor(metadata, data, settings or DriftSettings(), clock=clock),
        Ingest(data, metadata),
        clock,
    )


def send(ingest: Ingest, device: str, first_seq: int, end: float, shift: float) -> None:
    """Three windows a minute apart, the last ending at `end`, through the cloud's ingest."""
    rows = [
        window(seq, end - 60 * (first_seq + 2 - seq), inputs(seq * 7 + len(device), shift))
        for seq in range(first_seq, first_seq + 3)
    ]
    ingest.sync(device, data_pb2.SyncBatch(spool_id="s1", telemetry=rows))


def test_a_drifted_device_alerts_once_until_it_clears(caplog: pytest.LogCaptureFixture) -> None:
    monitor, ingest, clock = monitor_with_data()
    got: list[DriftAlert] = []

    def failing(alert: DriftAlert) -> None:
        raise RuntimeError("a subscriber's bug")

    monitor.subscribe(failing)  # a failing subscriber stops no other
    monitor.subscribe(got.append)
    send(ingest, "cam-1", 1, clock.now - 10, shift=1.5)
    send(ingest, "cam-2", 1, clock.now - 10, shift=0.0)

    with caplog.at_level(logging.WARNING, logger="cloudsvc.drift"):
        raised = monitor.check()
    scopes = sorted(a.scope for a in raised)
    # The drifted device, and the fleet (half its inputs moved); never the stable device.
    assert scopes == ["device:cam-1", "fleet"]
    cam1 = next(a for a in raised if a.device_id == "cam-1")
    assert (cam1.model, cam1.version, cam1.input, cam1.channel) == ("clf", 1, "x", SHIFTED)
    assert cam1.psi >= 0.2 and cam1.threshold == 0.2 and cam1.at == clock.now
    assert got == raised
    line = next(r.getMessage() for r in caplog.records if "device:cam-1" in r.getMessage())
    assert f"clf v1 device:cam-1 input x channel {SHIFTED} PSI" in line
    assert any("subscriber failed" in r.getMessage() for r in caplog.records)
    gauges = monitor.gauges()
    assert gauges[("clf", "1", "device:cam-1")] >= 0.2 > gauges[("clf", "1", "device:cam-2")]
    assert monitor.alert_counts() == {("clf", "1", "device:cam-1"): 1, ("clf", "1", "fleet"): 1}

    # Still drifted an interval later: no second alert.
    clock.now += 60
    assert monitor.check() == []
    assert len(got) == 2

    # An hour on, the old windows are out of the window and cam-1 sends stable ones: clears.
    clock.now += 3600
    send(ingest, "cam-1", 4, clock.now - 10, shift=0.0)
    assert monitor.check() == [] and monitor.active() == []
    assert ("clf", "1", "device:cam-2") not in monitor.gauges()  # nothing from cam-2 lately

    # Drifting again is a new alert.
    clock.now += 3600
    send(ingest, "cam-1", 7, clock.now - 10, shift=-2.0)
    assert sorted(a.scope for a in monitor.check()) == ["device:cam-1", "fleet"]
    assert monitor.alert_counts()[("clf", "1", "device:cam-1")] == 2


def test_a_stable_fleet_raises_nothing() -> None:
    monitor, ingest, clock = monitor_with_data()
    for n, device in enumerate(("cam-1", "cam-2", "cam-3")):
        send(ingest, device, 1, clock.now - n, shift=0.0)
    assert monitor.check() == []
    report = monitor.report("clf")
    (v1,) = report.versions  # v2 has no baseline: not in the report
    assert [d.verdict for d in v1.devices] == ["stable"] * 3 and v1.fleet.verdict == "stable"
    assert v1.fleet.windows == 9 and v1.fleet.psi < 0.1


# the webhook ------------------------------------------------------------------------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []
    fail_first: ClassVar[int] = 0
    seen: ClassVar[int] = 0

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        type(self).seen += 1
        if type(self).seen <= type(self).fail_first:
            self.send_response(503)
        else:
            type(self).bodies.append({**body, "content-type": self.headers["Content-Type"]})
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[http.server.HTTPServer]:
    _Receiver.bodies, _Receiver.seen, _Receiver.fail_first = [], 0, 1
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_the_webhook_receives_each_new_alert(receiver: http.server.HTTPServer) -> None:
    url = f"http://127.0.0.1:{receiver.server_port}/hooks/drift?key=secret"
    settings = DriftSettings.model_validate(
        {"webhook_url": url, "webhook_insecure": True, "webhook_retries": 2}
    )
    monitor, ingest, clock = monitor_with_data(settings)
    assert monitor.webhook is not None and monitor.webhook.host == "127.0.0.1"
    monitor.webhook.start()
    try:
        send(ingest, "cam-1", 1, clock.now - 10, shift=2.0)
        raised = monitor.check()
        deadline = time.monotonic() + 15
        while len(_Receiver.bodies) < len(raised) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        monitor.stop()
    # The first POST got a 503 and was retried a second later.
    assert _Receiver.seen == len(raised) + 1 and monitor.webhook.failed == 0
    body = next(b for b in _Receiver.bodies if b["scope"] == "device:cam-1")
    assert body["event"] == "edgefleet.drift" and body["content-type"] == "application/json"
    assert (body["model"], body["version"], body["device_id"], body["channel"]) == (
        "clf",
        1,
        "cam-1",
        SHIFTED,
    )
    assert body["psi"] >= 0.2 and body["threshold"] == 0.2


def test_a_webhook_that_never_answers_is_given_up_after_its_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A port nothing listens on: refused at once, retried, given up; nobody waited on it.
    hook = Webhook("http://127.0.0.1:9/x", insecure=True, timeout_s=1.0, retries=1)
    alert = DriftAlert("clf", 1, "cam-1", "x", 2, 0.5, 0.2, 0.0)
    with caplog.at_level(logging.WARNING, logger="cloudsvc.drift"):
        assert hook.post(alert) is False
    assert hook.failed == 1
    assert sum("failed (try" in r.getMessage() for r in caplog.records) == 2
    assert all("/x" not in r.getMessage() for r in caplog.records)  # the path may be secret


def test_a_plain_http_webhook_is_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="webhook_insecure"):
        CloudSettings.load(None, data_dir=tmp_path, drift={"webhook_url": "http://hooks.local/x"})
    with pytest.raises(InvalidRequest, match="https"):
        CloudSettings.load(None, data_dir=tmp_path, drift={"webhook_url": "ftp://hooks.local/x"})
    with pytest.raises(InvalidRequest, match=r"drift\.wrong"):
        CloudSettings.load(None, data_dir=tmp_path, drift={"wrong": 1})
    with pytest.raises(InvalidRequest, match="webhook_insecure"):
        Webhook("http://hooks.local/x")
    settings = CloudSettings.load(
        None, data_dir=tmp_path, drift={"webhook_url": "https://hooks.example/x?token=s3cret"}
    )
    assert "s3cret" not in settings.describe()
    assert "drift.psi_threshold = 0.2" in settings.describe()


# end to end -------------------------------------------------------------------------------


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudServer]:
    settings = CloudSettings.load(
        None,
        data_dir=tmp_path / "cloud",
        port=0,
        admin_token=ADMIN_TOKEN,
        max_workers=11,
        metrics_port=0,
        drift={"interval_s": 0.2},
    )
    server = serve(settings)
    yield server
    server.stop(grace=1.0)


def test_drift_through_the_rpc_the_cli_and_the_metrics(cloud: CloudServer) -> None:
    cloud.metadata.add_version(ModelVersion("clf", 1, "", 0, "", baseline=(BASELINE,)))
    cloud.metadata.add_version(ModelVersion("clf", 2, "", 0, ""))
    now = time.time()
    for device, shift in (("cam-1", 1.5), ("cam-2", 0.0)):
        captures = [
            data_pb2.Capture(
                seq=n + 1,
                model="clf",
                version=1,
                at=now - 30,
                inputs=tensor_set_bytes({"x": inputs(100 + n, shift, rows=8)}),
                reason=reason,
            )
            for n, reason in enumerate(["sampled"] * 10 + ["low-confidence"])
        ]
        telemetry = [window(n + 1, now - 10 - 60 * n, inputs(n, shift)) for n in range(3)]
        cloud.data.ingest(Batch(device, "s1", telemetry, captures))

    admin = AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem")
    try:
        report = admin.drift("clf")
        assert report.model == "clf" and report.threshold == 0.2
        assert report.until - report.since == pytest.approx(3600)
        (v1,) = report.versions
        assert [(d.device_id, d.verdict) for d in v1.devices] == [
            ("cam-1", "drifted"),
            ("cam-2", "stable"),
        ]
        worst = v1.devices[0].channels[0]
        assert (worst.channel, worst.count) == (SHIFTED, 3 * ROWS)
        assert worst.mean - worst.baseline_mean == pytest.approx(1.5, abs=0.2)
        # KS from the 10 sampled captures (8 rows each; the low-confidence one left out).
        assert worst.ks_samples == 80 and worst.ks > 0.4 and worst.ks_pvalue < 1e-6
        stable = v1.devices[1].channels[0]
        assert stable.ks_samples == 80 and stable.ks < 0.2 and stable.ks_pvalue > 0.01
        assert v1.fleet.windows == 6 and v1.fleet.channels[0].ks_samples == 160
        assert len(v1.fleet.channels) == FEATURES

        assert admin.drift("clf", version=1, window_s=60).versions[0].fleet.windows == 2
        with pytest.raises(NotFound, match="does not exist"):
            admin.drift("nope")
        with pytest.raises(NotFound, match="no version 9"):
            admin.drift("clf", version=9)
        with pytest.raises(FailedPrecondition, match="no training baseline"):
            admin.drift("clf", version=2)
        for bad in (-1.0, math.inf, 1e12):
            with pytest.raises(InvalidArgument, match="window"):
                admin.drift("clf", window_s=bad)
        with pytest.raises(InvalidArgument, match="not valid"):
            admin.drift("Bad Name")
    finally:
        admin.close()

    env = {
        "EDGEFLEET_CLOUD": cloud.address,
        "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
        "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
        "COLUMNS": "250",
    }
    runner = CliRunner()
    done = runner.invoke(cli, ["drift", "clf", "--json"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    payload = json.loads(done.stdout)  # the monitor's log lines may reach stderr
    assert payload["versions"][0]["devices"][0]["device_id"] == "cam-1"
    assert payload["versions"][0]["fleet"]["channels"][0]["ks_samples"] == 160
    done = runner.invoke(cli, ["drift", "clf", "--window", "2h"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "last 2h00m" in done.stdout
    lines = done.stdout.splitlines()  # the monitor's log lines go to stderr
    cam1 = next(line for line in lines if "cam-1" in line)
    assert "drifted" in cam1 and f"x[{SHIFTED}]" in cam1 and "D=" in cam1
    assert "stable" in next(line for line in lines if "cam-2" in line)
    done = runner.invoke(cli, ["drift", "clf", "--version", "2"], env=env)
    assert done.exit_code != 0 and "no training baseline" in done.output

    # The cloud's own monitor (every 0.2 s here) alerts and exports what it found.
    deadline = time.monotonic() + 20
    while not cloud.drift.alert_counts() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cloud.metrics_endpoint is not None
    seen = scrape(cloud.metrics_endpoint.port)
    assert seen.value("edgefleet_drift_psi", model="clf", version="1", scope="device:cam-1") >= 0.2
    assert seen.value("edgefleet_drift_psi", model="clf", version="1", scope="device:cam-2") < 0.1
    assert (
        seen.value("edgefleet_drift_alerts_total", model="clf", version="1", scope="device:cam-1")
        == 1
    )
    assert not seen.find("edgefleet_drift_alerts_total", scope="device:cam-2")
