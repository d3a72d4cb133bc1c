"""Bad input to Sync: the checks of cloudsvc.ingest one by one, then through the cloud's real
gRPC port as a device (or a stranger) would send it: malformed and oversized batches,
sequence gaps and overlaps, a device writing as another, rows of a model it does not run.
Each gets the right status and a message that says what is wrong, and nothing of a refused
batch, nor anything twice, is stored."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloudsvc.errors import Forbidden, InvalidRequest, NotReady
from cloudsvc.ingest import MAX_CAPTURE_ROWS, MAX_TELEMETRY_ROWS, Ingest
from cloudsvc.server import MAX_MESSAGE_BYTES, CloudServer
from cloudsvc.store.data import CaptureQuery, MemoryDataStore
from cloudsvc.store.memory import MemoryMetadataStore
from edgefleet.client import AdminClient
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.data import SyncAck
from protos.fleet.v1 import data_pb2, fleet_pb2_grpc

from .conftest import ADMIN_TOKEN, enroll, write_linear_model

SYNC = "/edgefleet.fleet.v1.AgentService/Sync"
AT = float(int(time.time()) - 3600)  # an hour ago


def capture(seq: int, model: str = "clf", version: int = 1, **fields: object) -> data_pb2.Capture:
    row = data_pb2.Capture(
        seq=seq,
        model=model,
        version=version,
        request_id=f"r{seq}",
        at=AT + seq,
        inputs=b"i" * 8,
        outputs=b"o" * 4,
        confidence=-1.0,
    )
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def window(seq: int, model: str = "clf", version: int = 1) -> data_pb2.TelemetryRecord:
    record = data_pb2.TelemetryRecord(seq=seq)
    w = record.model
    w.model, w.version, w.start, w.end, w.requests = model, version, AT, AT + 60, 3
    w.latency.bounds_ms.extend([1.0, 10.0])
    w.latency.counts.extend([1, 1, 1])
    return record


def window_with(
    seq: int, change: Callable[[data_pb2.ModelWindow], object]
) -> data_pb2.TelemetryRecord:
    """A window with standard latency bounds and 4 feature channels, then `change`d."""
    record = data_pb2.TelemetryRecord(seq=seq)
    w = record.model
    w.model, w.version, w.start, w.end, w.requests = "clf", 1, AT, AT + 60, 3
    w.latency.counts.extend([0] * 24 + [3])
    stats = w.inputs.add(input="x")
    for n in range(4):
        stats.channels.add(count=3, mean=float(n), m2=1.0, min=0.0, max=4.0)
    change(w)
    return record


def _bounds_out_of_order(w: data_pb2.ModelWindow) -> None:
    w.latency.bounds_ms[:] = [5.0, 1.0]
    w.latency.counts[:] = [1, 1, 1]


def device_window(seq: int, start: float = AT, end: float = AT + 60) -> data_pb2.TelemetryRecord:
    record = data_pb2.TelemetryRecord(seq=seq)
    record.device.start, record.device.end = start, end
    return record


def batch(
    captures: list[data_pb2.Capture] | None = None,
    telemetry: list[data_pb2.TelemetryRecord] | None = None,
    spool: str = "spool-1",
    *,
    device_id: str = "",
    captures_dropped_through: int = 0,
) -> data_pb2.SyncBatch:
    return data_pb2.SyncBatch(
        spool_id=spool,
        captures=captures or [],
        telemetry=telemetry or [],
        device_id=device_id,
        captures_dropped_through=captures_dropped_through,
    )


# the checks, one by one ------------------------------------------------------------------


class _Peaks(MemoryMetadataStore):
    """A device that was given clf v1 and v2, and nothing else."""

    def peaks(self, device_id: str) -> dict[str, int]:
        return {"clf": 2}


@pytest.fixture
def ingest() -> Ingest:
    return Ingest(MemoryDataStore(), _Peaks())


BAD_BATCHES: list[tuple[str, Callable[[], data_pb2.SyncBatch], type[Exception], str]] = [
    ("no spool id", lambda: batch([capture(1)], spool=""), InvalidRequest, "names its spool"),
    ("odd spool id", lambda: batch([capture(1)], spool="a/b"), InvalidRequest, "names its spool"),
    (
        "too many captures",
        lambda: batch([capture(n) for n in range(1, MAX_CAPTURE_ROWS + 2)]),
        InvalidRequest,
        "send smaller batches",
    ),
    (
        "too many telemetry rows",
        lambda: batch(telemetry=[device_window(n) for n in range(1, MAX_TELEMETRY_ROWS + 2)]),
        InvalidRequest,
        "send smaller batches",
    ),
    ("seq 0", lambda: batch([capture(0)]), InvalidRequest, "start at 1"),
    ("out of order", lambda: batch([capture(2), capture(1)]), InvalidRequest, "increasing"),
    ("repeated seq", lambda: batch([capture(1), capture(1)]), InvalidRequest, "increasing"),
    ("no clock", lambda: batch([capture(1, at=5.0)]), InvalidRequest, "plausible"),
    ("from the future", lambda: batch([capture(1, at=4e9)]), InvalidRequest, "plausible"),
    (
        "NaN latency",
        lambda: batch([capture(1, latency_ms=float("nan"))]),
        InvalidRequest,
        "plausible",
    ),
    ("confidence 2", lambda: batch([capture(1, confidence=2.0)]), InvalidRequest, "range"),
    ("long label", lambda: batch([capture(1, label="x" * 257)]), InvalidRequest, "text field"),
    (
        "huge capture",
        lambda: batch([capture(1, inputs=b"x" * ((16 << 20) + 1))]),
        InvalidRequest,
        "over",
    ),
    ("a model it never ran", lambda: batch([capture(1, model="other")]), Forbidden, "never"),
    ("a version it never had", lambda: batch([capture(1, version=3)]), Forbidden, "never given"),
    ("version 0", lambda: batch([capture(1, version=0)]), InvalidRequest, "names no model"),
    ("bad model name", lambda: batch([capture(1, model="../x")]), InvalidRequest, "no model"),
    (
        "empty telemetry row",
        lambda: batch(telemetry=[data_pb2.TelemetryRecord(seq=1)]),
        InvalidRequest,
        "model or a device",
    ),
    (
        "window of a model it never ran",
        lambda: batch(telemetry=[window(1, model="other")]),
        Forbidden,
        "never given",
    ),
    (
        "NaN feature mean",
        lambda: batch(
            telemetry=[
                window_with(1, lambda w: setattr(w.inputs[0].channels[2], "mean", float("nan")))
            ]
        ),
        InvalidRequest,
        "invalid statistics",
    ),
    (
        "infinite variance",
        lambda: batch(
            telemetry=[
                window_with(1, lambda w: setattr(w.inputs[0].channels[3], "m2", float("inf")))
            ]
        ),
        InvalidRequest,
        "invalid statistics",
    ),
    (
        "negative variance",
        lambda: batch(
            telemetry=[window_with(1, lambda w: setattr(w.inputs[0].channels[0], "m2", -1.0))]
        ),
        InvalidRequest,
        "invalid statistics",
    ),
    (
        "latency counts not matching the standard bounds",
        lambda: batch(telemetry=[window_with(1, lambda w: w.latency.counts.append(0))]),
        InvalidRequest,
        "does not add up",
    ),
    (
        "latency bounds out of order",
        lambda: batch(telemetry=[window_with(1, _bounds_out_of_order)]),
        InvalidRequest,
        "not in order",
    ),
    (
        "more latencies than requests",
        lambda: batch(telemetry=[window_with(1, lambda w: setattr(w, "requests", 2))]),
        InvalidRequest,
        "more latencies",
    ),
    (
        "a telemetry row over 1 MiB",
        lambda: batch(
            telemetry=[
                window_with(
                    1, lambda w: w.inputs[0].channels[0].histogram.extend([1 << 40] * 200_000)
                )
            ]
        ),
        InvalidRequest,
        "holds over",
    ),
    (
        "device window backwards",
        lambda: batch(telemetry=[device_window(1, AT + 60, AT)]),
        InvalidRequest,
        "out of range",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [b[1:] for b in BAD_BATCHES],
    ids=[b[0] for b in BAD_BATCHES],
)
def test_a_bad_batch_is_refused_whole_with_a_message(
    ingest: Ingest, make: Callable[[], data_pb2.SyncBatch], error: type[Exception], message: str
) -> None:
    bad = make()
    # A good telemetry row rides along: a refused batch keeps none of its rows.
    if not bad.telemetry:
        bad.telemetry.append(device_window(1))
    with pytest.raises(error, match=message):
        ingest.sync("d1", bad)
    assert ingest.data.cursors("d1", bad.spool_id) == (0, 0)
    assert list(ingest.data.captures(CaptureQuery("clf"))) == []
    assert ingest.data.telemetry() == []


def test_gaps_are_refused_and_overlaps_are_duplicates(ingest: Ingest) -> None:
    assert ingest.sync("d1", batch([capture(1), capture(2)])) == SyncAck(0, 2, 2, 0)
    with pytest.raises(NotReady, match="send again from seq 3"):
        ingest.sync("d1", batch([capture(4)]))
    # An overlap (a resend after a lost acknowledgement) stores only what is new.
    assert ingest.sync("d1", batch([capture(2), capture(3)])) == SyncAck(0, 3, 1, 1)
    # The same sequence numbers from another device, or another spool of the same device,
    # are other rows.
    assert ingest.sync("d2", batch([capture(1)])) == SyncAck(0, 1, 1, 0)
    assert ingest.sync("d1", batch([capture(1)], spool="spool-2")) == SyncAck(0, 1, 1, 0)
    rows = list(ingest.data.captures(CaptureQuery("clf")))
    assert [(r.device_id, r.seq) for r in rows] == [("d1", 1), ("d1", 2), ("d1", 3), ("d2", 1), ("d1", 1)]  # fmt: skip


def test_rows_say_nothing_of_who_sent_them(ingest: Ingest) -> None:
    """A row naming another device or a cloud id is stored as the caller's, with the
    cloud's own id."""
    forged = capture(1, device_id="victim", id=999)
    telemetry = device_window(1)
    telemetry.device_id = "victim"
    ingest.sync("d1", batch([forged], [telemetry]))
    (row,) = ingest.data.captures(CaptureQuery("clf"))
    assert (row.device_id, row.id) == ("d1", 1)
    assert [r.device_id for r in ingest.data.telemetry()] == ["d1"]


