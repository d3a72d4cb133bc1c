"""Captured rows and telemetry in their own SQLite file (data_dir/data.db, WAL), apart from
the metadata: ingest writes a lot and must not hold up deploys."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from cloudsvc.store.data import (
    CAPTURES,
    TELEMETRY,
    CaptureQuery,
    DataStore,
    StreamCursor,
)
from edgefleet.core.data import Capture, CaptureLabel, DataSet, TelemetryRecord, VersionRows
from edgefleet.core.protowire import LEN, tag, varint
from edgefleet.core.wire import from_proto
from protos.fleet.v1 import data_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    device_id TEXT NOT NULL, spool_id TEXT NOT NULL, stream TEXT NOT NULL,
    through INTEGER NOT NULL, lost INTEGER NOT NULL,
    PRIMARY KEY (device_id, spool_id, stream)
);
CREATE TABLE IF NOT EXISTS captures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL, spool_id TEXT NOT NULL, seq INTEGER NOT NULL,
    model TEXT NOT NULL, version INTEGER NOT NULL, at REAL NOT NULL,
    label TEXT NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL,
    UNIQUE (device_id, spool_id, seq)
);
CREATE INDEX IF NOT EXISTS captures_by_model ON captures (model, id);
-- One row per segment: a batch's windows of one device and model (model '': device
-- windows), body a TelemetrySegment; ends is the latest end among them.
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL, spool_id TEXT NOT NULL, first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL, model TEXT NOT NULL, ends REAL NOT NULL,
    rows INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (device_id, spool_id, model, first_seq)
);
CREATE INDEX IF NOT EXISTS telemetry_by_model ON telemetry (model, ends);
"""


_ROW_TAG = tag(1, LEN)


class _Segment:
    """A batch's windows of one model, as they will be stored."""

    __slots__ = ("bodies", "count", "ends", "first", "last")

    def __init__(self, first: int) -> None:
        self.first = self.last = first
        self.ends = 0.0
        self.count = 0
        self.bodies: list[bytes] = []

    def add(self, row: data_pb2.TelemetryRecord, end: float) -> None:
        self.last = row.seq
        self.ends = max(self.ends, end)
        self.count += 1
        body = row.SerializeToString()
        # TelemetrySegment.rows (field 1, length-delimited), written without a copy of
        # each message into a new one.
        self.bodies += (_ROW_TAG, varint(len(body)), body)

    def body(self) -> bytes:
        return b"".join(self.bodies)


def _capture(row: sqlite3.Row) -> Capture:
    # The label column is the one that counts: labels are imported after ingest.
    body = from_proto(data_pb2.Capture.FromString(row["body"]), Capture)
    return replace(body, id=row["id"], device_id=row["device_id"], label=row["label"])


