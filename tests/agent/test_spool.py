"""The agent's spool and the syncer over it: rows kept until acknowledged, sequences never
reused, a disk budget with the stated eviction order, batches the cloud can parse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.spool import CAPTURES, TELEMETRY, Spool
from agent.sync import Syncer, encode_batch
from edgefleet.core.data import SyncAck
from edgefleet.core.errors import Unavailable
from protos.fleet.v1 import data_pb2


def capture(size: int = 100) -> data_pb2.Capture:
    return data_pb2.Capture(model="m", version=1, at=1.8e9, inputs=b"x" * size)


def telemetry() -> data_pb2.TelemetryRecord:
    record = data_pb2.TelemetryRecord()
    record.device.start, record.device.end = 1.0, 2.0
    return record


def test_rows_wait_for_the_acknowledgement_and_sequences_survive_a_restart(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.db")
    assert spool.append(CAPTURES, [capture() for _ in range(5)]) == 5
    pending = spool.pending(CAPTURES, 3, 1 << 20)
    assert pending is not None and (pending.first_seq, pending.last_seq) == (1, 3)
    assert [data_pb2.Capture.FromString(b).seq for b in pending.bodies] == [1, 2, 3]
    spool.acknowledge(CAPTURES, 3)
    spool.acknowledge(CAPTURES, 2)  # a late, older acknowledgement changes nothing
    spool_id = spool.spool_id
    spool.close()
    # A restart (or a SIGKILL): the same spool, rows 4 and 5 still to send, new rows after.
    again = Spool(tmp_path / "spool.db")
    assert again.spool_id == spool_id
    again.append(CAPTURES, [capture()])
    pending = again.pending(CAPTURES, 100, 1 << 20)
    assert pending is not None and (pending.first_seq, pending.last_seq) == (4, 6)
    assert (tmp_path / "spool.db").stat().st_mode & 0o777 == 0o600
    again.acknowledge(CAPTURES, 6)
    again.append(CAPTURES, [capture()])
    pending = again.pending(CAPTURES, 100, 1 << 20)
    assert pending is not None and pending.first_seq == 7  # never reused, even after deletes


def test_over_budget_the_oldest_unsynced_captures_go_counted_never_telemetry(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.db", budget_bytes=400_000)
    spool.append(TELEMETRY, [telemetry() for _ in range(50)])
    for _ in range(20):
        spool.append(CAPTURES, [capture(10_000) for _ in range(10)])
    stats = spool.stats()
    assert stats.captures_dropped > 0 and stats.captures_written == 200
    assert stats.telemetry_pending == 50
    assert stats.bytes <= 400_000 * 1.5  # within the budget, give or take a batch
    pending = spool.pending(CAPTURES, 10_000, 64 << 20)
    assert pending is not None
    # What went is the oldest; the cloud is told rows below the first held are gone.
    assert pending.first_seq == stats.captures_dropped + 1
    assert pending.dropped_through == stats.captures_dropped
    assert pending.last_seq == 200


class Cloud:
    """Stores rows by seq once, as the cloud does; can fail or stop short."""

    device_id = "d1"

    def __init__(self) -> None:
        self.telemetry: dict[int, data_pb2.TelemetryRecord] = {}
        self.captures: dict[int, data_pb2.Capture] = {}
        self.down = False
        self.lost = 0

    def sync(self, batch: bytes) -> SyncAck:
        if self.down:
            raise Unavailable("cannot reach the server")
        message = data_pb2.SyncBatch.FromString(batch)
        assert message.device_id == "d1" and message.spool_id
        for t in message.telemetry:
            self.telemetry.setdefault(t.seq, t)
        for c in message.captures:
            self.captures.setdefault(c.seq, c)
        through = max(self.captures, default=0)
        if message.captures_dropped_through > through:
            self.lost += message.captures_dropped_through - through
            through = message.captures_dropped_through
        return SyncAck(max(self.telemetry, default=0), through)


def test_sync_sends_telemetry_first_then_captures_once_each(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.append(CAPTURES, [capture() for _ in range(25)])
    spool.append(TELEMETRY, [telemetry() for _ in range(3)])
    cloud = Cloud()
    syncer = Syncer(spool, cloud, max_batch_rows=10)
    cloud.down = True
    with pytest.raises(Unavailable):
        syncer.sync_once()
    assert spool.stats().captures_pending == 25  # nothing let go without an ack
    cloud.down = False
    assert syncer.sync_once() == 28
    assert sorted(cloud.telemetry) == [1, 2, 3] and sorted(cloud.captures) == list(range(1, 26))
    assert spool.stats().captures_pending == 0 and spool.pending(CAPTURES, 10, 1 << 20) is None
    assert syncer.stats.batches == 4  # 3 telemetry rows, then 25 captures in tens
    assert syncer.sync_once() == 0


def test_a_batch_is_a_sync_batch_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", budget_bytes=0)
    spool.append(CAPTURES, [capture(), capture()])
    pending = spool.pending(CAPTURES, 10, 1 << 20)
    assert pending is not None
    message = data_pb2.SyncBatch.FromString(encode_batch("dev-7", "sp-1", [pending]))
    assert (message.device_id, message.spool_id) == ("dev-7", "sp-1")
    assert [c.seq for c in message.captures] == [1, 2] and not message.telemetry


def test_the_spool_is_private(tmp_path: Path) -> None:
    Spool(tmp_path / "agent" / "spool.db")
    assert (tmp_path / "agent").stat().st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "agent" / "spool.db").st_mode & 0o777 == 0o600


class FlakyCloud(Cloud):
    """Answers `good` batches, then is unreachable; records each batch's sequences."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good
        self.batches: list[list[int]] = []

    def sync(self, batch: bytes) -> SyncAck:
        if len(self.batches) == self.good:
            self.down = True
        message = data_pb2.SyncBatch.FromString(batch)
        if not self.down:
            self.batches.append([c.seq for c in message.captures])
        return super().sync(batch)


def test_a_failure_mid_stream_lets_go_exactly_what_was_acknowledged(tmp_path: Path) -> None:
    """The syncer reads the next batch while one is in flight: a failure after two batches
    leaves the spool holding everything from the third on, and the next pass sends it
    following on from the cloud's mark."""
    spool = Spool(tmp_path / "spool.db")
    spool.append(CAPTURES, [capture() for _ in range(45)])
    cloud = FlakyCloud(good=2)
    syncer = Syncer(spool, cloud, max_batch_rows=10)
    with pytest.raises(Unavailable):
        syncer.sync_once()
    assert cloud.batches == [list(range(1, 11)), list(range(11, 21))]
    assert spool.stats().captures_pending == 25
    pending = spool.pending(CAPTURES, 100, 1 << 20)
    assert pending is not None and (pending.first_seq, pending.dropped_through) == (21, 0)
    cloud.down, cloud.good = False, 99
    assert syncer.sync_once() == 25
    assert [b[0] for b in cloud.batches] == [1, 11, 21, 31, 41]
    assert sorted(cloud.captures) == list(range(1, 46)) and spool.stats().captures_pending == 0


def test_rows_read_ahead_of_the_acknowledgement_are_not_counted_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.append(CAPTURES, [capture() for _ in range(30)])
    following = spool.pending(CAPTURES, 10, 1 << 20, after=10)  # 1-10 are in flight
    assert following is not None
    assert (following.first_seq, following.last_seq, following.dropped_through) == (11, 20, 0)
    assert spool.pending(CAPTURES, 10, 1 << 20, after=30) is None