def test_evicted_rows_are_counted_lost_not_refused(ingest: Ingest) -> None:
    ingest.sync("d1", batch([capture(1)]))
    ack = ingest.sync("d1", batch([capture(7)], captures_dropped_through=6))
    assert ack == SyncAck(0, 7, 1, 0)
    assert ingest.data.lost("d1") == (0, 5)
    # Told again (the device did not get the ack), nothing more is lost.
    assert ingest.sync("d1", batch([capture(7)], captures_dropped_through=6)).duplicates == 1
    assert ingest.data.lost("d1") == (0, 5)


# through the real gRPC port -------------------------------------------------------------


@pytest.fixture
def device(cloud: CloudServer, channel: grpc.Channel, tmp_path: Path) -> Iterator[str]:
    """An enrolled device given clf v1; its credential."""
    enrolled = enroll(channel, "cam-1", site="a")
    enroll(channel, "cam-2", site="b")
    admin = AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem")
    try:
        admin.push_model("clf", write_linear_model(tmp_path / "clf.onnx"))
        admin.deploy("clf", 1, selector={"site": "a"})
    finally:
        admin.close()
    yield enrolled.device_token


def _send(
    channel: grpc.Channel, body: bytes, token: str | None
) -> tuple[grpc.StatusCode, str, data_pb2.SyncAck | None]:
    call: Any = channel.unary_unary(SYNC, response_deserializer=data_pb2.SyncAck.FromString)
    metadata = bearer_metadata(token) if token else ()
    try:
        ack = call(body, timeout=30, metadata=metadata)
    except grpc.RpcError as err:
        return err.code(), str(err.details()), None
    return grpc.StatusCode.OK, "", ack