class SqliteDataStore(DataStore):
    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        if str(path) != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        # An acknowledged row must survive a power cut: the device deletes it on the ack.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _cursor(self, device_id: str, spool_id: str, stream: str) -> StreamCursor:
        with self._lock:
            row = self._conn.execute(
                "SELECT through, lost FROM cursors WHERE device_id = ? AND spool_id = ?"
                " AND stream = ?",
                (device_id, spool_id, stream),
            ).fetchone()
        return StreamCursor(int(row[0]), int(row[1])) if row else StreamCursor()

    def _save_cursor(
        self, device_id: str, spool_id: str, stream: str, cursor: StreamCursor
    ) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?, ?)",
            (device_id, spool_id, stream, cursor.through, cursor.lost),
        )

    def _insert_telemetry(
        self, device_id: str, spool_id: str, rows: Sequence[data_pb2.TelemetryRecord]
    ) -> None:
        # Windows are read by model and time, never one by one: a segment per model per
        # batch makes ingest one insert for many windows.
        segments: dict[str, _Segment] = {}
        for r in rows:
            if r.HasField("model"):
                model, end = r.model.model, r.model.end
            else:
                model, end = "", r.device.end
            segment = segments.get(model)
            if segment is None:
                segment = segments[model] = _Segment(r.seq)
            segment.add(r, end)
        self._conn.executemany(
            "INSERT INTO telemetry VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (device_id, spool_id, g.first, g.last, model, g.ends, g.count, g.body())
                for model, g in segments.items()
            ],
        )

    def _insert_captures(
        self, device_id: str, spool_id: str, rows: Sequence[data_pb2.Capture]
    ) -> None:
        self._conn.executemany(
            "INSERT INTO captures (device_id, spool_id, seq, model, version, at, label, size,"
            " body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    device_id,
                    spool_id,
                    r.seq,
                    r.model,
                    r.version,
                    r.at,
                    r.label,
                    len(r.inputs) + len(r.outputs),
                    r.SerializeToString(),
                )
                for r in rows
            ],
        )

    def lost(self, device_id: str) -> tuple[int, int]:
        with self._lock:
            rows = dict(
                self._conn.execute(
                    "SELECT stream, sum(lost) FROM cursors WHERE device_id = ? GROUP BY stream",
                    (device_id,),
                ).fetchall()
            )
        return int(rows.get(TELEMETRY) or 0), int(rows.get(CAPTURES) or 0)

    def data_sets(self) -> list[DataSet]:
        with self._lock:
            heads = self._conn.execute(
                "SELECT model, count(*), sum(label != ''), sum(size), count(DISTINCT device_id),"
                " min(at), max(at) FROM captures GROUP BY model ORDER BY model"
            ).fetchall()
            found = []
            for model, rows, labelled, size, devices, first, last in heads:
                versions = self._conn.execute(
                    "SELECT version, count(*) FROM captures WHERE model = ? GROUP BY version"
                    " ORDER BY version",
                    (model,),
                ).fetchall()
                labels = self._conn.execute(
                    "SELECT label, count(*) FROM captures WHERE model = ? AND label != ''"
                    " GROUP BY label",
                    (model,),
                ).fetchall()
                found.append(
                    DataSet(
                        f"captures:{model}",
                        model,
                        rows,
                        int(labelled or 0),
                        int(size or 0),
                        devices,
                        float(first),
                        float(last),
                        tuple(VersionRows(int(v), int(n)) for v, n in versions),
                        {str(k): int(n) for k, n in labels},
                    )
                )
        return found

    def captures(self, query: CaptureQuery) -> Iterator[Capture]:
        where = ["model = ?", "at >= ?", "id > ?"]
        params: list[object] = [query.model, query.since, query.after_id]
        if query.version:
            where.append("version = ?")
            params.append(query.version)
        if query.labelled_only:
            where.append("label != ''")
        if query.label:
            where.append("label = ?")
            params.append(query.label)
        sql = f"SELECT * FROM captures WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        remaining = query.limit or -1
        last = query.after_id
        # Read in pages, so an export of a large data set holds neither the lock nor memory.
        while remaining != 0:
            page = 512 if remaining < 0 else min(512, remaining)
            params[2] = last
            with self._lock:
                rows = self._conn.execute(sql, (*params, page)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _capture(row)
            last = rows[-1]["id"]
            if remaining > 0:
                remaining -= len(rows)

    def label(self, labels: Iterable[CaptureLabel]) -> tuple[int, int]:
        done = unknown = 0
        with self._transaction():
            for item in labels:
                changed = self._conn.execute(
                    "UPDATE captures SET label = ? WHERE id = ?", (item.label, item.capture_id)
                ).rowcount
                if changed:
                    done += 1
                else:
                    unknown += 1
        return done, unknown

    def telemetry(
        self, model: str = "", since: float = 0.0, devices: set[str] | None = None
    ) -> list[TelemetryRecord]:
        with self._lock:
            segments = self._conn.execute(
                "SELECT device_id, body FROM telemetry WHERE model = ? AND ends >= ?",
                (model, since),
            ).fetchall()
        found = []
        for device_id, body in segments:
            if devices is not None and device_id not in devices:
                continue
            for r in data_pb2.TelemetrySegment.FromString(body).rows:
                record = replace(from_proto(r, TelemetryRecord), device_id=device_id)
                if record.end >= since:
                    found.append(record)
        found.sort(key=lambda r: r.end)
        return found

    def close(self) -> None:
        with self._lock:
            self._conn.close()
