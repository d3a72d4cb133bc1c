"""What devices send back, stored: captured inferences (the data sets) and telemetry.

Ingest is exactly-once per row: each (device, spool, stream, seq) is stored at most once,
in one transaction with the stream's high-water mark, so a batch resent after a lost
acknowledgement (or a kill of either side) adds nothing twice. The logic lives here once;
each store provides the transaction and the rows (`MemoryDataStore` below, SQLite in
`data_sqlite.py`), and one test suite runs against both.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from cloudsvc.errors import NotReady
from edgefleet.core.data import (
    Capture,
    CaptureLabel,
    DataSet,
    SyncAck,
    TelemetryRecord,
    VersionRows,
)
from edgefleet.core.wire import from_proto
from protos.fleet.v1 import data_pb2

TELEMETRY, CAPTURES = "telemetry", "captures"


@dataclass(frozen=True)
class Batch:
    """One device's rows as the wire carried them (already validated): rows stay messages
    on their way in, so ingest costs no conversion per row."""

    device_id: str
    spool_id: str
    telemetry: Sequence[data_pb2.TelemetryRecord] = ()
    captures: Sequence[data_pb2.Capture] = ()
    telemetry_dropped_through: int = 0
    captures_dropped_through: int = 0


@dataclass(frozen=True)
class CaptureQuery:
    model: str
    version: int = 0  # 0: every version
    since: float = 0.0
    labelled_only: bool = False
    label: str = ""
    limit: int = 0  # 0: every row
    after_id: int = 0  # resume an export after this capture id


@dataclass
class StreamCursor:
    through: int = 0  # every row up to here is stored or counted lost
    lost: int = 0


class DataStore(ABC):
    """Captured rows and telemetry windows, with per-device stream cursors."""

    def ingest(self, batch: Batch) -> SyncAck:
        """Store the batch's new rows once each and move the cursors, in one transaction.

        Rows at or below a stream's cursor are duplicates (a resend) and skipped; the rest
        must follow on from the cursor without a gap, in order (NotReady otherwise, saying
        where to resume). Rows the device evicted unsynced (`*_dropped_through`) are
        counted lost and the cursor moves past them.
        """
        with self._transaction():
            marks = []
            stored = duplicates = 0
            for stream, rows, dropped in (
                (TELEMETRY, batch.telemetry, batch.telemetry_dropped_through),
                (CAPTURES, batch.captures, batch.captures_dropped_through),
            ):
                cursor = self._cursor(batch.device_id, batch.spool_id, stream)
                if dropped > cursor.through:
                    cursor.lost += dropped - cursor.through
                    cursor.through = dropped
                fresh: list[Any] = []
                for row in rows:
                    seq = row.seq
                    if seq <= cursor.through:
                        duplicates += 1
                        continue
                    if seq != cursor.through + 1:
                        raise NotReady(
                            f"{stream} rows of spool {batch.spool_id[:16]} must follow on from "
                            f"seq {cursor.through}: got seq {seq}; send again from seq "
                            f"{cursor.through + 1}"
                        )
                    cursor.through = seq
                    fresh.append(row)
                if fresh:
                    if stream == TELEMETRY:
                        self._insert_telemetry(batch.device_id, batch.spool_id, fresh)
                    else:
                        self._insert_captures(batch.device_id, batch.spool_id, fresh)
                stored += len(fresh)
                self._save_cursor(batch.device_id, batch.spool_id, stream, cursor)
                marks.append(cursor.through)
        return SyncAck(marks[0], marks[1], stored, duplicates)

    def cursors(self, device_id: str, spool_id: str) -> tuple[int, int]:
        """(telemetry, captures) rows stored or counted lost, from the start of the spool."""
        return (
            self._cursor(device_id, spool_id, TELEMETRY).through,
            self._cursor(device_id, spool_id, CAPTURES).through,
        )

    @abstractmethod
    def lost(self, device_id: str) -> tuple[int, int]:
        """(telemetry, captures) rows the device evicted before they were synced."""

    # what each store provides ---------------------------------------------------------
    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]: ...

    @abstractmethod
    def _cursor(self, device_id: str, spool_id: str, stream: str) -> StreamCursor: ...

    @abstractmethod
    def _save_cursor(
        self, device_id: str, spool_id: str, stream: str, cursor: StreamCursor
    ) -> None: ...

    @abstractmethod
    def _insert_telemetry(
        self, device_id: str, spool_id: str, rows: Sequence[data_pb2.TelemetryRecord]
    ) -> None: ...

    @abstractmethod
    def _insert_captures(
        self, device_id: str, spool_id: str, rows: Sequence[data_pb2.Capture]
    ) -> None: ...

    # reading ----------------------------------------------------------------------------
    @abstractmethod
    def data_sets(self) -> list[DataSet]:
        """Every model with captured rows, by name."""

    @abstractmethod
    def captures(self, query: CaptureQuery) -> Iterator[Capture]:
        """Captured rows of a model, oldest first (by the cloud's id)."""

    @abstractmethod
    def label(self, labels: Iterable[CaptureLabel]) -> tuple[int, int]:
        """Set labels by capture id: (labelled, unknown ids)."""

    @abstractmethod
    def telemetry(
        self, model: str = "", since: float = 0.0, devices: set[str] | None = None
    ) -> list[TelemetryRecord]:
        """Telemetry windows (a model's, or every device window when `model` is ""), ending
        at `since` or later, of `devices` (None: all)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds."""


def summarise(model: str, rows: Iterable[Capture]) -> DataSet:
    """A model's data set from its captured rows (what both stores answer)."""
    count = labelled = size = 0
    devices: set[str] = set()
    first, last = 0.0, 0.0
    versions: dict[int, int] = {}
    labels: dict[str, int] = {}
    for row in rows:
        count += 1
        size += row.size
        devices.add(row.device_id)
        first = row.at if not first else min(first, row.at)
        last = max(last, row.at)
        versions[row.version] = versions.get(row.version, 0) + 1
        if row.label:
            labelled += 1
            labels[row.label] = labels.get(row.label, 0) + 1
    return DataSet(
        f"captures:{model}",
        model,
        count,
        labelled,
        size,
        len(devices),
        first,
        last,
        tuple(VersionRows(v, n) for v, n in sorted(versions.items())),
        labels,
    )


def matches(query: CaptureQuery, row: Capture) -> bool:
    return (
        row.model == query.model
        and (not query.version or row.version == query.version)
        and row.at >= query.since
        and row.id > query.after_id
        and (not query.labelled_only or bool(row.label))
        and (not query.label or row.label == query.label)
    )


class MemoryDataStore(DataStore):
    """Rows kept in lists: tests and throw-away demos."""

    def close(self) -> None:
        pass

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cursors: dict[tuple[str, str, str], StreamCursor] = {}
        self._telemetry: list[TelemetryRecord] = []
        self._captures: list[Capture] = []

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            saved = {k: replace(v) for k, v in self._cursors.items()}
            lengths = (len(self._telemetry), len(self._captures))
            try:
                yield
            except BaseException:
                self._cursors = saved
                del self._telemetry[lengths[0] :]
                del self._captures[lengths[1] :]
                raise

    def _cursor(self, device_id: str, spool_id: str, stream: str) -> StreamCursor:
        with self._lock:
            return replace(self._cursors.get((device_id, spool_id, stream), StreamCursor()))

    def _save_cursor(
        self, device_id: str, spool_id: str, stream: str, cursor: StreamCursor
    ) -> None:
        self._cursors[(device_id, spool_id, stream)] = replace(cursor)

    def _insert_telemetry(
        self, device_id: str, spool_id: str, rows: Sequence[data_pb2.TelemetryRecord]
    ) -> None:
        self._telemetry.extend(
            replace(from_proto(r, TelemetryRecord), device_id=device_id) for r in rows
        )

    def _insert_captures(
        self, device_id: str, spool_id: str, rows: Sequence[data_pb2.Capture]
    ) -> None:
        for row in rows:
            capture = from_proto(row, Capture)
            self._captures.append(replace(capture, device_id=device_id, id=len(self._captures) + 1))

    def lost(self, device_id: str) -> tuple[int, int]:
        with self._lock:
            counts = {TELEMETRY: 0, CAPTURES: 0}
            for (device, _, stream), cursor in self._cursors.items():
                if device == device_id:
                    counts[stream] += cursor.lost
            return counts[TELEMETRY], counts[CAPTURES]

    def data_sets(self) -> list[DataSet]:
        with self._lock:
            models = sorted({c.model for c in self._captures})
            return [summarise(m, (c for c in self._captures if c.model == m)) for m in models]

    def captures(self, query: CaptureQuery) -> Iterator[Capture]:
        with self._lock:
            found = [c for c in self._captures if matches(query, c)]
        yield from found[: query.limit] if query.limit else found

    def label(self, labels: Iterable[CaptureLabel]) -> tuple[int, int]:
        done = unknown = 0
        with self._lock:
            for item in labels:
                index = item.capture_id - 1
                if 0 <= index < len(self._captures):
                    self._captures[index] = replace(self._captures[index], label=item.label)
                    done += 1
                else:
                    unknown += 1
        return done, unknown

    def telemetry(
        self, model: str = "", since: float = 0.0, devices: set[str] | None = None
    ) -> list[TelemetryRecord]:
        with self._lock:
            return [
                r
                for r in self._telemetry
                if (devices is None or r.device_id in devices)
                and (
                    (
                        model
                        and r.model is not None
                        and r.model.model == model
                        and r.model.end >= since
                    )
                    or (not model and r.device is not None and r.device.end >= since)
                )
            ]
