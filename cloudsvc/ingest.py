"""The cloud's end of sync: a device's batch of captures and telemetry, checked, attributed
to the device and stored exactly once (cloudsvc.store.data).

Everything in a batch comes from the network: sizes and counts are bounded, numbers must
be finite and plausible, and a device may send rows only of models and versions it was
ever given. A bad batch is refused whole with a message that says what to fix; nothing of
it is stored.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Sequence

from cloudsvc.errors import Forbidden, InvalidRequest
from cloudsvc.store.data import Batch, DataStore
from cloudsvc.store.metadata import MetadataStore
from edgefleet.core.data import LATENCY_BOUNDS_MS, SyncAck
from edgefleet.core.manifests import NAME_PATTERN
from protos.fleet.v1 import data_pb2

MAX_TELEMETRY_ROWS = 10_000
MAX_CAPTURE_ROWS = 5_000
MAX_CAPTURE_BYTES = 16 << 20
MAX_TELEMETRY_ROW_BYTES = 1 << 20
MAX_TEXT = 256
MAX_INPUTS = 64
MAX_CHANNELS = 4096
MAX_BINS = 1024
SPOOL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# A capture stamped before this (2020) or more than a day ahead is a device with no clock.
EARLIEST = 1_577_836_800.0


def _finite(*values: float) -> bool:
    return all(map(math.isfinite, values))


class Ingest:
    def __init__(self, data: DataStore, metadata: MetadataStore) -> None:
        self.data = data
        self.metadata = metadata

    def sync(self, device_id: str, request: data_pb2.SyncBatch) -> SyncAck:
        if not SPOOL_ID.match(request.spool_id):
            raise InvalidRequest(
                "a sync batch names its spool (spool_id: 1-64 letters, digits or '-')"
            )
        if len(request.telemetry) > MAX_TELEMETRY_ROWS or len(request.captures) > MAX_CAPTURE_ROWS:
            raise InvalidRequest(
                f"a sync batch carries at most {MAX_TELEMETRY_ROWS} telemetry rows and "
                f"{MAX_CAPTURE_ROWS} captures; send smaller batches"
            )
        peaks = self.metadata.peaks(device_id)
        now = time.time()
        for t in request.telemetry:
            self._telemetry(t, peaks)
        for c in request.captures:
            self._capture(c, peaks, now)
        for stream, rows in (("telemetry", request.telemetry), ("captures", request.captures)):
            _in_order(stream, [r.seq for r in rows])
        return self.data.ingest(
            Batch(
                device_id,
                request.spool_id,
                request.telemetry,
                request.captures,
                request.telemetry_dropped_through,
                request.captures_dropped_through,
            )
        )

    @staticmethod
    def _runs(model: str, version: int, peaks: dict[str, int]) -> None:
        if not NAME_PATTERN.match(model) or version < 1:
            raise InvalidRequest(f"{model[:64]!r} v{version} names no model version")
        if version > peaks.get(model, 0):
            raise Forbidden(
                f"this device was never given {model[:64]} v{version}: it may send captures "
                "and telemetry only of models it runs or ran"
            )

    def _capture(self, row: data_pb2.Capture, peaks: dict[str, int], now: float) -> None:
        self._runs(row.model, row.version, peaks)
        if row.seq < 1:
            raise InvalidRequest("capture sequence numbers start at 1")
        if not _finite(row.at, row.latency_ms, row.confidence) or not (
            EARLIEST <= row.at <= now + 86_400
        ):
            raise InvalidRequest(
                f"capture {row.seq}: its time {row.at!r} or latency is not a plausible number"
            )
        if row.latency_ms < 0 or not -1.0 <= row.confidence <= 1.0:
            raise InvalidRequest(f"capture {row.seq}: latency or confidence out of range")
        size = len(row.inputs) + len(row.outputs)
        if size > MAX_CAPTURE_BYTES:
            raise InvalidRequest(f"capture {row.seq} holds {size} bytes, over {MAX_CAPTURE_BYTES}")
        if max(len(row.request_id), len(row.label), len(row.reason)) > MAX_TEXT:
            raise InvalidRequest(f"capture {row.seq}: a text field is over {MAX_TEXT} characters")
        # Who sent it is the caller, whatever the row says; ids are the cloud's to give.
        row.device_id, row.id = "", 0

    def _telemetry(self, row: data_pb2.TelemetryRecord, peaks: dict[str, int]) -> None:
        if row.seq < 1:
            raise InvalidRequest("telemetry sequence numbers start at 1")
        kind = row.WhichOneof("body")
        if kind is None:
            raise InvalidRequest(f"telemetry row {row.seq} must be a model or a device window")
        if kind == "model":
            if row.ByteSize() > MAX_TELEMETRY_ROW_BYTES:
                raise InvalidRequest(
                    f"telemetry row {row.seq} holds over {MAX_TELEMETRY_ROW_BYTES} bytes"
                )
            window = row.model
            self._runs(window.model, window.version, peaks)
            _check_window(row.seq, window)
        else:
            d = row.device
            if not _finite(d.start, d.end, d.cpu_seconds, d.accelerator_percent) or d.end < d.start:
                raise InvalidRequest(f"telemetry row {row.seq}: a device window out of range")
        row.device_id = ""


_INF = math.inf
_STANDARD_COUNTS = len(LATENCY_BOUNDS_MS) + 1


def _check_window(seq: int, w: data_pb2.ModelWindow) -> None:
    # Every telemetry row passes here: field reads are what costs, so each is read once.
    latency = w.latency
    numbers = (w.start, w.end, w.busy_seconds, w.attributed_seconds, latency.sum_ms)
    if not _finite(*numbers) or numbers[1] < numbers[0] or min(numbers) < 0:
        raise InvalidRequest(f"telemetry row {seq}: times or durations out of range")
    counts = latency.counts
    if latency.bounds_ms:  # not the standard bounds: they must make sense
        bounds = list(latency.bounds_ms)
        if len(bounds) > MAX_BINS or bounds != sorted(bounds) or not _finite(*bounds):
            raise InvalidRequest(f"telemetry row {seq}: the latency bounds are not in order")
        expected = len(bounds) + 1
    else:
        expected = _STANDARD_COUNTS
    if len(counts) != expected:
        raise InvalidRequest(f"telemetry row {seq}: the latency histogram does not add up")
    requests = w.requests
    if sum(counts) > requests or w.errors > requests:
        raise InvalidRequest(f"telemetry row {seq}: more latencies or errors than requests")
    compared = w.compared
    if compared > requests or w.agreed > compared:
        raise InvalidRequest(
            f"telemetry row {seq}: a shadow compares at most its requests and agrees at most "
            f"as often as it compares ({w.agreed} agreed of {compared} compared, "
            f"{requests} requests)"
        )
    inputs = w.inputs
    if len(inputs) > MAX_INPUTS or len(w.target) > MAX_TEXT:
        raise InvalidRequest(f"telemetry row {seq}: too many inputs")
    for stats in inputs:
        channels = stats.channels
        if len(channels) > MAX_CHANNELS or len(stats.edges) > MAX_BINS:
            raise InvalidRequest(f"telemetry row {seq}: input {stats.input[:64]!r} is too large")
        # One pass over the channels: a NaN or an infinity anywhere makes the sum one. The
        # histograms' sizes are bounded by the row's (merging tolerates odd lengths).
        total = 0.0
        for c in channels:
            m2 = c.m2
            if m2 < 0:
                total = math.nan
                break
            total += c.mean * 0.0 + m2 * 0.0
        if not math.isfinite(total):
            raise InvalidRequest(
                f"telemetry row {seq}: input {stats.input[:64]!r} has invalid statistics"
            )


def _in_order(stream: str, seqs: Sequence[int]) -> None:
    for before, after in itertools.pairwise(seqs):
        if after <= before:
            raise InvalidRequest(
                f"{stream} rows must come in increasing sequence order ({before}, then {after})"
            )
