"""One suite, run against every DataStore: rows from devices stored exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudsvc.errors import NotReady
from cloudsvc.store.data import Batch, CaptureQuery, DataStore, MemoryDataStore
from cloudsvc.store.data_sqlite import SqliteDataStore
from edgefleet.core.data import CaptureLabel, SyncAck
from protos.fleet.v1 import data_pb2


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DataStore]:
    s: DataStore = (
        MemoryDataStore() if request.param == "memory" else SqliteDataStore(tmp_path / "data.db")
    )
    yield s
    s.close()


def capture(seq: int, model: str = "m", version: int = 1, at: float = 1.8e9) -> data_pb2.Capture:
    return data_pb2.Capture(
        seq=seq, model=model, version=version, at=at + seq, inputs=b"i" * 10, outputs=b"o" * 4
    )


def window(seq: int, model: str = "m", requests: int = 10) -> data_pb2.TelemetryRecord:
    record = data_pb2.TelemetryRecord(seq=seq)
    record.model.model, record.model.version = model, 1
    record.model.start, record.model.end, record.model.requests = (
        100.0 * seq,
        100.0 * seq + 60,
        requests,
    )
    return record


def test_rows_are_stored_once_and_resends_are_duplicates(store: DataStore) -> None:
    first = store.ingest(Batch("d1", "s1", [window(1), window(2)], [capture(1), capture(2)]))
    assert first == SyncAck(2, 2, 4, 0)
    # The acknowledgement was lost: the device sends the same rows and one more.
    again = store.ingest(Batch("d1", "s1", [window(2)], [capture(1), capture(2), capture(3)]))
    assert again == SyncAck(2, 3, 1, 3)
    assert [c.seq for c in store.captures(CaptureQuery("m"))] == [1, 2, 3]
    assert len(store.telemetry("m")) == 2
    assert store.cursors("d1", "s1") == (2, 3)


def test_a_gap_is_refused_whole_and_says_where_to_resume(store: DataStore) -> None:
    store.ingest(Batch("d1", "s1", [], [capture(1)]))
    with pytest.raises(NotReady, match="send again from seq 2"):
        store.ingest(Batch("d1", "s1", [window(1)], [capture(3)]))
    # Nothing of the refused batch was kept, its telemetry row included.
    assert store.cursors("d1", "s1") == (0, 1) and store.telemetry("m") == []


def test_evicted_rows_are_counted_lost_and_the_cursor_moves_on(store: DataStore) -> None:
    store.ingest(Batch("d1", "s1", [], [capture(1)]))
    ack = store.ingest(Batch("d1", "s1", [], [capture(6)], captures_dropped_through=5))
    assert ack.captures_through == 6
    assert store.lost("d1") == (0, 4)


def test_spools_and_devices_are_kept_apart(store: DataStore) -> None:
    store.ingest(Batch("d1", "s1", [], [capture(1)]))
    store.ingest(Batch("d1", "s2", [], [capture(1)]))  # a wiped device: a new spool
    store.ingest(Batch("d2", "s1", [], [capture(1, version=2)]))
    rows = list(store.captures(CaptureQuery("m")))
    assert [(r.device_id, r.seq) for r in rows] == [("d1", 1), ("d1", 1), ("d2", 1)]
    assert len({r.id for r in rows}) == 3
    (data_set,) = store.data_sets()
    assert (data_set.name, data_set.rows, data_set.devices) == ("captures:m", 3, 2)
    assert [(v.version, v.rows) for v in data_set.versions] == [(1, 2), (2, 1)]


def test_labels_by_id_and_queries(store: DataStore) -> None:
    store.ingest(Batch("d1", "s1", [], [capture(n) for n in range(1, 6)]))
    ids = [r.id for r in store.captures(CaptureQuery("m"))]
    assert store.label([CaptureLabel(ids[0], "cat"), CaptureLabel(ids[1], "dog")]) == (2, 0)
    assert store.label([CaptureLabel(99_999, "x")]) == (0, 1)
    assert [r.label for r in store.captures(CaptureQuery("m", labelled_only=True))] == [
        "cat",
        "dog",
    ]
    assert [r.id for r in store.captures(CaptureQuery("m", label="dog"))] == [ids[1]]
    assert len(list(store.captures(CaptureQuery("m", limit=2)))) == 2
    assert [r.id for r in store.captures(CaptureQuery("m", after_id=ids[3]))] == [ids[4]]
    (data_set,) = store.data_sets()
    assert data_set.labelled == 2 and dict(data_set.labels) == {"cat": 1, "dog": 1}


def test_telemetry_by_model_time_and_device(store: DataStore) -> None:
    store.ingest(Batch("d1", "s1", [window(1), window(2, model="other")], []))
    store.ingest(Batch("d2", "s1", [window(1), window(2), window(3)], []))
    assert {r.device_id for r in store.telemetry("m")} == {"d1", "d2"}
    assert [r.seq for r in store.telemetry("m", since=300.0)] == [3]
    assert [r.seq for r in store.telemetry("other")] == [2]
    assert [r.device_id for r in store.telemetry("m", devices={"d1"})] == ["d1"]