def test_sync_over_grpc_refuses_bad_input_with_the_right_status(
    cloud: CloudServer, channel: grpc.Channel, device: str
) -> None:
    code = grpc.StatusCode
    first = batch([capture(1), capture(2)], [window(1)]).SerializeToString()
    status, _, ack = _send(channel, first, device)
    assert status is code.OK and ack is not None
    assert (ack.telemetry_through, ack.captures_through, ack.stored) == (1, 2, 3)

    cases: list[tuple[str, bytes, str | None, grpc.StatusCode, str]] = [
        ("no credential", first, None, code.UNAUTHENTICATED, ""),
        ("a wrong credential", first, "dev_not-a-token", code.UNAUTHENTICATED, ""),
        (
            "bytes that are no message",
            b"\xff\xff\xff\x07garbage",
            device,
            code.INVALID_ARGUMENT,
            "",
        ),
        (
            "as another device",
            batch([capture(3)], device_id="cam-2").SerializeToString(),
            device,
            code.PERMISSION_DENIED,
            "may not act for device 'cam-2'",
        ),
        (
            "a model it does not run",
            batch([capture(3, model="other")]).SerializeToString(),
            device,
            code.PERMISSION_DENIED,
            "models it runs",
        ),
        (
            "a version it was never given",
            batch([capture(3, version=2)]).SerializeToString(),
            device,
            code.PERMISSION_DENIED,
            "never given clf v2",
        ),
        (
            "a gap",
            batch([capture(5)]).SerializeToString(),
            device,
            code.FAILED_PRECONDITION,
            "send again from seq 3",
        ),
        (
            "rows out of order",
            batch([capture(4), capture(3)]).SerializeToString(),
            device,
            code.INVALID_ARGUMENT,
            "increasing sequence order",
        ),
        (
            "too many rows",
            batch([capture(n) for n in range(3, MAX_CAPTURE_ROWS + 4)]).SerializeToString(),
            device,
            code.INVALID_ARGUMENT,
            "send smaller batches",
        ),
        (
            "a capture over 16 MiB",
            batch([capture(3, inputs=b"x" * ((16 << 20) + 1))]).SerializeToString(),
            device,
            code.INVALID_ARGUMENT,
            "over 16777216",
        ),
        (
            "a batch over the message limit",
            batch([capture(3, inputs=b"x" * MAX_MESSAGE_BYTES)]).SerializeToString(),
            device,
            code.RESOURCE_EXHAUSTED,
            "",
        ),
    ]
    for what, body, token, expected, message in cases:
        status, details, _ = _send(channel, body, token)
        assert status is expected, f"{what}: {status} {details}"
        assert message in details, f"{what}: {details!r}"
        assert len(details) < 400, f"{what}: the message echoes the input"

    # An overlap is a resend: only the new row is stored.
    status, _, ack = _send(channel, batch([capture(2), capture(3)]).SerializeToString(), device)
    assert status is code.OK and ack is not None
    assert (ack.captures_through, ack.stored, ack.duplicates) == (3, 1, 1)
    rows = list(cloud.data.captures(CaptureQuery("clf")))
    assert [(r.device_id, r.seq, r.request_id) for r in rows] == [
        ("cam-1", 1, "r1"),
        ("cam-1", 2, "r2"),
        ("cam-1", 3, "r3"),
    ]
    assert cloud.data.cursors("cam-2", "spool-1") == (0, 0)
    assert len(cloud.data.telemetry("clf")) == 1


def test_agent_service_stub_sync_is_the_same_method(channel: grpc.Channel, device: str) -> None:
    """The generated stub (what a client of the proto would use) reaches the same checks."""
    stub = fleet_pb2_grpc.AgentServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Sync(batch([capture(1)], spool=""), metadata=bearer_metadata(device), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "names its spool" in str(info.value.details())
